//! The `domain` commands as operations — define, start, pause, unpause, shutdown, destroy,
//! undefine — under the domain's lock and in the journal, like every change to a domain.
//!
//! Each acts on the boot of the domain it found when it began: recovery finishes an
//! interrupted one on that boot, and does nothing if that boot is gone (a domain destroyed
//! and started again by hand is not paused, shut down or destroyed by a stale command).

use journal::{Batch, CatalogChange, Decision, DomainState, OpKind, OpNote, OpParams, StepDetail};
use xen::{DomainInfo, DomainSpec, Feature, RunState};

use crate::create::not_a_step;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::plan::{Operation, Progress, Rule, Step, StepKind, StepRule};
use crate::runner::{NewOp, OpRecord};

/// A `domain` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainAction {
    /// Define a new shut-off domain.
    Define(DomainSpec),
    /// Boot a shut-off domain.
    Start {
        /// Boot it paused.
        paused: bool,
        /// Set what the guest runs first.
        workload: Option<String>,
    },
    /// Stop the vCPUs of an active domain.
    Pause,
    /// Let a paused domain run.
    Unpause,
    /// Stop the domain gracefully.
    Shutdown,
    /// Stop the domain at once.
    Destroy,
    /// Remove a shut-off domain and its files.
    Undefine {
        /// Delete its snapshots with it (refused otherwise when it has any).
        snapshots: bool,
    },
}

impl DomainAction {
    /// The operation kind.
    pub fn kind(&self) -> OpKind {
        match self {
            DomainAction::Define(_) => OpKind::Define,
            DomainAction::Start { .. } => OpKind::Start,
            DomainAction::Pause => OpKind::Pause,
            DomainAction::Unpause => OpKind::Unpause,
            DomainAction::Shutdown => OpKind::Shutdown,
            DomainAction::Destroy => OpKind::Destroy,
            DomainAction::Undefine { .. } => OpKind::Undefine,
        }
    }
}

/// The description of one `domain` command.
#[derive(Debug)]
pub(crate) struct DomainCommand {
    kind: OpKind,
    steps: &'static [StepRule],
    rules: &'static [Rule],
}

static SIMPLE_RULES: [Rule; 2] = [
    Rule {
        interrupted: "after a step failed",
        recovery: "roll back: nothing to undo (a failed step has no effect)",
    },
    Rule {
        interrupted: "anywhere else",
        recovery: "roll forward: finish it on the boot it began with",
    },
];

static UNDEFINE_RULES: [Rule; 2] = [
    Rule {
        interrupted: "after its `undefine` step failed",
        recovery: "roll back: nothing to undo",
    },
    Rule {
        interrupted: "anywhere else",
        recovery: "roll forward: remove the domain, release its snapshots' images",
    },
];

/// `define`.
pub(crate) static DEFINE: DomainCommand = DomainCommand {
    kind: OpKind::Define,
    steps: &[StepRule::redo(
        StepKind::Define,
        "define the domain unless it exists",
    )],
    rules: &SIMPLE_RULES,
};

/// `start`.
pub(crate) static START: DomainCommand = DomainCommand {
    kind: OpKind::Start,
    steps: &[
        StepRule::redo(StepKind::SetWorkload, "set what the guest runs"),
        StepRule::redo(
            StepKind::Start,
            "start the domain unless it is up (paused if asked); let its own boot run",
        )
        .boots(),
    ],
    rules: &SIMPLE_RULES,
};

/// `pause`.
pub(crate) static PAUSE: DomainCommand = DomainCommand {
    kind: OpKind::Pause,
    steps: &[StepRule::redo(
        StepKind::Pause,
        "pause the boot found at the start, if it still runs",
    )],
    rules: &SIMPLE_RULES,
};

/// `unpause`.
pub(crate) static UNPAUSE: DomainCommand = DomainCommand {
    kind: OpKind::Unpause,
    steps: &[StepRule::redo(
        StepKind::Unpause,
        "unpause the boot found at the start, if it is still paused",
    )],
    rules: &SIMPLE_RULES,
};

/// `shutdown`.
pub(crate) static SHUTDOWN: DomainCommand = DomainCommand {
    kind: OpKind::Shutdown,
    steps: &[StepRule::redo(
        StepKind::Shutdown,
        "shut down the boot found at the start, if it is still up",
    )],
    rules: &SIMPLE_RULES,
};

