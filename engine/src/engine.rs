//! The engine: one journal, one host, one memory image store, and the step runner every
//! operation goes through.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use journal::{DomainCatalog, Event, Journal, Mode, OpId, OpKind, Outcome};
use xen::{DomainInfo, Host};

use crate::error::{Error, Result};
use crate::memstore::MemStore;
use crate::names;
use crate::plan::Failpoint;
use crate::recovery::RecoverMode;

/// What the engine tells its user while it works (progress bars, messages).
pub trait Observer: Sync {
    /// A step started (`begun = true`) or ended.
    fn step(&self, op: OpId, step: &str, begun: bool) {
        let _ = (op, step, begun);
    }
    /// Bytes moved so far by a memory step, of `total`.
    fn bytes(&self, done: u64, total: u64) {
        let _ = (done, total);
    }
    /// A message for the operator (waiting, recovery).
    fn note(&self, message: &str) {
        let _ = message;
    }
}

/// An observer that says nothing.
#[derive(Debug)]
pub struct Quiet;
impl Observer for Quiet {}

/// How long a writer waits for another domsnap process to release the journal.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(600);

/// What a command needs from the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// It changes things: wait for the journal, recover first.
    Write,
    /// It only reads: recover if the journal is free, else read beside the writer.
    Read,
}

/// The domsnap engine.
pub struct Engine {
    pub(crate) state: PathBuf,
    pub(crate) journal: Journal,
    pub(crate) host: Box<dyn Host>,
    pub(crate) memory: MemStore,
    pub(crate) observer: Box<dyn Observer>,
    locks: BTreeMap<String, File>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("state", &self.state)
            .field("host", &self.host.kind())
            .finish()
    }
}

/// A domain lock file: `<state>/locks/<domain>.lock`, holding the pid of its owner.
fn lock_path(state: &Path, domain: &str) -> PathBuf {
    state.join("locks").join(format!("{domain}.lock"))
}

/// Takes the lock of `domain` without waiting; [`Error::Busy`] if another process has it.
pub(crate) fn lock_domain(state: &Path, domain: &str) -> Result<File> {
    names::check("domain", domain)?;
    let path = lock_path(state, domain);
    let dir = state.join("locks");
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        op: "create lock directory",
        path: dir,
        source,
    })?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| Error::Io {
            op: "open lock file",
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).ok();
            let _ = writeln!(file, "{}", std::process::id());
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            Err(Error::Busy {
                domain: domain.to_string(),
                holder,
            })
        }
        Err(std::fs::TryLockError::Error(source)) => Err(Error::Io {
            op: "lock",
            path,
            source,
        }),
    }
}

impl Engine {
    /// Opens the engine on state directory `state` with `host`.
    ///
    /// With [`Access::Write`], `domain` (if given) is locked first — a second operation on
    /// the same domain is refused at once with [`Error::Busy`] — then the journal is opened
    /// for writing, waiting up to `wait` for another domsnap process to finish. Every
    /// interrupted operation is then recovered before anything else happens.
    pub fn open(
        state: &Path,
        host: Box<dyn Host>,
        access: Access,
        domain: Option<&str>,
        wait: Duration,
        observer: Box<dyn Observer>,
    ) -> Result<Engine> {
        std::fs::create_dir_all(state).map_err(|source| Error::Io {
            op: "create state directory",
            path: state.to_path_buf(),
            source,
        })?;
        let mut locks = BTreeMap::new();
        if let (Access::Write, Some(d)) = (access, domain) {
            locks.insert(d.to_string(), lock_domain(state, d)?);
        }
        let db = state.join("journal");
        let journal = match access {
            Access::Write => open_waiting(&db, wait, observer.as_ref())?,
            Access::Read => match Journal::open(&db, Mode::Primary) {
                Err(journal::Error::Busy(_)) if db.exists() => Journal::open(&db, Mode::ReadOnly)?,
                other => other?,
            },
        };
        let memory = MemStore::open(
            &state.join("memory"),
            crate::memstore::DEFAULT_STATE,
            journal.mode() != Mode::Primary,
        )?;
        let mut engine = Engine {
            state: state.to_path_buf(),
            journal,
            host,
            memory,
            observer,
            locks,
        };
        if engine.journal.mode() == Mode::Primary {
            engine.recover(RecoverMode::Automatic)?;
        }
        Ok(engine)
    }

