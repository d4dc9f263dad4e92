//! The engine: one journal, one host, one memory image store, and the step runner every
//! operation goes through.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use journal::{
    DomainCatalog, Event, Journal, JournalIdentity, Mode, OpId, OpKind, Outcome, WriterLock,
};
use store::{LocalStore, ObjectStore};
use xen::{DomainInfo, Host};

use crate::error::{Error, Result};
use crate::identity::{Check, Mark, Marker, Mismatch, MARK_NAME};
use crate::memstore::MemStore;
use crate::names;
use crate::plan::Failpoint;
use crate::recovery::{RecoverMode, Recovered};

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
    /// It changes things: wait for the journal, check identities, recover first.
    Write,
    /// It only reads: beside any writer, on a read-only file system; writes nothing.
    Read,
}

/// The name of this state directory's manifests in the memory store: its state id (or,
/// for a journal without one, the store's default).
fn state_name(journal: &Journal) -> String {
    journal
        .identity()
        .map(|id| id.state.to_string())
        .unwrap_or_else(|| crate::memstore::DEFAULT_STATE.to_string())
}

/// What the memory store's mark calls it in messages.
const MEMORY_STORE: &str = "memory store";

/// The marks of the stores a journal in `state` governs: the memory store's (in `memory`),
/// and the host directories' (`sim`, `xen`, and the directory of `host_kind` if another).
pub(crate) fn markers(state: &Path, host_kind: &str, memory: &Arc<dyn ObjectStore>) -> Vec<Marker> {
    let mut out = vec![Marker::in_store(MEMORY_STORE, memory.clone())];
    for kind in ["sim", "xen", host_kind] {
        let m = Marker::in_dir(format!("{kind} host directory"), &state.join(kind));
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// The memory store's directory.
pub(crate) fn memory_dir(state: &Path) -> PathBuf {
    state.join("memory")
}

/// The memory store, opened to look at (nothing is created or written).
pub(crate) fn memory_read_only(state: &Path) -> Result<Arc<dyn ObjectStore>> {
    let store = LocalStore::open(&memory_dir(state), true).map_err(crate::memstore::Error::from)?;
    Ok(Arc::new(store))
}

/// Creates directory `dir` mode 0700 (whatever the umask) if it does not exist.
pub(crate) fn make_private_dir(dir: &Path, op: &'static str) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Io {
            op,
            path: dir.to_path_buf(),
            source,
        })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        Error::Io {
            op,
            path: dir.to_path_buf(),
            source,
        }
    })
}

/// The domsnap engine.
pub struct Engine {
    pub(crate) state: PathBuf,
    pub(crate) journal: Journal,
    pub(crate) host: Box<dyn Host>,
    pub(crate) memory: MemStore,
    pub(crate) observer: Box<dyn Observer>,
    locks: BTreeMap<String, File>,
    identity_problem: Option<Mismatch>,
    /// What the automatic recovery at opening did (writers only).
    recovered_at_open: Vec<Recovered>,
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
    make_private_dir(&state.join("locks"), "create lock directory")?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
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
    /// the same domain is refused at once with [`Error::Busy`] — then the journal's writer
    /// lock is taken, waiting up to `wait` for another domsnap process to finish. The journal
    /// is checked against the stores beside it ([`crate::identity`]): a mismatch is
    /// [`Error::Identity`] and nothing is changed. A state directory that was never used is
    /// initialized (directory mode 0700, a new journal with a new state id, the stores'
    /// marks). Every interrupted operation is then recovered before anything else happens.
    /// Files domsnap writes itself are created 0600; RocksDB creates the journal's with the
    /// process's umask, which the `domsnap` binary sets to 077 at start (and the journal's
    /// directory is 0700).
    ///
    /// With [`Access::Read`], nothing is written in `state`: the journal is opened read-only
    /// (or, if there is none, read as empty), nothing is created, locked or recovered, and
    /// open operations stay open for the next writer. A mismatch of identities is kept and
    /// returned by the queries ([`Engine::identity_problem`]).
    pub fn open(
        state: &Path,
        host: Box<dyn Host>,
        access: Access,
        domain: Option<&str>,
        wait: Duration,
        observer: Box<dyn Observer>,
    ) -> Result<Engine> {
        match access {
            Access::Write => Engine::open_writer(state, host, domain, wait, observer),
            Access::Read => Engine::open_reader(state, host, observer),
        }
    }

