//! The one runner: every operation — a new one and one recovery finishes or undoes — runs
//! through these functions and its kind's [`Operation`] description, so the normal path
//! and recovery cannot differ.
//!
//! A new operation is journaled (`OpBegun` with the facts recovery needs), then each step
//! of its plan runs journaled ([`Engine::run_redo`]): `StepBegun` (synced), the action,
//! then `StepDone` together with the action's table updates in one synced write. When a
//! step fails, the description decides with the same rules as recovery, and the runner
//! carries the decision out at once: back (undo every begun step in reverse, journaled as
//! `undo:<step>`), forward and left for the next command, or *needs recovery*.

use journal::{
    Batch, CatalogChange, Decision, DomainState, Event, OpBegun, OpKind, OpNote, OpParams,
    StepDetail,
};
use xen::RunState;

use crate::engine::{crash_point, error_chain, step_point, Engine};
use crate::error::{Aftermath, Error, Result};
use crate::plan::{
    description, step_rule, undo_name, Around, Failpoint, OnForwardFailure, Operation, Progress,
    Step,
};

/// An operation as the runner knows it: how it began, its plan, how far it got.
#[derive(Debug, Clone)]
pub(crate) struct OpRecord {
    /// Its first event.
    pub begun: OpBegun,
    /// Its steps, parsed.
    pub plan: Vec<Step>,
    /// How far it got.
    pub progress: Progress,
}

impl OpRecord {
    /// Reads an operation from its events (the first must be its `OpBegun`). An event or
    /// step name that cannot be read is [`Error::Corrupt`], naming the operation.
    pub fn load(op: u64, events: &[Event]) -> Result<OpRecord> {
        let Some(Event::OpBegun(begun)) = events.first() else {
            return Err(Error::Corrupt {
                op,
                what: "its first event".into(),
                why: "is not the OpBegun that starts every operation".into(),
            });
        };
        let plan = begun
            .steps
            .iter()
            .map(|s| Step::parse_of(op, s))
            .collect::<Result<Vec<Step>>>()?;
        Ok(OpRecord {
            begun: begun.clone(),
            plan,
            progress: Progress::of(op, events)?,
        })
    }

    /// The operation id.
    pub fn op(&self) -> u64 {
        self.begun.op
    }

    /// The domain.
    pub fn domain(&self) -> &str {
        &self.begun.domain
    }

    /// The boot of the domain when the operation began (None: shut off).
    pub fn begin_instance(&self) -> Option<u64> {
        self.progress.notes.iter().find_map(|n| match n {
            OpNote::Instance {
                step: None,
                instance,
            } => Some(*instance),
            _ => None,
        })
    }

    /// Whether `instance` (a domain's current boot) is one this operation found or created.
    /// An operation journaled before boots were recorded knows every boot. A boot that
    /// appeared while a step that boots the domain was interrupted (begun, neither done nor
    /// failed) is taken for that step's: the host had booted it, the journal had not
    /// recorded it yet.
    pub fn knows_boot(&self, instance: Option<u64>) -> bool {
        let Some(instance) = instance else {
            return true;
        };
        if let Some(last) = self.progress.begun.last() {
            let interrupted = !self.progress.is_done(last) && !self.progress.failed.contains(last);
            if interrupted && step_rule(self.begun.kind, last.kind()).is_some_and(|r| r.boots) {
                return true;
            }
        }
        let noted: Vec<u64> = self
            .progress
            .notes
            .iter()
            .filter_map(|n| match n {
                OpNote::Instance { instance, .. } => Some(*instance),
                _ => None,
            })
            .collect();
        let began_active = self.begun.prior_state != DomainState::Shutoff;
        if began_active && self.begin_instance().is_none() {
            return true;
        }
        noted.contains(&instance)
    }

    /// Whether `instance` is the boot the operation began with (or the operation cannot
    /// tell: it began before boots were recorded).
    pub fn is_begin_boot(&self, instance: Option<u64>) -> bool {
        match self.begin_instance() {
            Some(i) => instance == Some(i),
            None if self.begun.prior_state == DomainState::Shutoff => instance.is_none(),
            None => true,
        }
    }
}

