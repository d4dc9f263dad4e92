//! qcow2 snapshot operations (to be written).
#![warn(missing_docs)]

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// I/O on the image failed.
    #[error("{op}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
