use std::path::PathBuf;

/// Result of an engine operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name from the user is not acceptable.
    #[error("{what} name {name:?} {why}")]
    InvalidName {
        /// `snapshot` or `domain`.
        what: &'static str,
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The request cannot be carried out as asked (bad combination, wrong state).
    #[error("{0}")]
    Refused(String),
    /// The domain has no snapshot of that name.
    #[error("domain {domain:?} has no snapshot named {name:?}")]
    NoSuchSnapshot {
        /// Domain.
        domain: String,
        /// Snapshot.
        name: String,
    },
    /// The domain has a snapshot of that name already.
    #[error("domain {domain:?} already has a snapshot named {name:?}")]
    SnapshotExists {
        /// Domain.
        domain: String,
        /// Snapshot.
        name: String,
    },
    /// Another domsnap operation holds the domain.
    #[error("domain {domain:?} is busy: another domsnap operation on it is in progress{holder}")]
    Busy {
        /// Domain.
        domain: String,
        /// Who holds it, if known (" (pid N)").
        holder: String,
    },
    /// A step failed; the operation was rolled back (or will be by recovery).
    #[error("{op} {domain}/{snapshot}: step {step} failed; {aftermath}")]
    StepFailed {
        /// Operation kind.
        op: &'static str,
        /// Domain.
        domain: String,
        /// Snapshot.
        snapshot: String,
        /// Step.
        step: String,
        /// What was done about it.
        aftermath: String,
        /// The cause.
        #[source]
        source: Box<Error>,
    },
    /// The host failed.
    #[error(transparent)]
    Host(#[from] xen::Error),
    /// The journal failed.
    #[error(transparent)]
    Journal(#[from] journal::Error),
    /// The memory image store failed.
    #[error(transparent)]
    Memory(#[from] crate::memstore::Error),
    /// A state file could not be used.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the error comes from the request (bad input, wrong state), not a failure.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::InvalidName { .. }
            | Error::Refused(_)
            | Error::NoSuchSnapshot { .. }
            | Error::SnapshotExists { .. } => true,
            Error::Host(e) => e.is_user_error(),
            _ => false,
        }
    }

    /// Whether another operation holds what was asked for.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            Error::Busy { .. } | Error::Journal(journal::Error::Busy(_))
        )
    }
}
