//! Who a journal belongs to, and who may write it.
//!
//! - [`StateId`]: a random 128-bit id given to a state directory when its first journal is
//!   created. The journal keeps it in its `meta` family (with the journal's first sequence
//!   number); the stores the journal governs keep it beside their data, so that a journal
//!   from elsewhere, or none, is noticed before anything is written.
//! - [`WriterLock`]: the one-writer lock, an `flock` on the file `<journal dir>.lock` beside
//!   the database. Taking it never blocks; a held lock is [`Error::Busy`], decided by
//!   `flock`'s `EWOULDBLOCK`, not by any message text. Readers never take it (they open the
//!   database read-only and write nothing).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::event::Seq;

/// A state directory's identity: 16 random bytes, shown as 32 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StateId(pub [u8; 16]);

impl StateId {
    /// A fresh random id (from `/dev/urandom`).
    pub fn random() -> Result<StateId> {
        let path = Path::new("/dev/urandom");
        let mut bytes = [0u8; 16];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(StateId(bytes))
    }
}

impl fmt::Display for StateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for StateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateId({self})")
    }
}

impl FromStr for StateId {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<StateId, String> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("state id {s:?} is not 32 hex digits"));
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(StateId(out))
    }
}

/// What a journal records about itself in `meta`: whose it is and where its sequence
/// numbers start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalIdentity {
    /// The state directory the journal belongs to.
    pub state: StateId,
    /// Sequence number of its first event: 1 for a state directory's first journal; above
    /// every operation id ever used for a journal that replaces a lost one.
    pub first_seq: Seq,
}

impl JournalIdentity {
    /// A new state directory's first journal: a random id, sequence numbers from 1.
    pub fn fresh() -> Result<JournalIdentity> {
        Ok(JournalIdentity {
            state: StateId::random()?,
            first_seq: 1,
        })
    }
}

/// The journal's writer lock, held until dropped. See the module documentation.
#[derive(Debug)]
pub struct WriterLock {
    path: PathBuf,
    _file: File,
}

impl WriterLock {
    /// The lock file of the journal in directory `journal`: `<journal>.lock`.
    pub fn path_for(journal: &Path) -> PathBuf {
        let mut name = journal.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        journal.with_file_name(name)
    }

    /// Takes the writer lock of the journal in directory `journal` without waiting,
    /// creating its lock file (mode 0600) if needed. [`Error::Busy`] (naming the holder's
    /// pid when known) if another process holds it.
    pub fn acquire(journal: &Path) -> Result<WriterLock> {
        let path = Self::path_for(journal);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {
                // The pid is for the message a second writer shows; the lock is the flock.
                file.set_len(0).map_err(io)?;
                writeln!(file, "{}", std::process::id()).map_err(io)?;
                Ok(WriterLock { path, _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .map(|pid| format!("pid {pid}"))
                    .unwrap_or_else(|| "pid unknown".into());
                Err(Error::Busy(format!("{holder}, lock {}", path.display())))
            }
            Err(std::fs::TryLockError::Error(source)) => Err(io(source)),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn state_ids_print_and_parse() {
        let id = StateId::random().unwrap();
        assert_ne!(id, StateId::random().unwrap());
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<StateId>().unwrap(), id);
        for bad in ["", "abc", &"g".repeat(32), &"a".repeat(33)] {
            assert!(bad.parse::<StateId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn lock_files_sit_beside_the_journal() {
        assert_eq!(
            WriterLock::path_for(Path::new("/s/journal")),
            Path::new("/s/journal.lock")
        );
    }
}
