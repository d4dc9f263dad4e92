//! The error type of the `disk` crate.

use std::path::PathBuf;

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// I/O on the image (or its directory) failed.
    #[error("{op} on {}", path.display())]
    Io {
        /// What was being done (`"read L2 table"`, `"fsync"`, ...).
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The image's metadata contradicts the qcow2 format or itself.
    #[error("{} is corrupt: {what}", path.display())]
    Corruption {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The image uses a feature this crate does not handle (encryption, external data file, ...).
    #[error("{} uses an unsupported feature: {what}", path.display())]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// The feature.
        what: String,
    },
    /// A snapshot of that name already exists.
    #[error("{} already has a snapshot named {name:?}", path.display())]
    SnapshotExists {
        /// The image.
        path: PathBuf,
        /// The name asked for.
        name: String,
    },
    /// No snapshot of that name exists.
    #[error("{} has no snapshot named {name:?}", path.display())]
    NoSuchSnapshot {
        /// The image.
        path: PathBuf,
        /// The name asked for.
        name: String,
    },
    /// The caller passed an unusable argument (cluster size, name length, ...).
    #[error("invalid argument for {}: {what}", path.display())]
    InvalidArgument {
        /// The image.
        path: PathBuf,
        /// What is wrong with the argument.
        what: String,
    },
    /// The image file exists already (creation never overwrites).
    #[error("{} exists already", path.display())]
    AlreadyExists {
        /// The image.
        path: PathBuf,
    },
    /// Another process (QEMU, or a [`crate::DataImage`]) has the image open in a way that
    /// conflicts (see QEMU's image locking).
    #[error("{} is in use by another process", path.display())]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// An armed failpoint stopped the operation (only with the `failpoints` feature).
    #[error("failpoint {0} triggered")]
    FailPoint(&'static str),
}

/// Result of the `disk` crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io<'p>(
    op: &'static str,
    path: &'p std::path::Path,
) -> impl FnOnce(std::io::Error) -> Error + 'p {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
