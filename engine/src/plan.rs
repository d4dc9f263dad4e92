//! Steps, plans, and the recovery rules — one description per operation kind.
//!
//! Every operation is a list of [`Step`]s, journaled before (`StepBegun`) and after
//! (`StepDone`) each runs. Every step is idempotent and checkable: running it again after a
//! crash converges on the same outcome (a disk snapshot step asks the image whether its tag,
//! derived from the operation id, exists; a memory step commits its index updates in the
//! same batch as its `StepDone`, so it takes effect exactly once).
//!
//! Each operation kind is one [`Operation`] description: what each step does forward
//! (`redo`) and back (`undo`), which way an interrupted or failed operation goes
//! (`decide`), and what its commit changes. One runner (`runner.rs`) carries out every
//! operation with them, the normal path and recovery alike, so the two cannot differ; the
//! tables below are rendered from the descriptions ([`steps_table`], [`rules_table`]) and a
//! test compares them with this page and the README.
//!
//! # Steps
//!
//! | operation | step                 | redo (forward)                                                                | undo (back)                                                         |
//! |-----------|----------------------|-------------------------------------------------------------------------------|---------------------------------------------------------------------|
//! | create    | `pause`              | pause the domain                                                              | restore the run state it had (same boot only)                       |
//! | create    | `save-memory`        | save memory into the image store; the domain stays paused                     | drop what it stored but did not record; restore the run state it had |
//! | create    | `snapshot-disk:T`    | take the disk snapshot (internal tag `name@op`, or an external overlay)       | delete the internal tag (an external overlay stays: it is empty)    |
//! | create    | `resume`             | unpause if it was running (same boot only)                                    | —                                                                   |
//! | revert    | `verify-image`       | read and hash every chunk of the memory image                                 | —                                                                   |
//! | revert    | `stop-domain`        | destroy the domain (the point of no return) ‡                                 | —                                                                   |
//! | revert    | `revert-disk:T`      | apply the disk snapshot / a new overlay on the snapshot's image ‡             | —                                                                   |
//! | revert    | `discard-image:T`    | remove the image the disk used before (external)                              | —                                                                   |
//! | revert    | `restore-memory`     | destroy, restore memory (paused) ‡ †                                          | —                                                                   |
//! | revert    | `set-run-state`      | unpause / start / leave as asked ‡ †                                          | —                                                                   |
//! | delete    | `delete-disk:S:T`    | delete the disk snapshot tag / remove the snapshot's image from the chain     | —                                                                   |
//! | delete    | `release-image:S`    | release the memory image                                                      | —                                                                   |
//! | define    | `define`             | define the domain unless it exists                                            | —                                                                   |
//! | start     | `set-workload:W`     | set what the guest runs                                                       | —                                                                   |
//! | start     | `start`              | start the domain unless it is up (paused if asked); let its own boot run †    | —                                                                   |
//! | pause     | `pause`              | pause the boot found at the start, if it still runs                           | —                                                                   |
//! | unpause   | `unpause`            | unpause the boot found at the start, if it is still paused                    | —                                                                   |
//! | shutdown  | `shutdown`           | shut down the boot found at the start, if it is still up                      | —                                                                   |
//! | destroy   | `destroy`            | destroy the boot found at the start, if it is still up                        | —                                                                   |
//! | undefine  | `undefine`           | remove the domain and its files unless it is gone                             | —                                                                   |
//! | undefine  | `release-image:S`    | release the memory image of a snapshot removed with the domain                | —                                                                   |
//! | adopt     | `rebuild-catalog`    | the catalog from the disks' tags and the store's manifests, in one write      | —                                                                   |
//!
//! ‡ Recovery refuses to run it on a domain that was started after the interruption (a boot
//! the operation did not record) unless `domsnap recover --force`.
//! † The boot it creates is journaled with its `StepDone`.
//!
//! # Decisions
//!
//! | operation | interrupted…                                   | recovery                                                     |
//! |-----------|------------------------------------------------|--------------------------------------------------------------|
//! | create    | before every data step (memory, each disk) finished | roll back: delete the disk snapshots, release the memory image, restore the run state |
//! | create    | after every data step finished                 | roll forward: resume if it was running, commit               |
//! | revert    | before the domain was stopped                  | roll back: nothing was changed                               |
//! | revert    | after the domain was stopped                   | roll forward: redo the remaining steps — never half-reverted |
//! | delete    | anywhere                                       | roll forward                                                 |
//! | define, start, pause, unpause, shutdown, destroy | after a step failed                            | roll back: nothing to undo (a failed step has no effect)     |
//! | define, start, pause, unpause, shutdown, destroy | anywhere else                                  | roll forward: finish it on the boot it began with            |
//! | undefine  | after its `undefine` step failed               | roll back: nothing to undo                                   |
//! | undefine  | anywhere else                                  | roll forward: remove the domain, release its snapshots' images |
//! | adopt     | never (one write)                              | roll back: nothing to undo                                   |
//!
//! A step that fails runs the same decision at once. Where it says forward, a create or
//! delete is left open for the next command's recovery to finish, and so is one whose roll
//! back fails; a revert past its point of no return — and any recovery that fails — is
//! marked *needs recovery*: automatic recovery leaves it alone, only `domsnap recover`
//! continues it, and the domain accepts no other command until then.