/// How an operation is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A new operation, in the command that asked for it.
    Normal,
    /// Recovery of an interrupted one; `force`: even on a domain started since.
    Recovery {
        /// Run guarded steps on a boot the operation does not know.
        force: bool,
    },
}

/// A new operation, ready to begin.
#[derive(Debug, Clone)]
pub(crate) struct NewOp {
    /// Its kind.
    pub kind: OpKind,
    /// Its domain.
    pub domain: String,
    /// The snapshot it is about ("" for the `domain` commands).
    pub snapshot: String,
    /// The domain's run state now.
    pub prior: RunState,
    /// The domain's boot now.
    pub instance: Option<u64>,
    /// The steps.
    pub plan: Vec<Step>,
    /// Its options.
    pub params: OpParams,
    /// Facts recovery needs, journaled with `OpBegun`.
    pub notes: Vec<OpNote>,
}

/// The journal's name for a host run state.
pub(crate) fn journal_state(s: RunState) -> DomainState {
    match s {
        RunState::Shutoff => DomainState::Shutoff,
        RunState::Running => DomainState::Running,
        RunState::Paused => DomainState::Paused,
    }
}

impl Engine {
    /// Runs a new operation to its end: begin, every step, commit. A failed step is handled
    /// by the description's decision at once, and returned as [`Error::StepFailed`].
    pub(crate) fn execute(&mut self, new: NewOp) -> Result<(OpRecord, CatalogChange)> {
        let desc = description(new.kind);
        let mut rec = self.begin(new)?;
        for step in rec.plan.clone() {
            if let Err(err) = self.run_redo(desc, &mut rec, &step, Mode::Normal) {
                return Err(self.after_failure(desc, &mut rec, &step, err));
            }
        }
        let change = self.commit_op(desc, &rec)?;
        Ok((rec, change))
    }

    /// Journals the start of an operation: `OpBegun` (its id is its sequence number) and
    /// its notes, the domain's boot first, in one synced write.
    fn begin(&mut self, new: NewOp) -> Result<OpRecord> {
        let at = journal::now_millis();
        let begun = OpBegun {
            op: self.journal.next_seq(),
            at,
            kind: new.kind,
            domain: new.domain,
            snapshot: new.snapshot,
            user: crate::whoami(),
            pid: std::process::id(),
            host: self.host.kind().to_string(),
            prior_state: journal_state(new.prior),
            steps: new.plan.iter().map(ToString::to_string).collect(),
            params: new.params,
        };
        let mut notes = Vec::new();
        if let Some(instance) = new.instance {
            notes.push(OpNote::Instance {
                step: None,
                instance,
            });
        }
        notes.extend(new.notes);
        let mut batch = Batch::new();
        batch.event(Event::OpBegun(begun.clone()));
        for note in &notes {
            batch.event(Event::OpNoted {
                op: begun.op,
                at,
                note: note.clone(),
            });
        }
        self.journal.commit(batch)?;
        if let Err(e) = self.raise_high_water(begun.op) {
            // Nothing was done yet: end it at once, so no command has to recover it.
            let reason = format!("the stores' high-water mark: {}", error_chain(&e));
            self.end(
                Event::OpRolledBack {
                    op: begun.op,
                    at: journal::now_millis(),
                    reason,
                },
                Batch::new(),
            )?;
            return Err(e);
        }
        crash_point(&Failpoint::after_begin(new.kind));
        Ok(OpRecord {
            begun,
            plan: new.plan,
            progress: Progress {
                notes,
                ..Progress::default()
            },
        })
    }

