//! domsnap's engine: operations as journaled step plans, recovery, the snapshot catalog and
//! the memory image store.
//!
//! - [`plan`]: the steps, one description per operation kind, and the tables of what
//!   recovery does with each, rendered from them.
//! - [`create`], [`revert`], [`delete`], [`domain`]: the operations; `runner.rs` carries
//!   out every one of them, new or recovered.
//! - [`recovery`]: what runs before every command that writes.
//! - [`adopt`]: a new journal from what is on disk, for a state directory that lost its own.
//! - [`query`], [`verify`]: read-only views and checks.
//! - [`memstore`]: content-addressed memory images.
//! - [`identity`]: the state id that ties the journal to the stores it governs.
#![warn(missing_docs)]

pub mod adopt;
pub mod create;
pub mod delete;
pub mod domain;
mod engine;
mod error;
pub mod identity;
pub mod memstore;
pub mod names;
pub mod plan;
pub mod query;
pub mod recovery;
pub mod revert;
mod runner;
pub mod verify;

pub use adopt::AdoptReport;
pub use create::CreateRequest;
pub use delete::DeleteRequest;
pub use domain::DomainAction;
pub use engine::{Access, Engine, Observer, OpenOp, Quiet, DEFAULT_WAIT};
pub use error::{host_kind, Aftermath, Error, ErrorKind, Result};
pub use query::{HistoryFilter, OpView, SnapshotView};
pub use recovery::{RecoverMode, Recovered};
pub use revert::RevertRequest;
pub use verify::{DiskCheck, VerifyReport};

/// The user running this process, for the journal: `$SUDO_USER` when run through sudo, else
/// the name of the process's user id in /etc/passwd, else `uid N`.
pub(crate) fn whoami() -> String {
    use std::os::unix::fs::MetadataExt;
    if let Ok(user) = std::env::var("SUDO_USER") {
        return user;
    }
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown".into();
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id = fields.nth(1)?.parse::<u32>().ok()?;
            (id == uid).then(|| name.to_string())
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}
