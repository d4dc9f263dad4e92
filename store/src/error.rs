/// Result of an object store call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure: callers decide by kind, never by message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No object of that name.
    NotFound,
    /// The object ends before the range asked for.
    Short,
    /// The name is not an acceptable object name (a bug in the caller: names are domsnap's).
    InvalidName,
    /// The store was opened read-only.
    ReadOnly,
    /// The device or pool is full (ENOSPC, a full Ceph pool, a quota).
    NoSpace,
    /// The store could not be reached or answered with an error (I/O error, connection
    /// refused, timeout, permission).
    Unavailable,
}

/// Why an object store call failed: the kind, what was being done, on which object.
#[derive(Debug, thiserror::Error)]
#[error("object store: cannot {op} {name:?}{}", detail(message))]
pub struct Error {
    kind: ErrorKind,
    op: &'static str,
    name: String,
    message: String,
    #[source]
    source: Option<std::io::Error>,
}

impl Error {
    /// An error of `kind` while doing `op` on object `name`.
    pub fn new(kind: ErrorKind, op: &'static str, name: &str, message: String) -> Error {
        Error {
            kind,
            op,
            name: name.to_string(),
            message,
            source: None,
        }
    }

    /// An I/O error while doing `op` on object `name`; the kind follows from the error
    /// (`NotFound`, `NoSpace` for ENOSPC/EDQUOT, `ReadOnly` for EROFS, else `Unavailable`).
    pub fn io(op: &'static str, name: &str, source: std::io::Error) -> Error {
        let kind = match source.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::UnexpectedEof => ErrorKind::Short,
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                ErrorKind::NoSpace
            }
            std::io::ErrorKind::ReadOnlyFilesystem => ErrorKind::ReadOnly,
            _ => ErrorKind::Unavailable,
        };
        Error {
            kind,
            op,
            name: name.to_string(),
            message: String::new(),
            source: Some(source),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The object it concerns.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The message part of the display: only where no source error carries it.
fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}
