//! Steps, plans, and the recovery rules — in one table.
//!
//! Every operation is a list of [`Step`]s, journaled before (`StepBegun`) and after
//! (`StepDone`) each runs. Every step is idempotent and checkable: running it again after a
//! crash converges on the same outcome (a disk snapshot step asks the image whether its tag,
//! derived from the operation id, exists; a memory step commits its index updates in the
//! same batch as its `StepDone`, so it takes effect exactly once).
//!
//! # Recovery rules
//!
//! | operation | step                    | redo (roll forward)               | undo (roll back)                        |
//! |-----------|-------------------------|-----------------------------------|-----------------------------------------|
//! | create    | `pause`                 | pause the domain                  | nothing (the run state is restored last)|
//! | create    | `save-memory`           | —  (never redone: see decision)   | drop what it stored but did not record (packs, manifest) |
//! | create    | `snapshot-disk:T`       | —  (never redone: see decision)   | delete the disk snapshot tag            |
//! | create    | `resume`                | unpause if it was running         | —                                       |
//! | revert    | `verify-image`          | verify again                      | nothing                                 |
//! | revert    | `stop-domain`           | destroy the domain                | — (point of no return)                  |
//! | revert    | `revert-disk:T`         | apply the disk snapshot / new overlay on the snapshot's image | — |
//! | revert    | `discard-image:T`       | remove the image the disk used before (external) | —                        |
//! | revert    | `restore-memory`        | destroy, restore memory (paused)  | —                                       |
//! | revert    | `set-run-state`         | unpause / start / leave as asked  | —                                       |
//! | delete    | `delete-disk:S:T`       | delete the disk snapshot tag / remove the snapshot's image from the chain | — |
//! | delete    | `release-image:S`       | release the memory image          | —                                       |
//!
//! Decisions ([`decide`]):
//! - **create**: roll forward (resume if it was running, commit) when every data step
//!   (`save-memory`, each `snapshot-disk`) is done; otherwise roll back, undoing every step
//!   that began, in reverse, and restoring the run state the domain had before.
//! - **revert**: roll back while `stop-domain` has not begun (nothing destructive happened;
//!   the run state is restored); once it has begun, roll forward: redo every step from the
//!   first one not done — a half-reverted domain is never left behind.
//! - **delete**: always roll forward.

use std::fmt;

use journal::{Decision, Event, OpKind};

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Step {
    /// Stop the vCPUs (disk-only snapshot of a running domain).
    Pause,
    /// Save memory into the image store; leaves the domain paused.
    SaveMemory,
    /// Take the internal snapshot of one disk.
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
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Pause => f.write_str("pause"),
            Step::SaveMemory => f.write_str("save-memory"),
            Step::SnapshotDisk(t) => write!(f, "snapshot-disk:{t}"),
            Step::Resume => f.write_str("resume"),
            Step::VerifyImage => f.write_str("verify-image"),
            Step::StopDomain => f.write_str("stop-domain"),
            Step::RevertDisk(t) => write!(f, "revert-disk:{t}"),
            Step::DiscardImage(t) => write!(f, "discard-image:{t}"),
            Step::RestoreMemory => f.write_str("restore-memory"),
            Step::SetRunState => f.write_str("set-run-state"),
            Step::DeleteDisk(s, t) => write!(f, "delete-disk:{s}:{t}"),
            Step::ReleaseImage(s) => write!(f, "release-image:{s}"),
        }
    }
}

impl Step {
    /// Parses a journaled step name.
    pub fn parse(name: &str) -> Option<Step> {
        let (head, rest) = match name.split_once(':') {
            Some((h, r)) => (h, Some(r)),
            None => (name, None),
        };
        Some(match (head, rest) {
            ("pause", None) => Step::Pause,
            ("save-memory", None) => Step::SaveMemory,
            ("snapshot-disk", Some(t)) => Step::SnapshotDisk(t.into()),
            ("resume", None) => Step::Resume,
            ("verify-image", None) => Step::VerifyImage,
            ("stop-domain", None) => Step::StopDomain,
            ("revert-disk", Some(t)) => Step::RevertDisk(t.into()),
            ("discard-image", Some(t)) => Step::DiscardImage(t.into()),
            ("restore-memory", None) => Step::RestoreMemory,
            ("set-run-state", None) => Step::SetRunState,
            ("delete-disk", Some(r)) => {
                let (s, t) = r.split_once(':')?;
                Step::DeleteDisk(s.into(), t.into())
            }
            ("release-image", Some(s)) => Step::ReleaseImage(s.into()),
            _ => return None,
        })
    }

    /// Whether the step produces snapshot data (create's decision depends on these).
    pub fn is_data(&self) -> bool {
        matches!(self, Step::SaveMemory | Step::SnapshotDisk(_))
    }