use std::fmt;

use journal::{Batch, CatalogChange, Decision, Event, OpId, OpKind, OpNote, StepDetail};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::runner::OpRecord;

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Step {
    /// Stop the vCPUs (disk-only snapshot of a running domain; `domain pause`).
    Pause,
    /// Save memory into the image store; leaves the domain paused.
    SaveMemory,
    /// Take the snapshot of one disk.
    SnapshotDisk(String),
    /// Let the domain run again if it ran before the operation.
    Resume,
    /// Check every chunk of the memory image before anything is touched.
    VerifyImage,
    /// Destroy the domain (the point of no return of a revert).
    StopDomain,
    /// Apply the snapshot to one disk.
    RevertDisk(String),
    /// Remove the image a disk used before an external revert.
    DiscardImage(String),
    /// Restore memory from the image store (domain paused afterwards).
    RestoreMemory,
    /// Bring the domain to the run state the revert asked for.
    SetRunState,
    /// Delete one snapshot's tag from one disk: (snapshot, target).
    DeleteDisk(String, String),
    /// Release one snapshot's memory image.
    ReleaseImage(String),
    /// Define a new domain.
    Define,
    /// Set what the simulated guest runs.
    SetWorkload(String),
    /// Boot the domain.
    Start,
    /// Let the paused domain run.
    Unpause,
    /// Stop the domain gracefully.
    Shutdown,
    /// Stop the domain at once.
    Destroy,
    /// Remove the domain and its files.
    Undefine,
    /// Rebuild the domain's catalog from what is on disk (`recover --adopt`).
    RebuildCatalog,
}

/// A [`Step`] without its arguments: what the tables and failpoint names speak of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepKind {
    /// [`Step::Pause`].
    Pause,
    /// [`Step::SaveMemory`].
    SaveMemory,
    /// [`Step::SnapshotDisk`].
    SnapshotDisk,
    /// [`Step::Resume`].
    Resume,
    /// [`Step::VerifyImage`].
    VerifyImage,
    /// [`Step::StopDomain`].
    StopDomain,
    /// [`Step::RevertDisk`].
    RevertDisk,
    /// [`Step::DiscardImage`].
    DiscardImage,
    /// [`Step::RestoreMemory`].
    RestoreMemory,
    /// [`Step::SetRunState`].
    SetRunState,
    /// [`Step::DeleteDisk`].
    DeleteDisk,
    /// [`Step::ReleaseImage`].
    ReleaseImage,
    /// [`Step::Define`].
    Define,
    /// [`Step::SetWorkload`].
    SetWorkload,
    /// [`Step::Start`].
    Start,
    /// [`Step::Unpause`].
    Unpause,
    /// [`Step::Shutdown`].
    Shutdown,
    /// [`Step::Destroy`].
    Destroy,
    /// [`Step::Undefine`].
    Undefine,
    /// [`Step::RebuildCatalog`].
    RebuildCatalog,
}

