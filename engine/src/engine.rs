//! The engine: one journal, one host, one memory image store, and the step runner every
//! operation goes through.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use journal::{
    Batch, DomainCatalog, Event, Journal, Mode, OpBegun, OpId, OpKind, OpParams, StepDetail,
};
use xen::{DomainInfo, Host};

use crate::error::{Error, Result};
use crate::memstore::MemStore;
use crate::names;
use crate::plan::Step;

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
            engine.recover()?;
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
    /// domain's lock; then the domain as the host sees it and its catalog.
    pub(crate) fn prepare(
        &mut self,
        domain: &str,
        snapshot: &str,
    ) -> Result<(DomainInfo, DomainCatalog)> {
        names::check("domain", domain)?;
        names::check("snapshot", snapshot)?;
        self.require_writer()?;
        self.hold_domain(domain)?;
        let info = self.host.domain(domain)?;
        let catalog = self.journal.domain_catalog(domain)?;
        Ok((info, catalog))
    }

    /// Journals the start of an operation: its plan, options and the domain's run state.
    /// Its id is the sequence number of this event, [`Journal::next_seq`] until it is written.
    pub(crate) fn begin(
        &mut self,
        kind: OpKind,
        info: &DomainInfo,
        snapshot: &str,
        plan: &[Step],
        params: OpParams,
    ) -> Result<OpBegun> {
        let begun = OpBegun {
            op: self.journal.next_seq(),
            at: journal::now_millis(),
            kind,
            domain: info.name.clone(),
            snapshot: snapshot.to_string(),
            user: crate::whoami(),
            pid: std::process::id(),
            host: self.host.kind().to_string(),
            prior_state: crate::create::journal_state(info.state),
            steps: plan.iter().map(ToString::to_string).collect(),
            params,
        };
        self.journal.append(Event::OpBegun(begun.clone()))?;
        crash_point(&format!("engine::{}::after-begin", kind.as_str()));
        Ok(begun)
    }

    /// Runs one step: `StepBegun` (synced), the action, then `StepDone` with the action's
    /// batch in one synced write. On error, `StepFailed` is journaled and the error returned.
    /// Failpoints `engine::<op>::before-<step>` and `…::after-<step>` surround the action.
    pub(crate) fn run_step(
        &mut self,
        b: &OpBegun,
        step: &Step,
        action: impl FnOnce(&mut Engine) -> Result<(StepDetail, Batch)>,
    ) -> Result<StepDetail> {
        self.journaled(b, step.to_string(), step.kind_name(), action)
    }

    /// Runs a compensation during a roll-back, journaled as step `undo:<step>` (failpoints
    /// `engine::<op>::before-undo-<step>`, `…::after-undo-<step>`).
    pub(crate) fn run_undo(
        &mut self,
        b: &OpBegun,
        step: &Step,
        action: impl FnOnce(&mut Engine) -> Result<Batch>,
    ) -> Result<()> {
        let kind = format!("undo-{}", step.kind_name());
        self.journaled(b, format!("undo:{step}"), &kind, |e| {
            Ok((StepDetail::default(), action(e)?))
        })?;
        Ok(())
    }

    fn journaled(
        &mut self,
        b: &OpBegun,
        name: String,
        failpoint: &str,
        action: impl FnOnce(&mut Engine) -> Result<(StepDetail, Batch)>,
    ) -> Result<StepDetail> {
        let op_kind = b.kind.as_str();
        self.journal.append(Event::StepBegun {
            op: b.op,
            step: name.clone(),
            at: journal::now_millis(),
        })?;
        self.observer.step(b.op, &name, true);
        crash_point(&format!("engine::{op_kind}::before-{failpoint}"));
        match action(self) {
            Ok((detail, batch)) => {
                let mut done = Batch::new();
                done.event(Event::StepDone {
                    op: b.op,
                    step: name.clone(),
                    at: journal::now_millis(),
                    detail: detail.clone(),
                });
                done.extend(batch);
                self.journal.commit(done)?;
                self.observer.step(b.op, &name, false);
                crash_point(&format!("engine::{op_kind}::after-{failpoint}"));
                Ok(detail)
            }
            Err(e) => {
                self.journal.append(Event::StepFailed {
                    op: b.op,
                    step: name,
                    at: journal::now_millis(),
                    error: error_chain(&e),
                })?;
                Err(e)
            }
        }
    }

    /// Journals that the operation was undone (nothing of it remains).
    pub(crate) fn end_rolled_back(&mut self, b: &OpBegun, reason: &str) -> Result<()> {
        self.end(
            Event::OpRolledBack {
                op: b.op,
                at: journal::now_millis(),
                reason: reason.to_string(),
            },
            Batch::new(),
        )
    }

    /// Journals the end of an operation together with `batch`.
    pub(crate) fn end(&mut self, event: Event, batch: Batch) -> Result<()> {
        let mut all = Batch::new();
        all.event(event);
        all.extend(batch);
        self.journal.commit(all)?;
        Ok(())
    }
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

/// A failpoint at a durable action. Configured `return`, it aborts the process at once, as
/// a crash or `kill -9` would (crash tests use it); `sleep(ms)`, `panic` work as usual.
#[allow(unused_variables)]
pub(crate) fn crash_point(name: &str) {
    fail::fail_point!(name, |_| std::process::abort());
}
