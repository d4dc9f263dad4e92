/// Result of a journal operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened, read or written.
    #[error("journal database {op}: {message}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// RocksDB's message.
        message: String,
    },
    /// Another process holds the journal's writer lock (who and which lock, in words).
    #[error("the journal is held by another domsnap process ({0})")]
    Busy(String),
    /// There is no journal in the directory.
    #[error("there is no journal in {}", .0.display())]
    Missing(std::path::PathBuf),
    /// A new journal was to be created where one exists.
    #[error("{} holds a journal already", .0.display())]
    Exists(std::path::PathBuf),
    /// A stored record failed its checks.
    #[error("journal corruption in {what}: {why}")]
    Corruption {
        /// Where (table and key).
        what: String,
        /// What check failed.
        why: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode a journal record: {0}")]
    Encode(String),
    /// The journal was written by a newer or unknown format.
    #[error("journal format version {found} is not supported (this build reads {supported})")]
    Version {
        /// Found on disk.
        found: u32,
        /// What this build understands.
        supported: u32,
    },
    /// Opened read-only; writing is not allowed.
    #[error("the journal is open read-only")]
    ReadOnly,
    /// A file or directory of the journal is unusable.
    #[error("journal file {}", .path.display())]
    Io {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
