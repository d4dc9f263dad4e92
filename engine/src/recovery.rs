//! Recovery: when a writer opens, before any new operation, every interrupted operation is
//! rolled forward or back by its description's rules ([`crate::plan`]), through the same
//! runner as the normal path. Recovery is journaled (`RecoveryDecided`, its steps, the
//! final event), so a crash during recovery converges on the next start.
//!
//! What recovery does not do by itself: an operation marked *needs recovery* (a failure
//! past a revert's point of no return, a recovery that failed) waits for `domsnap recover`;
//! an operation recorded on another kind of host waits for a command with that `--host`;
//! an operation whose journal records cannot be read stays open. Each blocks its own domain
//! only.

use journal::{Decision, Event, Outcome};
use serde::Serialize;

use crate::engine::{crash_point, error_chain, Engine};
use crate::error::{Error, Result};
use crate::plan::{description, Failpoint};
use crate::runner::{Mode, OpRecord};

/// Who asked for recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoverMode {
    /// The start of every command: operations marked *needs recovery* are left alone.
    Automatic,
    /// `domsnap recover`: every open operation is tried, those needing recovery too.
    Requested {
        /// Finish operations even on a domain started after their interruption.
        force: bool,
    },
}

/// What recovery did with one operation.
#[derive(Debug, Clone, Serialize)]
pub struct Recovered {
    /// Operation id.
    pub op: u64,
    /// create / revert / delete / a `domain` command.
    pub kind: String,
    /// Domain.
    pub domain: String,
    /// Snapshot.
    pub snapshot: String,
    /// `forward`, `back`, or empty when nothing was decided.
    pub decision: String,
    /// Why.
    pub reason: String,
    /// `ok`, `skipped: …` or the error.
    pub result: String,
    /// The operation is still open afterwards (it blocks its domain).
    pub open: bool,
}

impl Engine {
    /// Recovers every open operation this process can: in [`RecoverMode::Automatic`], all
    /// but those marked as needing recovery. Errors of one operation are reported in its
    /// entry and block its domain only; the result is an error only when the journal
    /// cannot be read or written.
    pub fn recover(&mut self, mode: RecoverMode) -> Result<Vec<Recovered>> {
        let mut report = Vec::new();
        for op in self.journal.open_ops()? {
            report.push(self.recover_op(op, mode)?);
        }
        Ok(report)
    }

    fn recover_op(&mut self, op: u64, mode: RecoverMode) -> Result<Recovered> {
        let summary = self.journal.op(op)?;
        let events = self.journal.op_events(op)?;
        let mut entry = Recovered {
            op,
            kind: summary
                .as_ref()
                .map(|s| s.kind.as_str().to_string())
                .unwrap_or_default(),
            domain: summary
                .as_ref()
                .map(|s| s.domain.clone())
                .unwrap_or_default(),
            snapshot: summary
                .as_ref()
                .map(|s| s.snapshot.clone())
                .unwrap_or_default(),
            decision: String::new(),
            reason: String::new(),
            result: "ok".into(),
            open: true,
        };
        let needs_recovery = summary
            .as_ref()
            .is_some_and(|s| s.outcome == Outcome::NeedsRecovery);
        if needs_recovery && mode == RecoverMode::Automatic {
            entry.result = "skipped: it needs recovery; run `domsnap recover`".into();
            return Ok(entry);
        }
        let mut rec = match OpRecord::load(op, &events) {
            Ok(rec) => rec,
            Err(e) => {
                entry.result = error_chain(&e);
                return Ok(entry);
            }
        };
        if rec.begun.host != self.host.kind() {
            let e = Error::WrongHost {
                op,
                kind: rec.begun.kind.as_str(),
                domain: rec.begun.domain.clone(),
                recorded: rec.begun.host.clone(),
            };
            entry.result = error_chain(&e);
            return Ok(entry);
        }
        match self.hold_domain(&rec.begun.domain) {
            Ok(()) => {}
            Err(e) if e.is_busy() => {
                entry.result = "skipped: the domain is held by another domsnap process".into();
                return Ok(entry);
            }
            Err(e) => {
                entry.result = error_chain(&e);
                return Ok(entry);
            }
        }
        let desc = description(rec.begun.kind);
        let (decision, reason) = desc.decide(&rec.plan, &rec.progress);
        entry.decision = match decision {
            Decision::Forward => "forward".into(),
            Decision::Back => "back".into(),
        };
        entry.reason = reason.clone();
        self.observer.note(&format!(
            "recovering interrupted {} of {}{} (operation {op}): rolling {}: {reason}",
            rec.begun.kind.as_str(),
            rec.begun.domain,
            if rec.begun.snapshot.is_empty() {
                String::new()
            } else {
                format!("/{}", rec.begun.snapshot)
            },
            entry.decision
        ));
        self.journal.append(Event::RecoveryDecided {
            op,
            at: journal::now_millis(),
            decision,
            reason: reason.clone(),
        })?;
        crash_point(&Failpoint::recover_after_decide());
        let run = match mode {
            RecoverMode::Requested { force: true } => Mode::Recovery { force: true },
            _ => Mode::Recovery { force: false },
        };
        let result = match decision {
            Decision::Forward => self.roll_forward(desc, &mut rec, run).map(|_| ()),
            Decision::Back => self.roll_back(desc, &mut rec, &format!("recovery: {reason}"), run),
        };
        match result {
            Ok(()) => entry.open = false,
            Err(e) => {
                entry.result = error_chain(&e);
                if matches!(&e, Error::Host(xen::Error::NoSuchDomain(_))) {
                    // The domain is gone from the host: nothing can be finished or undone;
                    // what the operation holds in the store is released with its end.
                    let batch = desc.abandon(self, &rec)?;
                    self.end(
                        Event::OpFailed {
                            op,
                            at: journal::now_millis(),
                            error: error_chain(&e),
                        },
                        batch,
                    )?;
                    entry.open = false;
                } else {
                    self.mark_needs_recovery(op, &e)?;
                }
            }
        }
        Ok(entry)
    }
}
