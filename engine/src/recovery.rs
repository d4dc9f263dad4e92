//! Recovery: at every start, before any new operation, every interrupted operation is
//! rolled forward or back by the rules in [`crate::plan`]. Recovery is journaled
//! (`RecoveryDecided`, its steps, the final event), so a crash during recovery converges on
//! the next start.

use journal::{Decision, Event, OpBegun};
use serde::Serialize;

use crate::engine::{error_chain, Engine};
use crate::error::{Error, Result};
use crate::plan::{decide, Progress, Step};

/// What recovery did with one operation.
#[derive(Debug, Clone, Serialize)]
pub struct Recovered {
    /// Operation id.
    pub op: u64,
    /// create / revert / delete.
    pub kind: String,
    /// Domain.
    pub domain: String,
    /// Snapshot.
    pub snapshot: String,
    /// `forward` or `back`.
    pub decision: String,
    /// Why.
    pub reason: String,
    /// `ok`, `skipped` (another process holds the domain) or the error.
    pub result: String,
}

impl Engine {
    /// Recovers every interrupted operation whose domain this process can lock.
    pub fn recover(&mut self) -> Result<Vec<Recovered>> {
        let mut report = Vec::new();
        for op in self.journal.open_ops()? {
            let events = self.journal.op_events(op)?;
            let Some(Event::OpBegun(begun)) = events.first().cloned() else {
                continue;
            };
            let mut entry = Recovered {
                op,
                kind: begun.kind.as_str().into(),
                domain: begun.domain.clone(),
                snapshot: begun.snapshot.clone(),
                decision: String::new(),
                reason: String::new(),
                result: "ok".into(),
            };
            match self.hold_domain(&begun.domain) {
                Ok(()) => {}
                Err(e) if e.is_busy() => {
                    entry.result = "skipped: the domain is held by another domsnap process".into();
                    report.push(entry);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let plan: Vec<Step> = begun.steps.iter().filter_map(|s| Step::parse(s)).collect();
            let progress = Progress::of(&events);
            let (decision, reason) = decide(begun.kind, &plan, &progress);
            entry.decision = match decision {
                Decision::Forward => "forward".into(),
                Decision::Back => "back".into(),
            };
            entry.reason = reason.clone();
            self.observer.note(&format!(
                "recovering interrupted {} of {}/{} (operation {op}): rolling {}: {reason}",
                begun.kind.as_str(),
                begun.domain,
                begun.snapshot,
                entry.decision
            ));
            self.journal.append(Event::RecoveryDecided {
                op,
                at: journal::now_millis(),
                decision,
                reason: reason.clone(),
            })?;
            crate::engine::crash_point("engine::recover::after-decide");
            if let Err(e) = self.recover_one(&begun, decision, &progress, &reason) {
                if matches!(&e, Error::Host(xen::Error::NoSuchDomain(_))) {
                    // The domain is gone from the host: nothing can be finished or undone.
                    self.end(
                        Event::OpFailed {
                            op,
                            at: journal::now_millis(),
                            error: error_chain(&e),
                        },
                        journal::Batch::new(),
                    )?;
                }
                entry.result = error_chain(&e);
            }
            report.push(entry);
        }
        Ok(report)
    }

    fn recover_one(
        &mut self,
        begun: &OpBegun,
        decision: Decision,
        progress: &Progress,
        reason: &str,
    ) -> Result<()> {
        use journal::OpKind::*;
        let why = format!("recovery: {reason}");
        match (begun.kind, decision) {
            (Create, Decision::Forward) => self.forward_create(begun, progress),
            (Create, Decision::Back) => self.undo_create(begun, progress, &why),
            (Revert, Decision::Forward) => self.forward_revert(begun, progress),
            (Revert, Decision::Back) => self.undo_revert(begun, &why),
            (Delete, _) => self.forward_delete(begun, progress),
        }
    }
}