    /// The failpoint name prefix of the step: `engine::<op>::<when>-<step kind>`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Step::Pause => "pause",
            Step::SaveMemory => "save-memory",
            Step::SnapshotDisk(_) => "snapshot-disk",
            Step::Resume => "resume",
            Step::VerifyImage => "verify-image",
            Step::StopDomain => "stop-domain",
            Step::RevertDisk(_) => "revert-disk",
            Step::DiscardImage(_) => "discard-image",
            Step::RestoreMemory => "restore-memory",
            Step::SetRunState => "set-run-state",
            Step::DeleteDisk(..) => "delete-disk",
            Step::ReleaseImage(_) => "release-image",
        }
    }
}

/// How far an operation got, read back from its events.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    /// Steps with a `StepBegun`, in order.
    pub begun: Vec<Step>,
    /// Steps with a `StepDone`.
    pub done: Vec<Step>,
}

impl Progress {
    /// Reads the progress from an operation's events.
    pub fn of(events: &[Event]) -> Progress {
        let mut p = Progress::default();
        for event in events {
            match event {
                Event::StepBegun { step, .. } => p.begun.extend(Step::parse(step)),
                Event::StepDone { step, .. } => p.done.extend(Step::parse(step)),
                _ => {}
            }
        }
        p
    }

    /// Whether `step` finished.
    pub fn is_done(&self, step: &Step) -> bool {
        self.done.contains(step)
    }

    /// Whether `step` began (finished or not).
    pub fn has_begun(&self, step: &Step) -> bool {
        self.begun.contains(step)
    }
}

/// The recovery decision for an interrupted operation (the rules in the module doc).
pub fn decide(kind: OpKind, plan: &[Step], progress: &Progress) -> (Decision, String) {
    match kind {
        OpKind::Create => {
            let missing: Vec<String> = plan
                .iter()
                .filter(|s| s.is_data() && !progress.is_done(s))
                .map(ToString::to_string)
                .collect();
            if missing.is_empty() {
                (
                    Decision::Forward,
                    "every data step had finished: finish and commit".into(),
                )
            } else {
                (
                    Decision::Back,
                    format!("data steps not finished ({}): undo", missing.join(", ")),
                )
            }
        }
        OpKind::Revert => {
            if progress.has_begun(&Step::StopDomain) {
                (
                    Decision::Forward,
                    "the domain had been stopped: redo the remaining steps".into(),
                )
            } else {
                (
                    Decision::Back,
                    "stopped before anything destructive: leave the domain as it was".into(),
                )
            }
        }
        OpKind::Delete => (Decision::Forward, "deletes always finish".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_steps() -> Vec<Step> {
        vec![
            Step::Pause,
            Step::SaveMemory,
            Step::SnapshotDisk("xvda".into()),
            Step::Resume,
            Step::VerifyImage,
            Step::StopDomain,
            Step::RevertDisk("xvdb".into()),
            Step::DiscardImage("xvdb".into()),
            Step::RestoreMemory,
            Step::SetRunState,
            Step::DeleteDisk("snap-1.x".into(), "xvda".into()),
            Step::ReleaseImage("snap-1".into()),
        ]
    }

    #[test]
    fn step_names_round_trip() {
        for step in all_steps() {
            assert_eq!(Step::parse(&step.to_string()), Some(step.clone()));
        }
        assert_eq!(Step::parse("bogus"), None);
        assert_eq!(Step::parse("delete-disk:nocolon"), None);
    }

    #[test]
    fn create_rolls_forward_only_when_every_data_step_is_done() {
        let plan = vec![
            Step::SaveMemory,
            Step::SnapshotDisk("xvda".into()),
            Step::SnapshotDisk("xvdb".into()),
            Step::Resume,
        ];
        let mut p = Progress {
            done: plan[..2].to_vec(),
            ..Progress::default()
        };
        assert_eq!(decide(OpKind::Create, &plan, &p).0, Decision::Back);
        p.done = plan[..3].to_vec();
        assert_eq!(decide(OpKind::Create, &plan, &p).0, Decision::Forward);
    }

    #[test]
    fn revert_turns_forward_once_the_domain_is_stopped() {
        let plan = vec![Step::VerifyImage, Step::StopDomain, Step::RestoreMemory];
        let mut p = Progress {
            begun: vec![Step::VerifyImage],
            done: vec![Step::VerifyImage],
        };
        assert_eq!(decide(OpKind::Revert, &plan, &p).0, Decision::Back);
        p.begun.push(Step::StopDomain);
        assert_eq!(decide(OpKind::Revert, &plan, &p).0, Decision::Forward);
    }

    #[test]
    fn delete_always_rolls_forward() {
        let plan = vec![Step::DeleteDisk("a".into(), "xvda".into())];
        let p = Progress::default();
        assert_eq!(decide(OpKind::Delete, &plan, &p).0, Decision::Forward);
    }
}