impl StepKind {
    /// The step's name in the journal (before any `:argument`) and in failpoint names.
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Pause => "pause",
            StepKind::SaveMemory => "save-memory",
            StepKind::SnapshotDisk => "snapshot-disk",
            StepKind::Resume => "resume",
            StepKind::VerifyImage => "verify-image",
            StepKind::StopDomain => "stop-domain",
            StepKind::RevertDisk => "revert-disk",
            StepKind::DiscardImage => "discard-image",
            StepKind::RestoreMemory => "restore-memory",
            StepKind::SetRunState => "set-run-state",
            StepKind::DeleteDisk => "delete-disk",
            StepKind::ReleaseImage => "release-image",
            StepKind::Define => "define",
            StepKind::SetWorkload => "set-workload",
            StepKind::Start => "start",
            StepKind::Unpause => "unpause",
            StepKind::Shutdown => "shutdown",
            StepKind::Destroy => "destroy",
            StepKind::Undefine => "undefine",
            StepKind::RebuildCatalog => "rebuild-catalog",
        }
    }

    /// How the step is written in the tables: its name and the shape of its arguments.
    fn pattern(self) -> &'static str {
        match self {
            StepKind::SnapshotDisk => "snapshot-disk:T",
            StepKind::RevertDisk => "revert-disk:T",
            StepKind::DiscardImage => "discard-image:T",
            StepKind::DeleteDisk => "delete-disk:S:T",
            StepKind::ReleaseImage => "release-image:S",
            StepKind::SetWorkload => "set-workload:W",
            other => other.as_str(),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind().as_str();
        match self {
            Step::SnapshotDisk(a)
            | Step::RevertDisk(a)
            | Step::DiscardImage(a)
            | Step::ReleaseImage(a)
            | Step::SetWorkload(a) => write!(f, "{kind}:{a}"),
            Step::DeleteDisk(s, t) => write!(f, "{kind}:{s}:{t}"),
            _ => f.write_str(kind),
        }
    }
}

impl Step {
    /// The step's kind.
    pub fn kind(&self) -> StepKind {
        match self {
            Step::Pause => StepKind::Pause,
            Step::SaveMemory => StepKind::SaveMemory,
            Step::SnapshotDisk(_) => StepKind::SnapshotDisk,
            Step::Resume => StepKind::Resume,
            Step::VerifyImage => StepKind::VerifyImage,
            Step::StopDomain => StepKind::StopDomain,
            Step::RevertDisk(_) => StepKind::RevertDisk,
            Step::DiscardImage(_) => StepKind::DiscardImage,
            Step::RestoreMemory => StepKind::RestoreMemory,
            Step::SetRunState => StepKind::SetRunState,
            Step::DeleteDisk(..) => StepKind::DeleteDisk,
            Step::ReleaseImage(_) => StepKind::ReleaseImage,
            Step::Define => StepKind::Define,
            Step::SetWorkload(_) => StepKind::SetWorkload,
            Step::Start => StepKind::Start,
            Step::Unpause => StepKind::Unpause,
            Step::Shutdown => StepKind::Shutdown,
            Step::Destroy => StepKind::Destroy,
            Step::Undefine => StepKind::Undefine,
            Step::RebuildCatalog => StepKind::RebuildCatalog,
        }
    }

    /// Parses a journaled step name; None if it names no step this build knows.
    pub fn parse(name: &str) -> Option<Step> {
        let (head, rest) = match name.split_once(':') {
            Some((h, r)) => (h, Some(r)),
            None => (name, None),
        };
        let arg = |r: &str| (!r.is_empty()).then(|| r.to_string());
        Some(match (head, rest) {
            ("pause", None) => Step::Pause,
            ("save-memory", None) => Step::SaveMemory,
            ("snapshot-disk", Some(t)) => Step::SnapshotDisk(arg(t)?),
            ("resume", None) => Step::Resume,
            ("verify-image", None) => Step::VerifyImage,
            ("stop-domain", None) => Step::StopDomain,
            ("revert-disk", Some(t)) => Step::RevertDisk(arg(t)?),
            ("discard-image", Some(t)) => Step::DiscardImage(arg(t)?),
            ("restore-memory", None) => Step::RestoreMemory,
            ("set-run-state", None) => Step::SetRunState,
            ("delete-disk", Some(r)) => {
                let (s, t) = r.split_once(':')?;
                Step::DeleteDisk(arg(s)?, arg(t)?)
            }
            ("release-image", Some(s)) => Step::ReleaseImage(arg(s)?),
            ("define", None) => Step::Define,
            ("set-workload", Some(w)) => Step::SetWorkload(arg(w)?),
            ("start", None) => Step::Start,
            ("unpause", None) => Step::Unpause,
            ("shutdown", None) => Step::Shutdown,
            ("destroy", None) => Step::Destroy,
            ("undefine", None) => Step::Undefine,
            ("rebuild-catalog", None) => Step::RebuildCatalog,
            _ => return None,
        })
    }

