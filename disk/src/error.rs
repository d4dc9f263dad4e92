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
    /// An `lvm` command failed (or printed what cannot be read).
    #[error("`{command}` failed ({status}): {stderr}")]
    Lvm {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// No logical volume of that name.
    #[error("no logical volume {volume}")]
    NoSuchVolume {
        /// `vg/lv`.
        volume: String,
    },
    /// The logical volume is not a thin volume (a thick, linear or striped one, or a pool).
    #[error(
        "{volume} is not an LVM thin volume (lv_attr {attr}): only thin volumes have \
         instant snapshots that stay valid; move the disk to a thin pool"
    )]
    NotThin {
        /// `vg/lv`.
        volume: String,
        /// Its `lv_attr`.
        attr: String,
    },
    /// The thin pool has too little free space for one more snapshot.
    #[error(
        "thin pool {pool} of {volume} is full ({data_percent:.1}% data, \
         {metadata_percent:.1}% metadata used; limit {limit_percent}%): no new snapshot; \
         extend the pool (lvextend) or delete snapshots"
    )]
    ThinPoolFull {
        /// `vg/lv` of the volume to snapshot.
        volume: String,
        /// `vg/pool`.
        pool: String,
        /// Data usage, percent.
        data_percent: f64,
        /// Metadata usage, percent.
        metadata_percent: f64,
        /// The usage at which snapshots are refused.
        limit_percent: f64,
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
