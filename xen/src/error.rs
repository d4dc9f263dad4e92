use std::path::PathBuf;

use crate::RunState;

/// Result of a host operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host has no domain of that name.
    #[error("no domain named {0:?} on this host")]
    NoSuchDomain(String),
    /// The domain exists already (define).
    #[error("a domain named {0:?} exists already")]
    DomainExists(String),
    /// The domain is in a state the operation cannot start from.
    #[error("domain {domain:?} is {state}; {operation} needs it {needs}")]
    WrongState {
        /// Domain name.
        domain: String,
        /// Its state now.
        state: RunState,
        /// What was asked.
        operation: &'static str,
        /// The state(s) the operation needs, in words.
        needs: &'static str,
    },
    /// The domain has no disk with that target.
    #[error("domain {domain:?} has no disk {target:?}")]
    NoSuchDisk {
        /// Domain name.
        domain: String,
        /// Disk target asked for.
        target: String,
    },
    /// The disk image has no snapshot with that tag.
    #[error("disk {target:?} of domain {domain:?} has no snapshot {tag:?}")]
    NoSuchDiskSnapshot {
        /// Domain name.
        domain: String,
        /// Disk target.
        target: String,
        /// Snapshot tag.
        tag: String,
    },
    /// Bad input from the user (name, size, configuration).
    #[error("{0}")]
    Invalid(String),
    /// The host does not implement what was asked.
    #[error("the {host} host does not support {}", feature.as_str())]
    Unsupported {
        /// The host's kind (`sim`, `xen`).
        host: &'static str,
        /// What it lacks.
        feature: crate::Feature,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An operation on a qcow2 image failed.
    #[error("disk image {path}")]
    Disk {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: disk::Error,
    },
    /// The device model (or the simulated guest process) failed or did not answer.
    #[error("device model of domain {domain:?}: {message}")]
    DeviceModel {
        /// Domain name.
        domain: String,
        /// What went wrong.
        message: String,
    },
    /// A toolstack command (`xl ...`) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Toolstack {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The memory stream could not be written or read.
    #[error("memory stream of domain {domain:?}")]
    Stream {
        /// Domain name.
        domain: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// An [`Error::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// Whether the error was caused by the caller's input rather than by a failure.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::NoSuchDomain(_)
                | Error::DomainExists(_)
                | Error::WrongState { .. }
                | Error::NoSuchDisk { .. }
                | Error::NoSuchDiskSnapshot { .. }
                | Error::Invalid(_)
                | Error::Unsupported { .. }
        )
    }
}
