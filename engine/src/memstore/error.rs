use std::path::{Path, PathBuf};

/// Result of a memory store operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a memory store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory of the store could not be used.
    #[error("memory store: cannot {op} {}", path.display())]
    Io {
        /// What was being done (`create`, `sync`, `read`, …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stored chunk does not match its id (or cannot be read in full).
    #[error("memory image {image}: chunk {chunk} at {}:{offset} is corrupt: {why}", pack.display())]
    Corruption {
        /// Image being read.
        image: String,
        /// Chunk id (hex).
        chunk: String,
        /// Pack file holding it.
        pack: PathBuf,
        /// Offset of its data in the pack.
        offset: u64,
        /// What check failed.
        why: String,
    },
    /// Every chunk matched, but the whole image did not hash to its id.
    #[error("memory image {image}: the restored bytes hash to {found}")]
    ImageHash {
        /// Image id.
        image: String,
        /// What the bytes hashed to.
        found: String,
    },
    /// The index could not be read or a record in it is corrupt.
    #[error("memory store index")]
    Journal(#[from] journal::Error),
    /// No image with this id is stored.
    #[error("no memory image {0}")]
    NoSuchImage(String),
    /// The index contradicts itself (a manifest names a missing chunk, a count underflows).
    #[error("memory store index is inconsistent: {0}")]
    Inconsistent(String),
    /// The object store failed.
    #[error("memory store")]
    Store(#[from] store::Error),
    /// A pack object is not a readable pack (damaged, truncated, or not a pack).
    #[error("memory store: pack {object} is damaged: {why}")]
    BadPack {
        /// Its object name.
        object: String,
        /// What is wrong.
        why: String,
    },
    /// A pack the index records is not in the store.
    #[error("memory store: pack {0} is missing")]
    MissingPack(String),
    /// A manifest object cannot be read as one.
    #[error("memory store: manifest {object} is damaged: {why}")]
    BadManifest {
        /// Its object name.
        object: String,
        /// What is wrong.
        why: String,
    },
    /// A manifest an image needs is not in the store.
    #[error("memory store: manifest {0} is missing")]
    MissingManifest(String),
    /// A failpoint fired (tests).
    #[error("failpoint {0}")]
    Failpoint(&'static str),
    /// An earlier write into the image writer failed; the image cannot be finished.
    #[error("the image writer failed earlier; the image is incomplete")]
    Poisoned,
}

impl Error {
    /// Whether this is damage to stored data (as opposed to an I/O or index failure).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::Corruption { .. }
                | Error::ImageHash { .. }
                | Error::BadPack { .. }
                | Error::MissingPack(_)
                | Error::BadManifest { .. }
                | Error::MissingManifest(_)
        )
    }
}

/// Maps an I/O error to [`Error::Io`].
pub(crate) fn io<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