    /// What the normal path does with a failed step: the description's decision, at once.
    fn after_failure(
        &mut self,
        desc: &dyn Operation,
        rec: &mut OpRecord,
        step: &Step,
        err: Error,
    ) -> Error {
        let (decision, _) = desc.decide(&rec.plan, &rec.progress);
        let (aftermath, outcome) = match decision {
            Decision::Back => match self.roll_back(desc, rec, &error_chain(&err), Mode::Normal) {
                Ok(()) => (
                    "it was rolled back: nothing was changed".to_string(),
                    Aftermath::RolledBack,
                ),
                // Left open: the next command's recovery tries once more (a full disk may
                // have room again), and marks it as needing recovery if that fails too.
                Err(undo) => (
                    format!(
                        "rolling it back failed too ({}); the next domsnap command retries",
                        error_chain(&undo)
                    ),
                    Aftermath::Unfinished,
                ),
            },
            Decision::Forward => match desc.on_forward_failure() {
                OnForwardFailure::Retry => (
                    "it is past the point where it can be undone; the next domsnap command \
                     finishes it"
                        .into(),
                    Aftermath::Unfinished,
                ),
                OnForwardFailure::NeedsRecovery => {
                    let marked = self.mark_needs_recovery(rec.op(), &err);
                    (
                        format!(
                            "it is past its point of no return{}",
                            needs_recovery_text(marked)
                        ),
                        Aftermath::NeedsRecovery,
                    )
                }
            },
        };
        Error::StepFailed {
            op: desc.kind().as_str(),
            domain: rec.begun.domain.clone(),
            snapshot: rec.begun.snapshot.clone(),
            step: step.to_string(),
            aftermath,
            outcome,
            source: Box::new(err),
        }
    }

    /// Runs every step of the plan that is not done, in order, then commits.
    pub(crate) fn roll_forward(
        &mut self,
        desc: &dyn Operation,
        rec: &mut OpRecord,
        mode: Mode,
    ) -> Result<CatalogChange> {
        for step in rec.plan.clone() {
            if !rec.progress.is_done(&step) {
                self.run_redo(desc, rec, &step, mode)?;
            }
        }
        self.commit_op(desc, rec)
    }

    /// Undoes every begun step that has a compensation not yet done, in reverse, then
    /// journals `OpRolledBack`.
    pub(crate) fn roll_back(
        &mut self,
        desc: &dyn Operation,
        rec: &mut OpRecord,
        reason: &str,
        mode: Mode,
    ) -> Result<()> {
        for step in rec.progress.begun.clone().iter().rev() {
            let has_undo = step_rule(desc.kind(), step.kind()).is_some_and(|r| r.undo.is_some());
            if has_undo && !rec.progress.undone.contains(step) {
                self.run_undo(desc, rec, step, mode)?;
            }
        }
        self.end(
            Event::OpRolledBack {
                op: rec.op(),
                at: journal::now_millis(),
                reason: reason.to_string(),
            },
            Batch::new(),
        )
    }

    /// Journals the commit with the catalog change the description computes.
    fn commit_op(&mut self, desc: &dyn Operation, rec: &OpRecord) -> Result<CatalogChange> {
        let change = desc.commit(self, rec)?;
        crash_point(&Failpoint::before_commit(desc.kind()));
        self.end(
            Event::OpCommitted {
                op: rec.op(),
                at: journal::now_millis(),
                change: change.clone(),
            },
            Batch::new(),
        )?;
        Ok(change)
    }

    /// Runs one step forward, journaled; in recovery, a guarded step is refused on a boot
    /// the operation does not know.
    fn run_redo(
        &mut self,
        desc: &dyn Operation,
        rec: &mut OpRecord,
        step: &Step,
        mode: Mode,
    ) -> Result<StepDetail> {
        let kind = desc.kind();
        let rule = step_rule(kind, step.kind()).ok_or_else(|| Error::Corrupt {
            op: rec.op(),
            what: format!("step {step}"),
            why: format!("is not a step of {}", kind.as_str()),
        })?;
        if rule.guarded {
            self.guard(rec, mode)?;
        }
        let name = step.to_string();
        let before = Failpoint::step(kind, Around::Before, step.kind());
        let after = Failpoint::step(kind, Around::After, step.kind());
        if !rec.progress.has_begun(step) {
            rec.progress.begun.push(step.clone());
        }
        let boots = rule.boots;
        let record = rec.clone();
        let result = self.journaled(rec.op(), name, &before, &after, |e| {
            let (detail, mut batch) = desc.redo(e, &record, step)?;
            let mut notes = Vec::new();
            if boots {
                if let Some(instance) = e.host.domain(record.domain())?.instance {
                    let note = OpNote::Instance {
                        step: Some(step.to_string()),
                        instance,
                    };
                    batch.event(Event::OpNoted {
                        op: record.op(),
                        at: journal::now_millis(),
                        note: note.clone(),
                    });
                    notes.push(note);
                }
            }
            Ok((detail, batch, notes))
        });
        match result {
            Ok((detail, notes)) => {
                rec.progress.failed.retain(|s| s != step);
                rec.progress.done.push((step.clone(), detail.clone()));
                rec.progress.notes.extend(notes);
                Ok(detail)
            }
            Err(e) => {
                if !rec.progress.failed.contains(step) {
                    rec.progress.failed.push(step.clone());
                }
                Err(e)
            }
        }
    }

