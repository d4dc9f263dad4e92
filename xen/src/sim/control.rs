//! The guest's control protocol, spoken on `control.sock` (as QMP is for a Xen guest's QEMU).
//!
//! One request per line, one answer per line, both JSON objects:
//!
//! ```text
//! → {"execute":"status"}
//! ← {"ok":true,"state":"running","n":1234,"pid":4242,"steps":1300,"parked":false,"boot":7311}
//! → {"execute":"snapshot-create","disk":"xvda","tag":"s1"}
//! ← {"ok":true}
//! → {"execute":"pause"}
//! ← {"ok":false,"error":"..."}
//! ```
//!
//! Requests: `status`, `pause` (answers once the vCPU has stopped, the disks are flushed and
//! the memory file is synced), `unpause`, `snapshot-create {disk, tag}`,
//! `snapshot-delete {disk, tag}` (both idempotent), `external-snapshot {disk, overlay}`
//! (create the overlay on the disk's current image, switch the disk to it and record that in
//! `domain.json`; idempotent), `rebase-image {disk, image, backing}` (rebase `image`, the
//! disk's current image or one of its backing chain, onto `backing` or none, with the disk
//! closed), `reset-dirty {base}` (clear the dirty-page log, see `dirty.rs`),
//! `load-memory {path}` (write a file into memory as the vCPU would: a test and benchmark
//! hook), `quit` (stop the vCPU, flush, exit 0; answered before the process exits).
//! Image names are file names inside the domain directory, checked by both sides.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::RunState;

/// A request to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "execute", rename_all = "kebab-case")]
pub(crate) enum Request {
    Status,
    Pause,
    Unpause,
    SnapshotCreate {
        disk: String,
        tag: String,
    },
    SnapshotDelete {
        disk: String,
        tag: String,
    },
    ExternalSnapshot {
        disk: String,
        overlay: String,
    },
    RebaseImage {
        disk: String,
        image: String,
        backing: Option<String>,
    },
    /// Clear the dirty-page log and name what it is now relative to.
    ResetDirty {
        base: u64,
    },
    /// Copy a file of the memory's size into memory, as the vCPU would write it (pages
    /// that differ are marked dirty).
    LoadMemory {
        path: String,
    },
    Quit,
}

impl Request {
    /// How long the host waits for the answer.
    fn timeout(&self) -> Duration {
        match self {
            Request::Status | Request::Unpause => Duration::from_secs(10),
            _ => Duration::from_secs(120),
        }
    }
}

/// The guest's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `running` or `paused` (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RunState>,
    /// The counter the vCPU last stored in memory (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    /// The guest's process id (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Iterations of the workload the vCPU has run (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Whether the vCPU thread has stopped and waits to be let run (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<bool>,
    /// The token the guest drew when it started: one per boot (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u64>,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            ..Response::default()
        }
    }
}

/// Why talking to the guest failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// Nobody listens on the socket (no guest, or a stale socket).
    NotListening(std::io::Error),
    /// The guest accepted the connection but the exchange failed (timeout, bad answer…).
    Exchange(String),
    /// The guest answered `{"ok":false}`.
    Refused(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotListening(e) => write!(f, "control socket does not answer: {e}"),
            CallError::Exchange(m) => write!(f, "control socket: {m}"),
            CallError::Refused(m) => write!(f, "{m}"),
        }
    }
}

/// Longest socket path `bind`/`connect` take directly (`sun_path` is 108 bytes).
const MAX_SOCKET_PATH: usize = 100;

/// Connects to the socket at `path`; long paths go through `/proc/self/fd/N/` of the
/// directory.
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return UnixStream::connect(path);
    }
    let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
        return UnixStream::connect(path);
    };
    let dir = std::fs::File::open(dir)?;
    let short: PathBuf = Path::new("/proc/self/fd")
        .join(std::os::fd::AsRawFd::as_raw_fd(&dir).to_string())
        .join(file);
    UnixStream::connect(short)
}

/// Sends `request` to the guest listening on `socket` and waits for its answer.
pub(crate) fn call(socket: &Path, request: &Request) -> Result<Response, CallError> {
    let stream = connect(socket).map_err(CallError::NotListening)?;
    let timeout = Some(request.timeout());
    let exchange = |e: std::io::Error| CallError::Exchange(e.to_string());
    stream.set_read_timeout(timeout).map_err(exchange)?;
    stream.set_write_timeout(timeout).map_err(exchange)?;
    let mut line =
        serde_json::to_string(request).map_err(|e| CallError::Exchange(e.to_string()))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(exchange)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(exchange)?;
    if answer.is_empty() {
        return Err(CallError::Exchange(
            "the guest closed the connection without answering".into(),
        ));
    }
    let response: Response = serde_json::from_str(&answer)
        .map_err(|e| CallError::Exchange(format!("bad answer {answer:?}: {e}")))?;
    if !response.ok {
        return Err(CallError::Refused(
            response
                .error
                .unwrap_or_else(|| "refused without a reason".into()),
        ));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged() {
        let json = serde_json::to_string(&Request::SnapshotCreate {
            disk: "xvda".into(),
            tag: "t".into(),
        })
        .expect("serialize");
        assert_eq!(
            json,
            r#"{"execute":"snapshot-create","disk":"xvda","tag":"t"}"#
        );
        let back: Request = serde_json::from_str(r#"{"execute":"status"}"#).expect("parse");
        assert_eq!(back, Request::Status);
        let r: Response =
            serde_json::from_str(r#"{"ok":true,"state":"paused","n":7}"#).expect("parse");
        assert_eq!(r.state, Some(RunState::Paused));
        assert_eq!(r.n, Some(7));
    }
}