    fn open_writer(
        state: &Path,
        host: Box<dyn Host>,
        domain: Option<&str>,
        wait: Duration,
        observer: Box<dyn Observer>,
    ) -> Result<Engine> {
        make_private_dir(state, "create state directory")?;
        let mut locks = BTreeMap::new();
        if let Some(d) = domain {
            locks.insert(d.to_string(), lock_domain(state, d)?);
        }
        let db = state.join("journal");
        let lock = lock_waiting(&db, wait, observer.as_ref())?;
        let looking = memory_read_only(state)?;
        let check = Check::read(&markers(state, host.kind(), &looking), looking.as_ref())?;
        let journal = if Journal::exists(&db) {
            let mut journal = Journal::open_writer(&db, lock)?;
            if let Some(mismatch) = check.against(&journal) {
                return Err(mismatch.into());
            }
            if journal.identity().is_none() {
                // A journal from before state ids: it is this state directory's.
                journal.set_identity(JournalIdentity::fresh()?)?;
            }
            journal
        } else {
            if let Some(mismatch) = check.without_journal(&db) {
                return Err(mismatch.into());
            }
            Journal::create(&db, lock, JournalIdentity::fresh()?)?
        };
        let objects: Arc<dyn ObjectStore> = Arc::new(
            LocalStore::open(&memory_dir(state), false).map_err(crate::memstore::Error::from)?,
        );
        let memory =
            MemStore::with_objects(objects.clone(), &memory_dir(state), &state_name(&journal));
        let mut engine = Engine {
            state: state.to_path_buf(),
            journal,
            host,
            memory,
            observer,
            locks,
            identity_problem: None,
            recovered_at_open: Vec::new(),
        };
        engine.write_missing_marks(&check, &markers(state, engine.host.kind(), &objects))?;
        engine.recovered_at_open = engine.recover(RecoverMode::Automatic)?;
        Ok(engine)
    }

    fn open_reader(
        state: &Path,
        host: Box<dyn Host>,
        observer: Box<dyn Observer>,
    ) -> Result<Engine> {
        let db = state.join("journal");
        // Marks first: a high-water mark is written after the journal has the operation.
        let objects = memory_read_only(state)?;
        let check = Check::read(&markers(state, host.kind(), &objects), objects.as_ref())?;
        let (journal, identity_problem) = if Journal::exists(&db) {
            let journal = Journal::open_read_only(&db)?;
            let problem = check.against(&journal);
            (journal, problem)
        } else {
            (Journal::empty()?, check.without_journal(&db))
        };
        let name = state_name(&journal);
        Ok(Engine {
            state: state.to_path_buf(),
            journal,
            host,
            memory: MemStore::with_objects(objects, &memory_dir(state), &name),
            observer,
            locks: BTreeMap::new(),
            identity_problem,
            recovered_at_open: Vec::new(),
        })
    }

    /// Writes the mark of every store that had none when `check` read them (a new state
    /// directory, a store that appeared since), with the journal's state id; `writable` are
    /// the same markers, opened for writing.
    fn write_missing_marks(&mut self, check: &Check, writable: &[Marker]) -> Result<()> {
        let Some(id) = self.journal.identity() else {
            return Ok(());
        };
        let high_water = self.journal.next_seq() - 1;
        for ((_, mark), marker) in check.marks.iter().zip(writable) {
            if mark.is_none() && marker.writable() {
                marker.write(&Mark {
                    state: id.state,
                    high_water,
                })?;
            }
        }
        Ok(())
    }

    /// Records durably, beside the memory store, that operation `op` may touch things:
    /// no later journal may give its id again.
    pub(crate) fn raise_high_water(&mut self, op: OpId) -> Result<()> {
        let Some(id) = self.journal.identity() else {
            return Ok(());
        };
        let bytes = journal::record::encode(&Mark {
            state: id.state,
            high_water: op,
        })?;
        self.memory
            .objects()
            .replace(MARK_NAME, &bytes)
            .map_err(|e| Error::Memory(e.into()))
    }

    /// What the automatic recovery of opening this engine for writing did, taken once: the
    /// `recover` command reports it beside what it does itself.
    pub fn take_recovered_at_open(&mut self) -> Vec<Recovered> {
        std::mem::take(&mut self.recovered_at_open)
    }

    /// Why the journal does not belong with the stores beside it, if it does not (only a
    /// reader can be open with a mismatch: writers refuse to open).
    pub fn identity_problem(&self) -> Option<&Mismatch> {
        self.identity_problem.as_ref()
    }

    /// [`Error::Identity`] if the journal does not belong with the stores: what queries
    /// check first, so a reader never presents a wrong journal as the truth.
    pub(crate) fn trusted(&self) -> Result<()> {
        match &self.identity_problem {
            Some(m) => Err(Error::Identity(m.clone())),
            None => Ok(()),
        }
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
                "this command opened the journal read-only and cannot change anything".into(),
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

/// Takes the journal's writer lock, waiting up to `wait` for another domsnap process.
pub(crate) fn lock_waiting(
    db: &Path,
    wait: Duration,
    observer: &dyn Observer,
) -> Result<WriterLock> {
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        match WriterLock::acquire(db) {
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
