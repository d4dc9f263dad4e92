//! domsnap's engine: operations as journaled step plans, recovery, the snapshot catalog and
//! the memory image store.
//!
//! - [`plan`]: the steps and, in one table, what recovery does with each.
//! - [`create`], [`revert`], [`delete`]: the operations.
//! - [`recovery`]: what runs at every start.
//! - [`query`], [`verify`]: read-only views and checks.
//! - [`memstore`]: content-addressed memory images.
#![warn(missing_docs)]

pub mod create;
pub mod delete;
mod engine;
mod error;
pub mod memstore;
pub mod names;
pub mod plan;
pub mod query;
pub mod recovery;
pub mod revert;
pub mod verify;

pub use create::CreateRequest;
pub use delete::DeleteRequest;
pub use engine::{Access, Engine, Observer, Quiet, DEFAULT_WAIT};
pub use error::{Error, Result};
pub use query::{HistoryFilter, OpView, SnapshotView};
pub use revert::RevertRequest;
pub use verify::VerifyReport;

/// The user running this process, for the journal.
pub(crate) fn whoami() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}
