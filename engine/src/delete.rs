//! `delete`: remove a snapshot (or a subtree) from every disk, the catalog and the memory
//! image store. Children of a deleted snapshot move to its parent.

use journal::{Batch, CatalogChange, Decision, OpKind, OpParams, SnapshotKind, StepDetail};

use crate::create::not_a_step;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::plan::{Operation, Progress, Rule, Step, StepKind, StepRule};
use crate::runner::{NewOp, OpRecord};

/// What to delete.
#[derive(Debug, Clone, Default)]
pub struct DeleteRequest {
    /// Domain name.
    pub domain: String,
    /// Snapshot name.
    pub name: String,
    /// Delete its whole subtree too.
    pub children: bool,
}

/// The description of `delete`.
#[derive(Debug)]
pub(crate) struct Delete;

/// The one instance.
pub(crate) static DELETE: Delete = Delete;

const STEPS: &[StepRule] = &[
    StepRule::redo(
        StepKind::DeleteDisk,
        "delete the disk snapshot tag / remove the snapshot's image from the chain",
    ),
    StepRule::redo(StepKind::ReleaseImage, "release the memory image"),
];

const RULES: &[Rule] = &[Rule {
    interrupted: "anywhere",
    recovery: "roll forward",
}];

impl Operation for Delete {
    fn kind(&self) -> OpKind {
        OpKind::Delete
    }

    fn steps(&self) -> &'static [StepRule] {
        STEPS
    }

    fn rules(&self) -> &'static [Rule] {
        RULES
    }

    fn decide(&self, _plan: &[Step], _progress: &Progress) -> (Decision, String) {
        (Decision::Forward, "deletes always finish".into())
    }

    fn redo(&self, e: &mut Engine, op: &OpRecord, step: &Step) -> Result<(StepDetail, Batch)> {
        match step {
            Step::DeleteDisk(name, target) => {
                e.delete_disk_snapshot(op.domain(), name, target)?;
                Ok((StepDetail::default(), Batch::new()))
            }
            Step::ReleaseImage(name) => Ok((StepDetail::default(), e.release_image_of(op, name)?)),
            other => Err(not_a_step(op, other)),
        }
    }

    fn commit(&self, _e: &mut Engine, op: &OpRecord) -> Result<CatalogChange> {
        Ok(CatalogChange::Deleted {
            names: op.begun.params.delete_names.clone(),
        })
    }
}

impl Engine {
    /// Deletes a snapshot (with `children`, its subtree); returns the names deleted.
    pub fn delete(&mut self, req: &DeleteRequest) -> Result<Vec<String>> {
        let (info, catalog) = self.prepare(&req.domain, &req.name)?;
        if !catalog.snapshots.contains_key(&req.name) {
            return Err(Error::NoSuchSnapshot {
                domain: req.domain.clone(),
                name: req.name.clone(),
            });
        }
        let names = if req.children {
            catalog.subtree(&req.name)
        } else {
            vec![req.name.clone()]
        };
        let mut plan = Vec::new();
        for name in &names {
            let snap = &catalog.snapshots[name];
            for d in &snap.disks {
                plan.push(Step::DeleteDisk(name.clone(), d.target.clone()));
            }
            if snap.kind == SnapshotKind::Checkpoint {
                plan.push(Step::ReleaseImage(name.clone()));
            }
        }
        self.execute(NewOp {
            kind: OpKind::Delete,
            domain: req.domain.clone(),
            snapshot: req.name.clone(),
            prior: info.state,
            instance: info.instance,
            plan,
            params: OpParams {
                delete_names: names.clone(),
                ..OpParams::default()
            },
            notes: Vec::new(),
        })?;
        Ok(names)
    }

    /// Deletes snapshot `name`'s part of disk `target` (as the catalog records it): its tag,
    /// or for an external snapshot its image, pulled out of the chain. Ok if the disk or the
    /// snapshot is gone already.
    fn delete_disk_snapshot(&mut self, domain: &str, name: &str, target: &str) -> Result<()> {
        let catalog = self.journal.domain_catalog(domain)?;
        let disk = catalog
            .snapshots
            .get(name)
            .and_then(|s| s.disks.iter().find(|d| d.target == target));
        let exists = self.host.domain(domain)?.disk(target).is_some();
        match (disk, exists) {
            (Some(d), true) if d.external => {
                self.host
                    .remove_image(domain, target, std::path::Path::new(&d.path))?
            }
            (Some(d), true) => self.host.delete_disk_snapshot(domain, target, &d.tag)?,
            _ => {}
        }
        Ok(())
    }

    /// Releases the memory image of snapshot `name` of the operation's domain (as the
    /// catalog records it): the batch to commit with the step.
    pub(crate) fn release_image_of(&mut self, op: &OpRecord, name: &str) -> Result<Batch> {
        let image = self
            .journal
            .domain_catalog(op.domain())?
            .snapshots
            .get(name)
            .and_then(|s| s.memory_image.clone());
        match image {
            Some(image) => Ok(self.memory.release(&self.journal, &image)?),
            None => Ok(Batch::new()),
        }
    }
}
