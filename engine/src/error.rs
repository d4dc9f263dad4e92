use std::path::PathBuf;

/// Result of an engine operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is: what the caller can do about it. The CLI maps each
/// to an exit code; nothing ever reads an error's text to tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request was refused (bad input, wrong state): nothing was changed.
    User,
    /// Another domsnap operation holds the domain or the journal: nothing was changed.
    Busy,
    /// The domain has an unfinished operation that only `domsnap recover` may continue.
    NeedsRecovery,
    /// Stored state cannot be read or does not add up (journal, memory store, images).
    Corruption,
    /// The journal does not belong with the stores beside it (missing, another state
    /// directory's, an older copy): nothing was changed; `domsnap recover --adopt` is the
    /// way out.
    Identity,
    /// The operation failed (the message says what was rolled back or what comes next).
    Failure,
}

impl ErrorKind {
    /// Lower-case name, for `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::User => "user",
            ErrorKind::Busy => "busy",
            ErrorKind::NeedsRecovery => "needs-recovery",
            ErrorKind::Corruption => "corruption",
            ErrorKind::Identity => "identity",
            ErrorKind::Failure => "failure",
        }
    }

    /// Whether an error of this kind guarantees that nothing was changed.
    pub fn changed_nothing(self) -> bool {
        matches!(
            self,
            ErrorKind::User | ErrorKind::Busy | ErrorKind::NeedsRecovery | ErrorKind::Identity
        )
    }
}

/// What became of an operation whose step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aftermath {
    /// Rolled back: nothing of it remains.
    RolledBack,
    /// Left open: the next command's recovery finishes it.
    Unfinished,
    /// Marked as needing `domsnap recover`.
    NeedsRecovery,
}

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
    /// The domain has an operation that is still open (interrupted and not recovered, or
    /// marked as needing recovery): only `domsnap recover` may run on it.
    #[error(
        "domain {domain:?} has an unfinished {kind} (operation {op}){why}; \
         run `domsnap recover` before anything else on it"
    )]
    Unfinished {
        /// Domain.
        domain: String,
        /// The open operation.
        op: u64,
        /// Its kind.
        kind: &'static str,
        /// What stops it (": …"), if known.
        why: String,
    },
    /// Recovery will not act on a boot of the domain that the operation did not record: it
    /// was started after the interruption.
    #[error(
        "domain {domain:?} runs a boot (instance {instance}) that operation {op} did not \
         start: it was started after the interruption; `domsnap recover --force` finishes \
         the operation on it anyway"
    )]
    ForeignBoot {
        /// Domain.
        domain: String,
        /// The interrupted operation.
        op: u64,
        /// The boot found.
        instance: u64,
    },
    /// The operation was recorded on another kind of host than this command drives.
    #[error(
        "operation {op} ({kind} of domain {domain:?}) was recorded on the {recorded} host; \
         recover it with `domsnap --host {recorded} recover`"
    )]
    WrongHost {
        /// The operation.
        op: u64,
        /// Its kind.
        kind: &'static str,
        /// Its domain.
        domain: String,
        /// The host kind it was recorded on.
        recorded: String,
    },
    /// A journaled operation cannot be read (an unknown step, a missing first event).
    #[error("operation {op}: {what} {why}")]
    Corrupt {
        /// The operation.
        op: u64,
        /// What could not be read.
        what: String,
        /// What is wrong with it.
        why: String,
    },
    /// A step failed; the operation was rolled back, left for the next command, or marked
    /// as needing recovery, as `aftermath` says.
    #[error("{op} {domain}{}: step {step} failed; {aftermath}", slash(.snapshot))]
    StepFailed {
        /// Operation kind.
        op: &'static str,
        /// Domain.
        domain: String,
        /// Snapshot.
        snapshot: String,
        /// Step.
        step: String,
        /// What was done about it, in words.
        aftermath: String,
        /// What was done about it.
        outcome: Aftermath,
        /// The cause.
        #[source]
        source: Box<Error>,
    },
    /// A failpoint made a step fail (tests only; feature `failpoints`).
    #[error("failure injected at {point}")]
    Injected {
        /// The failpoint.
        point: String,
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
    /// The journal does not belong with the stores beside it (missing, from another state
    /// directory, older than what the stores have seen). Nothing was changed.
    #[error("{0}; {remedy}", remedy = .0.remedy())]
    Identity(crate::identity::Mismatch),
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

impl From<crate::identity::Mismatch> for Error {
    fn from(m: crate::identity::Mismatch) -> Error {
        Error::Identity(m)
    }
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidName { .. }
            | Error::Refused(_)
            | Error::NoSuchSnapshot { .. }
            | Error::SnapshotExists { .. }
            | Error::WrongHost { .. } => ErrorKind::User,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Unfinished { .. } | Error::ForeignBoot { .. } => ErrorKind::NeedsRecovery,
            Error::StepFailed {
                outcome, source, ..
            } => match outcome {
                Aftermath::NeedsRecovery => ErrorKind::NeedsRecovery,
                // Undone entirely: the cause tells whether it was a request that could not
                // be carried out, damaged stored state, or a failure.
                Aftermath::RolledBack => match source.kind() {
                    kind @ (ErrorKind::User | ErrorKind::Corruption) => kind,
                    _ => ErrorKind::Failure,
                },
                Aftermath::Unfinished => ErrorKind::Failure,
            },
            Error::Corrupt { .. } => ErrorKind::Corruption,
            Error::Identity(_) => ErrorKind::Identity,
            Error::Host(e) => host_kind(e),
            Error::Journal(journal::Error::Busy(_)) => ErrorKind::Busy,
            Error::Journal(journal::Error::Corruption { .. } | journal::Error::Version { .. }) => {
                ErrorKind::Corruption
            }
            Error::Journal(_) => ErrorKind::Failure,
            Error::Memory(e) if e.is_corruption() => ErrorKind::Corruption,
            Error::Memory(_) | Error::Io { .. } | Error::Injected { .. } => ErrorKind::Failure,
        }
    }

    /// Whether the error comes from the request (bad input, wrong state), not a failure.
    pub fn is_user_error(&self) -> bool {
        self.kind() == ErrorKind::User
    }

    /// Whether the journal does not belong with the stores beside it.
    pub fn is_identity_mismatch(&self) -> bool {
        self.kind() == ErrorKind::Identity
    }

    /// Whether another operation holds what was asked for.
    pub fn is_busy(&self) -> bool {
        self.kind() == ErrorKind::Busy
    }
}

/// `/name`, or nothing for no name.
fn slash(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!("/{name}")
    }
}

/// The kind of a host error.
pub fn host_kind(e: &xen::Error) -> ErrorKind {
    match e {
        xen::Error::Disk {
            source: disk::Error::Corruption { .. },
            ..
        } => ErrorKind::Corruption,
        e if e.is_user_error() => ErrorKind::User,
        _ => ErrorKind::Failure,
    }
}
