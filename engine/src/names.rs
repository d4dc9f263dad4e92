//! Names from users: snapshot and domain names are checked before they reach a path, a
//! qcow2 snapshot table or the journal.

use crate::error::{Error, Result};

/// Longest accepted name.
pub const MAX_NAME: usize = 64;

/// Checks a snapshot or domain name: 1–64 characters of `[A-Za-z0-9._-]`, not starting
/// with `.`. `what` names the kind of name in the error.
pub fn check(what: &'static str, name: &str) -> Result<()> {
    let problem = if name.is_empty() {
        Some("is empty".to_string())
    } else if name.len() > MAX_NAME {
        Some(format!(
            "is {} characters long (at most {MAX_NAME})",
            name.len()
        ))
    } else if name.starts_with('.') {
        Some("starts with '.'".to_string())
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|c| format!("contains {c:?} (allowed: A-Z a-z 0-9 . _ -)"))
    };
    match problem {
        Some(why) => Err(Error::InvalidName {
            what,
            name: shown(name),
            why,
        }),
        None => Ok(()),
    }
}

/// A refused name as error messages show it: whole up to twice the longest accepted length,
/// else its beginning (an operator who pasted 10 000 characters needs to see which, not
/// all of them again).
fn shown(name: &str) -> String {
    if name.chars().count() <= 2 * MAX_NAME {
        return name.to_string();
    }
    let head: String = name.chars().take(MAX_NAME / 2).collect();
    format!("{head}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["a", "before-upgrade", "web01.v2_final", &"x".repeat(64)] {
            assert!(check("snapshot", n).is_ok(), "{n}");
        }
    }

    #[test]
    fn refuses_paths_and_odd_characters() {
        for n in [
            "",
            ".hidden",
            "..",
            "a/b",
            "../etc",
            "a b",
            "snap@1",
            "é",
            "a\0b",
            &"x".repeat(65),
        ] {
            assert!(check("snapshot", n).is_err(), "{n:?}");
        }
    }

    #[test]
    fn a_very_long_name_is_not_echoed_whole() {
        let Err(e) = check("snapshot", &"x".repeat(10_000)) else {
            panic!("a name of 10 000 characters passes");
        };
        let e = e.to_string();
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("10000 characters"), "{e}");
    }
}