    /// Parses a step name journaled by operation `op`; an unknown name is corruption.
    pub(crate) fn parse_of(op: OpId, name: &str) -> Result<Step> {
        Step::parse(name).ok_or_else(|| Error::Corrupt {
            op,
            what: format!("step {name:?}"),
            why: "names no step this domsnap knows".into(),
        })
    }

    /// Whether the step produces snapshot data (create's decision depends on these).
    pub fn is_data(&self) -> bool {
        matches!(self, Step::SaveMemory | Step::SnapshotDisk(_))
    }
}

/// How far an operation got, read back from its events.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    /// Steps with a `StepBegun`, in order.
    pub begun: Vec<Step>,
    /// Steps with a `StepDone`, and what they produced.
    pub done: Vec<(Step, StepDetail)>,
    /// Steps whose last attempt failed (`StepFailed`) and that are not done.
    pub failed: Vec<Step>,
    /// Steps whose compensation (`undo:<step>`) is done.
    pub undone: Vec<Step>,
    /// The facts journaled with the operation.
    pub notes: Vec<OpNote>,
}

/// The journal's name of the compensation of `step`.
pub(crate) fn undo_name(step: &Step) -> String {
    format!("undo:{step}")
}

impl Progress {
    /// Reads the progress of operation `op` from its events. A step name this build cannot
    /// parse is [`Error::Corrupt`], never skipped.
    pub fn of(op: OpId, events: &[Event]) -> Result<Progress> {
        let mut p = Progress::default();
        let parse = |name: &str| -> Result<(bool, Step)> {
            match name.strip_prefix("undo:") {
                Some(rest) => Ok((true, Step::parse_of(op, rest)?)),
                None => Ok((false, Step::parse_of(op, name)?)),
            }
        };
        for event in events {
            match event {
                Event::StepBegun { step, .. } => {
                    let (undo, step) = parse(step)?;
                    if !undo && !p.begun.contains(&step) {
                        p.begun.push(step);
                    }
                }
                Event::StepDone { step, detail, .. } => match parse(step)? {
                    (true, step) => p.undone.push(step),
                    (false, step) => {
                        p.failed.retain(|s| *s != step);
                        p.done.push((step, detail.clone()));
                    }
                },
                Event::StepFailed { step, .. } => {
                    if let (false, step) = parse(step)? {
                        if !p.is_done(&step) && !p.failed.contains(&step) {
                            p.failed.push(step);
                        }
                    }
                }
                Event::OpNoted { note, .. } => p.notes.push(note.clone()),
                _ => {}
            }
        }
        Ok(p)
    }

    /// Whether `step` finished.
    pub fn is_done(&self, step: &Step) -> bool {
        self.done.iter().any(|(s, _)| s == step)
    }

    /// What `step` produced, if it finished.
    pub fn detail(&self, step: &Step) -> Option<&StepDetail> {
        self.done.iter().find(|(s, _)| s == step).map(|(_, d)| d)
    }

    /// Whether `step` began (finished or not).
    pub fn has_begun(&self, step: &Step) -> bool {
        self.begun.contains(step)
    }

    /// Whether any step failed (and was not done since).
    pub fn any_failed(&self) -> bool {
        !self.failed.is_empty()
    }
}

/// What one kind of step does, as the tables show it.
#[derive(Debug, Clone, Copy)]
pub struct StepRule {
    /// The step.
    pub step: StepKind,
    /// What running it (again) does.
    pub redo: &'static str,
    /// What undoing it does; None: it has no compensation.
    pub undo: Option<&'static str>,
    /// Recovery refuses to run it on a domain started after the interruption.
    pub guarded: bool,
    /// It may boot the domain: the new boot is journaled with its `StepDone`.
    pub boots: bool,
}

impl StepRule {
    /// A step without compensation.
    pub const fn redo(step: StepKind, redo: &'static str) -> StepRule {
        StepRule {
            step,
            redo,
            undo: None,
            guarded: false,
            boots: false,
        }
    }

    /// A step with a compensation.
    pub const fn undo(step: StepKind, redo: &'static str, undo: &'static str) -> StepRule {
        StepRule {
            step,
            redo,
            undo: Some(undo),
            guarded: false,
            boots: false,
        }
    }

    /// Recovery runs it only on a boot the operation knows (or with `--force`).
    pub const fn guarded(mut self) -> StepRule {
        self.guarded = true;
        self
    }

    /// It may boot the domain.
    pub const fn boots(mut self) -> StepRule {
        self.boots = true;
        self
    }
}