    /// The host.
    pub fn host(&self) -> &dyn Host {
        self.host.as_ref()
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Takes (or confirms it holds) the lock of `domain` for an operation.
    pub(crate) fn hold_domain(&mut self, domain: &str) -> Result<()> {
        if !self.locks.contains_key(domain) {
            let file = lock_domain(&self.state, domain)?;
            self.locks.insert(domain.to_string(), file);
        }
        Ok(())
    }

    /// Whether this engine may write (it holds the journal).
    pub(crate) fn require_writer(&self) -> Result<()> {
        if self.journal.mode() == Mode::Primary {
            Ok(())
        } else {
            Err(Error::Refused(
                "the journal is held by another domsnap process; this command was opened read-only"
                    .into(),
            ))
        }
    }

    /// What every operation checks first: the names, that this process may write, the
    /// domain's lock, that no operation on it is unfinished; then the domain as the host
    /// sees it and its catalog.
    pub(crate) fn prepare(
        &mut self,
        domain: &str,
        snapshot: &str,
    ) -> Result<(DomainInfo, DomainCatalog)> {
        names::check("domain", domain)?;
        names::check("snapshot", snapshot)?;
        self.prepare_domain(domain)?;
        let info = self.host.domain(domain)?;
        let catalog = self.journal.domain_catalog(domain)?;
        Ok((info, catalog))
    }

    /// The checks of [`Engine::prepare`] that need no snapshot name and no domain on the host.
    pub(crate) fn prepare_domain(&mut self, domain: &str) -> Result<()> {
        names::check("domain", domain)?;
        self.require_writer()?;
        self.hold_domain(domain)?;
        if let Some(open) = self.unfinished(domain)? {
            let why = match open.error {
                Some(e) if open.needs_recovery => format!(": it needs recovery ({e})"),
                _ if open.needs_recovery => ": it needs recovery".to_string(),
                _ => String::new(),
            };
            return Err(Error::Unfinished {
                domain: domain.to_string(),
                op: open.op,
                kind: open.kind.as_str(),
                why,
            });
        }
        Ok(())
    }

    /// The oldest operation on `domain` that has not ended, if any.
    pub fn unfinished(&self, domain: &str) -> Result<Option<OpenOp>> {
        for op in self.journal.open_ops()? {
            let Some(summary) = self.journal.op(op)? else {
                continue;
            };
            if summary.domain != domain {
                continue;
            }
            let error = self
                .journal
                .op_events(op)?
                .iter()
                .rev()
                .find_map(|e| match e {
                    Event::OpNeedsRecovery { error, .. } => Some(error.clone()),
                    _ => None,
                });
            return Ok(Some(OpenOp {
                op,
                kind: summary.kind,
                snapshot: summary.snapshot,
                needs_recovery: summary.outcome == Outcome::NeedsRecovery,
                error,
            }));
        }
        Ok(None)
    }
}

/// An operation that has not ended: interrupted (recovery finishes it at the next start
/// unless another process holds its domain), or marked as needing `domsnap recover`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpenOp {
    /// Its id.
    pub op: u64,
    /// Its kind.
    #[serde(serialize_with = "kind_name")]
    pub kind: OpKind,
    /// The snapshot it is about ("" for the `domain` commands).
    pub snapshot: String,
    /// Automatic recovery leaves it alone: only `domsnap recover` continues it.
    pub needs_recovery: bool,
    /// Why it needs recovery, as journaled.
    pub error: Option<String>,
}

fn kind_name<S: serde::Serializer>(kind: &OpKind, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(kind.as_str())
}

fn open_waiting(db: &Path, wait: Duration, observer: &dyn Observer) -> Result<Journal> {
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        match Journal::open(db, Mode::Primary) {
            Err(journal::Error::Busy(_)) if Instant::now() < deadline => {
                if !told {
                    observer.note("waiting for another domsnap operation to finish…");
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return Ok(other?),
        }
    }
}

/// The error and its causes on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// A crash point at a durable action. Configured `return`, it aborts the process at once,
/// as a crash or `kill -9` would (crash tests use it); `sleep(ms)`, `panic` work as usual.
/// With the `failpoints` feature, a point missing from [`crate::plan::failpoints`] panics:
/// the list a crash test walks is the whole list.
pub(crate) fn crash_point(point: &Failpoint) {
    check_listed(point);
    fail::fail_point!(point.as_str(), |_| std::process::abort());
}

/// The crash point before a step's action, which can also make the step fail:
/// `return(error)` returns [`Error::Injected`] (the step fails before it has any effect, as
/// on a full disk); any other `return` aborts the process like [`crash_point`].
pub(crate) fn step_point(point: &Failpoint) -> Result<()> {
    check_listed(point);
    fail::fail_point!(point.as_str(), |arg: Option<String>| {
        if arg.as_deref() == Some("error") {
            return Err(Error::Injected {
                point: point.to_string(),
            });
        }
        std::process::abort()
    });
    Ok(())
}

#[allow(unused_variables)]
fn check_listed(point: &Failpoint) {
    #[cfg(feature = "failpoints")]
    assert!(
        crate::plan::failpoints().contains(point),
        "crash point {point} is not in plan::failpoints()"
    );
}