/// `destroy`.
pub(crate) static DESTROY: DomainCommand = DomainCommand {
    kind: OpKind::Destroy,
    steps: &[StepRule::redo(
        StepKind::Destroy,
        "destroy the boot found at the start, if it is still up",
    )],
    rules: &SIMPLE_RULES,
};

/// `undefine`.
pub(crate) static UNDEFINE: DomainCommand = DomainCommand {
    kind: OpKind::Undefine,
    steps: &[
        StepRule::redo(
            StepKind::Undefine,
            "remove the domain and its files unless it is gone",
        ),
        StepRule::redo(
            StepKind::ReleaseImage,
            "release the memory image of a snapshot removed with the domain",
        ),
    ],
    rules: &UNDEFINE_RULES,
};

impl Operation for DomainCommand {
    fn kind(&self) -> OpKind {
        self.kind
    }

    fn steps(&self) -> &'static [StepRule] {
        self.steps
    }

    fn rules(&self) -> &'static [Rule] {
        self.rules
    }

    fn decide(&self, _plan: &[Step], progress: &Progress) -> (Decision, String) {
        let kind = self.kind.as_str();
        let back = match self.kind {
            OpKind::Undefine => progress.failed.contains(&Step::Undefine),
            _ => progress.any_failed(),
        };
        if back {
            (
                Decision::Back,
                format!("the {kind} failed before it had any effect: nothing to undo"),
            )
        } else {
            (
                Decision::Forward,
                format!("finish the {kind} on the boot it began with"),
            )
        }
    }

    fn redo(&self, e: &mut Engine, op: &OpRecord, step: &Step) -> Result<(StepDetail, Batch)> {
        let name = op.domain();
        let mut batch = Batch::new();
        match step {
            Step::Define => {
                let spec = op
                    .progress
                    .notes
                    .iter()
                    .find_map(|n| match n {
                        OpNote::DomainSpec {
                            memory_bytes,
                            disk_sizes,
                            workload,
                        } => Some(DomainSpec {
                            memory_bytes: *memory_bytes,
                            disk_sizes: disk_sizes.clone(),
                            workload: workload.clone(),
                        }),
                        _ => None,
                    })
                    .ok_or_else(|| Error::Corrupt {
                        op: op.op(),
                        what: "its notes".into(),
                        why: "hold no domain configuration".into(),
                    })?;
                match e.host.domain(name) {
                    Ok(_) => {}
                    Err(xen::Error::NoSuchDomain(_)) => {
                        e.host.define_domain(name, &spec)?;
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            Step::SetWorkload(w) => e.host.set_domain_workload(name, w)?,
            Step::Start => {
                let info = e.host.domain(name)?;
                let paused = op.begun.params.target_state == Some(DomainState::Paused);
                match info.state {
                    RunState::Shutoff => e.host.start(name, paused)?,
                    // A start interrupted between booting the domain paused and letting it
                    // run: its own boot is let run; another one is left as it is.
                    RunState::Paused if !paused && op.knows_boot(info.instance) => {
                        e.host.unpause(name)?
                    }
                    _ => {}
                }
            }
            Step::Pause | Step::Unpause | Step::Shutdown | Step::Destroy => {
                let info = e.host.domain(name)?;
                if op.is_begin_boot(info.instance) {
                    match (step, info.state) {
                        (Step::Pause, RunState::Running) => e.host.pause(name)?,
                        (Step::Unpause, RunState::Paused) => e.host.unpause(name)?,
                        (Step::Shutdown, s) if s.is_active() => e.host.shutdown_domain(name)?,
                        (Step::Destroy, s) if s.is_active() => e.host.destroy(name)?,
                        _ => {}
                    }
                }
            }
            Step::Undefine => match e.host.domain(name) {
                Ok(_) => e.host.undefine_domain(name)?,
                Err(xen::Error::NoSuchDomain(_)) => {}
                Err(err) => return Err(err.into()),
            },
            Step::ReleaseImage(snapshot) => batch = e.release_image_of(op, snapshot)?,
            other => return Err(not_a_step(op, other)),
        }
        Ok((StepDetail::default(), batch))
    }

    fn commit(&self, _e: &mut Engine, op: &OpRecord) -> Result<CatalogChange> {
        let names = &op.begun.params.delete_names;
        Ok(if names.is_empty() {
            CatalogChange::Unchanged
        } else {
            CatalogChange::Deleted {
                names: names.clone(),
            }
        })
    }
}

/// The error of a domain in the wrong run state for `operation`.
fn wrong_state(info: &DomainInfo, operation: &'static str, needs: &'static str) -> Error {
    Error::Host(xen::Error::WrongState {
        domain: info.name.clone(),
        state: info.state,
        operation,
        needs,
    })
}

/// Refuses unless the host implements `feature`.
fn require(e: &Engine, feature: Feature) -> Result<()> {
    if e.host.supports(feature) {
        Ok(())
    } else {
        Err(xen::unsupported(e.host.kind(), feature).into())
    }
}

impl Engine {
    /// Runs a `domain` command on domain `name` as a journaled operation under its lock.
    /// Returns the domain as the host shows it afterwards (None once undefined).
    pub fn domain_command(
        &mut self,
        name: &str,
        action: &DomainAction,
    ) -> Result<Option<DomainInfo>> {
        self.prepare_domain(name)?;
        let kind = action.kind();
        let mut params = OpParams::default();
        let mut notes = Vec::new();
        let (prior, instance, plan) = match action {
            DomainAction::Define(spec) => {
                require(self, Feature::Definitions)?;
                if spec.workload.is_some() {
                    require(self, Feature::Workloads)?;
                }
                match self.host.domain(name) {
                    Ok(_) => return Err(xen::Error::DomainExists(name.to_string()).into()),
                    Err(xen::Error::NoSuchDomain(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                notes.push(OpNote::DomainSpec {
                    memory_bytes: spec.memory_bytes,
                    disk_sizes: spec.disk_sizes.clone(),
                    workload: spec.workload.clone(),
                });
                (RunState::Shutoff, None, vec![Step::Define])
            }
            other => {
                let info = self.host.domain(name)?;
                let plan = match other {
                    DomainAction::Start { paused, workload } => {
                        if info.state.is_active() {
                            return Err(wrong_state(&info, "start", "shut off"));
                        }
                        params.target_state = Some(if *paused {
                            DomainState::Paused
                        } else {
                            DomainState::Running
                        });
                        let mut plan = Vec::new();
                        if let Some(w) = workload {
                            require(self, Feature::Workloads)?;
                            plan.push(Step::SetWorkload(w.clone()));
                        }
                        plan.push(Step::Start);
                        plan
                    }
                    DomainAction::Pause | DomainAction::Unpause => {
                        if !info.state.is_active() {
                            let operation = match other {
                                DomainAction::Pause => "pause",
                                _ => "unpause",
                            };
                            return Err(wrong_state(&info, operation, "running or paused"));
                        }
                        vec![match other {
                            DomainAction::Pause => Step::Pause,
                            _ => Step::Unpause,
                        }]
                    }
                    DomainAction::Shutdown => {
                        require(self, Feature::Shutdown)?;
                        vec![Step::Shutdown]
                    }
                    DomainAction::Destroy => vec![Step::Destroy],
                    DomainAction::Undefine { snapshots } => {
                        require(self, Feature::Definitions)?;
                        if info.state.is_active() {
                            return Err(wrong_state(&info, "undefine", "shut off"));
                        }
                        let catalog = self.journal.domain_catalog(name)?;
                        let mut plan = vec![Step::Undefine];
                        if !catalog.snapshots.is_empty() {
                            let names: Vec<String> = catalog.snapshots.keys().cloned().collect();
                            if !snapshots {
                                return Err(Error::Refused(format!(
                                    "domain {name:?} has {} snapshot(s) ({}): undefining it \
                                     would strand them. Delete them first, or pass --snapshots \
                                     to delete them with the domain",
                                    names.len(),
                                    names.join(", ")
                                )));
                            }
                            let mut ordered = Vec::new();
                            for root in catalog.children(None) {
                                ordered.extend(catalog.subtree(&root.name));
                            }
                            ordered.extend(
                                names
                                    .iter()
                                    .filter(|n| !ordered.contains(n))
                                    .cloned()
                                    .collect::<Vec<_>>(),
                            );
                            for s in &ordered {
                                if catalog.snapshots[s].memory_image.is_some() {
                                    plan.push(Step::ReleaseImage(s.clone()));
                                }
                            }
                            params.delete_names = ordered;
                        }
                        plan
                    }
                    DomainAction::Define(_) => unreachable!("handled above"),
                };
                (info.state, info.instance, plan)
            }
        };
        self.execute(NewOp {
            kind,
            domain: name.to_string(),
            snapshot: String::new(),
            prior,
            instance,
            plan,
            params,
            notes,
        })?;
        match self.host.domain(name) {
            Ok(info) => Ok(Some(info)),
            Err(xen::Error::NoSuchDomain(_)) if kind == OpKind::Undefine => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