    /// Runs the compensation of one step, journaled as step `undo:<step>`.
    fn run_undo(
        &mut self,
        desc: &dyn Operation,
        rec: &mut OpRecord,
        step: &Step,
        mode: Mode,
    ) -> Result<()> {
        let kind = desc.kind();
        if step_rule(kind, step.kind()).is_some_and(|r| r.guarded) {
            self.guard(rec, mode)?;
        }
        let before = Failpoint::step(kind, Around::BeforeUndo, step.kind());
        let after = Failpoint::step(kind, Around::AfterUndo, step.kind());
        let record = rec.clone();
        self.journaled(rec.op(), undo_name(step), &before, &after, |e| {
            Ok((StepDetail::default(), desc.undo(e, &record, step)?, ()))
        })?;
        rec.progress.undone.push(step.clone());
        Ok(())
    }

    /// In recovery without `--force`: refuses if the domain runs a boot the operation did
    /// not find or create (someone started it after the interruption).
    fn guard(&self, rec: &OpRecord, mode: Mode) -> Result<()> {
        if mode != (Mode::Recovery { force: false }) {
            return Ok(());
        }
        let info = match self.host.domain(rec.domain()) {
            Ok(info) => info,
            Err(xen::Error::NoSuchDomain(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if info.state.is_active() && !rec.knows_boot(info.instance) {
            return Err(Error::ForeignBoot {
                domain: rec.domain().to_string(),
                op: rec.op(),
                instance: info.instance.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// `StepBegun` (synced), crash point `before` (which may also fail the step), the
    /// action, then `StepDone` with the action's batch in one synced write and crash point
    /// `after`. On error, `StepFailed` is journaled and the error returned.
    fn journaled<T>(
        &mut self,
        op: u64,
        name: String,
        before: &Failpoint,
        after: &Failpoint,
        action: impl FnOnce(&mut Engine) -> Result<(StepDetail, Batch, T)>,
    ) -> Result<(StepDetail, T)> {
        self.journal.append(Event::StepBegun {
            op,
            step: name.clone(),
            at: journal::now_millis(),
        })?;
        self.observer.step(op, &name, true);
        match step_point(before).and_then(|()| action(self)) {
            Ok((detail, batch, extra)) => {
                let mut done = Batch::new();
                done.event(Event::StepDone {
                    op,
                    step: name.clone(),
                    at: journal::now_millis(),
                    detail: detail.clone(),
                });
                done.extend(batch);
                self.journal.commit(done)?;
                self.observer.step(op, &name, false);
                crash_point(after);
                Ok((detail, extra))
            }
            Err(e) => {
                self.journal.append(Event::StepFailed {
                    op,
                    step: name,
                    at: journal::now_millis(),
                    error: error_chain(&e),
                })?;
                Err(e)
            }
        }
    }

    /// Journals that operation `op` needs `domsnap recover`: automatic recovery leaves it
    /// alone from now on.
    pub(crate) fn mark_needs_recovery(&mut self, op: u64, why: &Error) -> Result<()> {
        self.journal.append(Event::OpNeedsRecovery {
            op,
            at: journal::now_millis(),
            error: error_chain(why),
        })?;
        Ok(())
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

fn needs_recovery_text(marked: Result<()>) -> String {
    match marked {
        Ok(()) => "; it needs recovery: run `domsnap recover`".into(),
        Err(e) => format!(
            "; marking it as needing recovery failed ({}): the next domsnap command retries it",
            error_chain(&e)
        ),
    }
}