/// One row of the decision table.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Where the operation stopped.
    pub interrupted: &'static str,
    /// What recovery does.
    pub recovery: &'static str,
}

/// What the normal path does when a step fails and the decision is to go forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnForwardFailure {
    /// Leave it open: the next command's automatic recovery finishes it.
    Retry,
    /// Mark it *needs recovery*: only `domsnap recover` continues it.
    NeedsRecovery,
}

/// One operation kind: its steps, its decision, and what each step does forward and back.
/// The runner carries out every operation with these, on the normal path and in recovery.
pub(crate) trait Operation: Sync {
    /// The kind described.
    fn kind(&self) -> OpKind;
    /// Every kind of step its plans may hold, in plan order, with what redo and undo do.
    fn steps(&self) -> &'static [StepRule];
    /// The decision table's rows.
    fn rules(&self) -> &'static [Rule];
    /// Failpoints inside its steps, besides those at every step boundary.
    fn extra_failpoints(&self) -> &'static [&'static str] {
        &[]
    }
    /// Which way an operation that stopped (interrupted or failed) goes.
    fn decide(&self, plan: &[Step], progress: &Progress) -> (Decision, String);
    /// What the normal path does when a step fails and [`Operation::decide`] says forward.
    fn on_forward_failure(&self) -> OnForwardFailure {
        OnForwardFailure::Retry
    }
    /// Runs `step` (again): idempotent.
    fn redo(&self, e: &mut Engine, op: &OpRecord, step: &Step) -> Result<(StepDetail, Batch)>;
    /// Undoes `step` (only for steps whose [`StepRule::undo`] is set): idempotent.
    fn undo(&self, e: &mut Engine, op: &OpRecord, step: &Step) -> Result<Batch> {
        let _ = (e, op);
        Err(Error::Refused(format!(
            "step {step} of {} has no undo",
            self.kind().as_str()
        )))
    }
    /// What the committed operation changes in the catalog.
    fn commit(&self, e: &mut Engine, op: &OpRecord) -> Result<CatalogChange>;
    /// Whether the operation is journaled in one write, begin to commit (it then has no
    /// crash points: nothing of it can be half done).
    fn journaled_at_once(&self) -> bool {
        false
    }
    /// Releases what the operation holds when it must be abandoned (its domain is gone).
    fn abandon(&self, e: &mut Engine, op: &OpRecord) -> Result<Batch> {
        let _ = (e, op);
        Ok(Batch::new())
    }
}

/// The description of operation kind `kind`.
pub(crate) fn description(kind: OpKind) -> &'static dyn Operation {
    match kind {
        OpKind::Create => &crate::create::CREATE,
        OpKind::Revert => &crate::revert::REVERT,
        OpKind::Delete => &crate::delete::DELETE,
        OpKind::Define => &crate::domain::DEFINE,
        OpKind::Start => &crate::domain::START,
        OpKind::Pause => &crate::domain::PAUSE,
        OpKind::Unpause => &crate::domain::UNPAUSE,
        OpKind::Shutdown => &crate::domain::SHUTDOWN,
        OpKind::Destroy => &crate::domain::DESTROY,
        OpKind::Undefine => &crate::domain::UNDEFINE,
        OpKind::Adopt => &crate::adopt::ADOPT,
    }
}

/// The rule of `step` in `kind`'s description, if its plans may hold it.
pub(crate) fn step_rule(kind: OpKind, step: StepKind) -> Option<&'static StepRule> {
    description(kind).steps().iter().find(|r| r.step == step)
}

/// The recovery decision for an interrupted operation (the rules in the module doc).
pub fn decide(kind: OpKind, plan: &[Step], progress: &Progress) -> (Decision, String) {
    description(kind).decide(plan, progress)
}

/// A crash point: a place where a failpoint may abort the process, named
/// `engine::<op>::<where>`. Every one is in [`failpoints`]; no other can be built.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Failpoint(String);

/// When, around a step, a crash point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Around {
    /// After `StepBegun`, before the action.
    Before,
    /// After `StepDone`.
    After,
    /// Before the compensation's action.
    BeforeUndo,
    /// After the compensation's `StepDone`.
    AfterUndo,
}

