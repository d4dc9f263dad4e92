/// Result of a bundle operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an export or an import failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The destination holds no bundle of that domain and snapshot.
    #[error("no bundle of {domain}/{snapshot} at {location}")]
    NotFound {
        /// The domain asked for.
        domain: String,
        /// The snapshot asked for.
        snapshot: String,
        /// Where it was looked for.
        location: String,
    },
    /// An object the bundle needs is missing or shorter than the bundle says.
    #[error("bundle {bundle} is incomplete: {object} {what}")]
    Missing {
        /// `domain/snapshot`.
        bundle: String,
        /// The object.
        object: String,
        /// What is wrong (`is missing`, `is 10 bytes long, 20 needed`).
        what: String,
    },
    /// An object of the bundle does not hold what its name or checksum promises.
    #[error("bundle {bundle} is damaged: {object}: {what}")]
    Damaged {
        /// `domain/snapshot`.
        bundle: String,
        /// The object.
        object: String,
        /// What is wrong.
        what: String,
    },
    /// The caller asked for something the bundle cannot do (a name that cannot be an
    /// object name, a disk that does not exist, …).
    #[error("{0}")]
    Invalid(String),
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Reading a disk's snapshot or writing an image failed.
    #[error(transparent)]
    Disk(#[from] disk::Error),
    /// Reading the memory image or writing it out failed.
    #[error("{op}")]
    Io {
        /// What was being done.
        op: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the error says the bundle itself is bad (missing, incomplete or damaged), as
    /// opposed to a failure to reach or write something.
    pub fn is_bad_bundle(&self) -> bool {
        matches!(
            self,
            Error::NotFound { .. } | Error::Missing { .. } | Error::Damaged { .. }
        )
    }
}
