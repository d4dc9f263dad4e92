//! A small QMP client for the device model's monitor socket (`/run/xen/qmp-libxl-DOMID`).
//!
//! Protocol: the server greets with `{"QMP": {...}}`; the client sends `qmp_capabilities`
//! and then one command at a time as `{"execute": .., "arguments": .., "id": N}`; each command
//! gets `{"return": .., "id": N}` or `{"error": {"class": .., "desc": ..}, "id": N}`.
//! Asynchronous `{"event": ..}` messages may come at any point and are skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    /// The socket could not be used.
    #[error("QMP socket {0}")]
    Io(String, #[source] std::io::Error),
    /// No answer in time.
    #[error("no QMP answer within {0:?} ({1})")]
    Timeout(Duration, &'static str),
    /// The peer does not speak QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// The command was refused.
    #[error("{command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// Its description.
        desc: String,
    },
}

/// An open, negotiated QMP session.
#[derive(Debug)]
pub(crate) struct Qmp {
    stream: BufReader<UnixStream>,
    next_id: u64,
    timeout: Duration,
}

/// The longest line we accept from the server.
const MAX_LINE: usize = 16 << 20;

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities; each step within `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let io_err = |e| QmpError::Io(socket.display().to_string(), e);
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| QmpError::Timeout(timeout, "connect"))?
            .map_err(io_err)?;
        let mut qmp = Qmp {
            stream: BufReader::new(stream),
            next_id: 1,
            timeout,
        };
        let greeting = qmp.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        tokio::time::timeout(
            self.timeout,
            self.stream.get_mut().write_all(line.as_bytes()),
        )
        .await
        .map_err(|_| QmpError::Timeout(self.timeout, "send"))?
        .map_err(|e| QmpError::Io("write".into(), e))?;
        loop {
            let reply = self.read_message("reply").await?;
            if reply.get("event").is_some() {
                continue;
            }
            if reply.get("id") != Some(&json!(id)) {
                // An answer to someone else's command (ids are ours alone): not expected, skip.
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply {reply}")));
        }
    }

    async fn read_message(&mut self, what: &'static str) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = tokio::time::timeout(
                self.timeout,
                (&mut self.stream)
                    .take(MAX_LINE as u64)
                    .read_line(&mut line),
            )
            .await
            .map_err(|_| QmpError::Timeout(self.timeout, what))?
            .map_err(|e| QmpError::Io("read".into(), e))?;
            if n == 0 {
                return Err(QmpError::Protocol(format!(
                    "connection closed before the {what}"
                )));
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(line.trim())
                .map_err(|e| QmpError::Protocol(format!("bad JSON {:?}: {e}", line.trim())));
        }
    }
}

/// Runs `commands` in one session on `socket` (a fresh single-threaded runtime, as XenHost is
/// synchronous) and returns their results in order.
pub(crate) fn run(
    socket: &Path,
    timeout: Duration,
    commands: &[(&str, Option<Value>)],
) -> Result<Vec<Value>, QmpError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| QmpError::Io("runtime".into(), e))?;
    rt.block_on(async {
        let mut qmp = Qmp::connect(socket, timeout).await?;
        let mut out = Vec::new();
        for (cmd, args) in commands {
            out.push(qmp.execute(cmd, args.clone()).await?);
        }
        Ok(out)
    })
}

/// What to do with an internal snapshot of a block node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SnapshotOp {
    /// Only list the node's snapshots.
    List,
    /// Take snapshot `tag` unless the node has it.
    Create,
    /// Delete snapshot `tag` if the node has it.
    Delete,
}

/// Lists the internal snapshots of block node `node` and, in the same session, creates or
/// deletes `tag` when needed (idempotent). Returns the names as they were before; `None` if the
/// device model has no such node.
pub(crate) fn node_snapshots(
    socket: &Path,
    timeout: Duration,
    node: &str,
    tag: &str,
    op: SnapshotOp,
) -> Result<Option<Vec<String>>, QmpError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| QmpError::Io("runtime".into(), e))?;
    rt.block_on(async {
        let mut qmp = Qmp::connect(socket, timeout).await?;
        let nodes = qmp
            .execute("query-named-block-nodes", Some(json!({"flat": true})))
            .await?;
        let Some(names) = snapshot_names(&nodes, node) else {
            return Ok(None);
        };
        let has = names.iter().any(|n| n == tag);
        let args = Some(json!({"device": node, "name": tag}));
        match op {
            SnapshotOp::Create if !has => {
                qmp.execute("blockdev-snapshot-internal-sync", args).await?;
            }
            SnapshotOp::Delete if has => {
                qmp.execute("blockdev-snapshot-delete-internal-sync", args)
                    .await?;
            }
            _ => {}
        }
        Ok(Some(names))
    })
}

/// The snapshot names of `node` in a `query-named-block-nodes` answer.
fn snapshot_names(nodes: &Value, node: &str) -> Option<Vec<String>> {
    let info = nodes
        .as_array()?
        .iter()
        .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))?;
    Some(
        info.pointer("/image/snapshots")
            .and_then(Value::as_array)
            .map(|s| {
                s.iter()
                    .filter_map(|x| x.get("name").and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    use super::*;

    /// A server that sends `greeting`, then for each expected command (checked by its
    /// `execute`) sends the scripted lines, with `ID` replaced by the command's id.
    fn server(
        greeting: &'static str,
        script: Vec<(&'static str, Vec<&'static str>)>,
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp");
        let listener = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            writeln!(conn, "{greeting}").expect("greet");
            for (want, replies) in script {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let cmd: Value = serde_json::from_str(&line).expect("json");
                assert_eq!(cmd["execute"], want);
                for r in replies {
                    let r = r.replace("ID", &cmd["id"].to_string());
                    write!(conn, "{r}\r\n").expect("reply");
                }
            }
            // keep the connection open until the client is done
            let mut rest = String::new();
            let _ = reader.read_line(&mut rest);
        });
        (dir, path)
    }

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}"#;
    const T: Duration = Duration::from_secs(5);

    #[test]
    fn negotiates_skips_events_and_returns_results() {
        let (_d, path) = server(
            GREETING,
            vec![
                ("qmp_capabilities", vec![r#"{"return": {}, "id": ID}"#]),
                (
                    "query-named-block-nodes",
                    vec![
                        r#"{"event": "BLOCK_JOB_READY", "data": {}, "timestamp": {}}"#,
                        "",
                        r#"{"return": [{"node-name": "xvda-qcow2"}], "id": ID}"#,
                    ],
                ),
            ],
        );
        let out = run(
            &path,
            T,
            &[("query-named-block-nodes", Some(json!({"flat": true})))],
        )
        .expect("run");
        assert_eq!(out[0][0]["node-name"], "xvda-qcow2");
    }

    #[test]
    fn error_replies_become_command_errors() {
        let (_d, path) = server(
            GREETING,
            vec![
                ("qmp_capabilities", vec![r#"{"return": {}, "id": ID}"#]),
                (
                    "blockdev-snapshot-internal-sync",
                    vec![
                        r#"{"error": {"class": "GenericError", "desc": "Device 'x' not found"}, "id": ID}"#,
                    ],
                ),
            ],
        );
        let err = run(
            &path,
            T,
            &[(
                "blockdev-snapshot-internal-sync",
                Some(json!({"device": "x", "name": "s"})),
            )],
        )
        .expect_err("error");
        match err {
            QmpError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "blockdev-snapshot-internal-sync");
                assert_eq!(class, "GenericError");
                assert!(desc.contains("not found"));
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn silence_is_a_timeout_and_strangers_a_protocol_error() {
        let (_d, path) = server(GREETING, vec![("qmp_capabilities", vec![])]);
        let start = std::time::Instant::now();
        let err = run(&path, Duration::from_millis(300), &[]).expect_err("timeout");
        assert!(matches!(err, QmpError::Timeout(..)), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(3));
        let (_d, path) = server(r#"{"hello": 1}"#, vec![]);
        assert!(matches!(run(&path, T, &[]), Err(QmpError::Protocol(_))));
        let missing = std::env::temp_dir().join("domsnap-no-such-qmp-socket");
        assert!(matches!(run(&missing, T, &[]), Err(QmpError::Io(..))));
    }
}