impl Failpoint {
    /// The name the `FAILPOINTS` variable sets.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn of(kind: &str, point: &str) -> Failpoint {
        Failpoint(format!("engine::{kind}::{point}"))
    }

    /// After an operation's `OpBegun`.
    pub(crate) fn after_begin(kind: OpKind) -> Failpoint {
        Failpoint::of(kind.as_str(), "after-begin")
    }

    /// Before an operation's commit.
    pub(crate) fn before_commit(kind: OpKind) -> Failpoint {
        Failpoint::of(kind.as_str(), "before-commit")
    }

    /// Around a step.
    pub(crate) fn step(kind: OpKind, around: Around, step: StepKind) -> Failpoint {
        let when = match around {
            Around::Before => "before",
            Around::After => "after",
            Around::BeforeUndo => "before-undo",
            Around::AfterUndo => "after-undo",
        };
        Failpoint::of(kind.as_str(), &format!("{when}-{}", step.as_str()))
    }

    /// Inside a step: one of [`Operation::extra_failpoints`].
    pub(crate) fn extra(kind: OpKind, name: &'static str) -> Failpoint {
        Failpoint::of(kind.as_str(), name)
    }

    /// After recovery journaled its decision.
    pub(crate) fn recover_after_decide() -> Failpoint {
        Failpoint::of("recover", "after-decide")
    }
}

impl fmt::Display for Failpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every crash point of the engine, derived from the descriptions: after each operation's
/// begin, before and after each of its step kinds (and each compensation), its extra
/// points, before its commit, and after recovery's decision. A crash test that walks this
/// list covers every durable action; a new step adds its points here by itself.
pub fn failpoints() -> Vec<Failpoint> {
    let mut all = vec![Failpoint::recover_after_decide()];
    for kind in OpKind::ALL {
        let d = description(kind);
        if d.journaled_at_once() {
            continue;
        }
        all.push(Failpoint::after_begin(kind));
        for rule in d.steps() {
            all.push(Failpoint::step(kind, Around::Before, rule.step));
            all.push(Failpoint::step(kind, Around::After, rule.step));
            if rule.undo.is_some() {
                all.push(Failpoint::step(kind, Around::BeforeUndo, rule.step));
                all.push(Failpoint::step(kind, Around::AfterUndo, rule.step));
            }
        }
        for extra in d.extra_failpoints() {
            all.push(Failpoint::extra(kind, extra));
        }
        all.push(Failpoint::before_commit(kind));
    }
    all
}

fn table(header: &[&str], widths: &[usize], rows: &[Vec<String>]) -> String {
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (cell, w) in cells.iter().zip(widths) {
            s.push_str(&format!(" {cell:<w$} |"));
        }
        s.push('\n');
        s
    };
    let mut out = line(&header.iter().map(ToString::to_string).collect::<Vec<_>>());
    out.push('|');
    for w in widths {
        out.push_str(&"-".repeat(w + 2));
        out.push('|');
    }
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// The step table (module doc), rendered from the descriptions.
pub fn steps_table() -> String {
    let mut rows = Vec::new();
    for kind in OpKind::ALL {
        for rule in description(kind).steps() {
            let marks = match (rule.guarded, rule.boots) {
                (true, true) => " ‡ †",
                (true, false) => " ‡",
                (false, true) => " †",
                (false, false) => "",
            };
            rows.push(vec![
                kind.as_str().to_string(),
                format!("`{}`", rule.step.pattern()),
                format!("{}{marks}", rule.redo),
                rule.undo.unwrap_or("—").to_string(),
            ]);
        }
    }
    table(
        &["operation", "step", "redo (forward)", "undo (back)"],
        &[9, 20, 77, 67],
        &rows,
    )
}

/// The decision table (module doc and README), rendered from the descriptions; kinds with
/// the same rules share their rows.
pub fn rules_table() -> String {
    let mut groups: Vec<(Vec<&str>, &'static [Rule])> = Vec::new();
    for kind in OpKind::ALL {
        let rules = description(kind).rules();
        match groups.last_mut() {
            Some((kinds, r)) if std::ptr::eq(*r, rules) => kinds.push(kind.as_str()),
            _ => groups.push((vec![kind.as_str()], rules)),
        }
    }
    let mut rows = Vec::new();
    for (kinds, rules) in groups {
        for rule in rules {
            rows.push(vec![
                kinds.join(", "),
                rule.interrupted.to_string(),
                rule.recovery.to_string(),
            ]);
        }
    }
    table(
        &["operation", "interrupted…", "recovery"],
        &[9, 46, 60],
        &rows,
    )
}

#[cfg(test)]
mod tests;
