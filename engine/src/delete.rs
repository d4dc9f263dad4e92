//! `delete`: remove a snapshot (or a subtree) from every disk, the catalog and the memory
//! image store. Children of a deleted snapshot move to its parent.

use journal::{Batch, Event, OpBegun, OpKind, OpParams, SnapshotKind, StepDetail};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::plan::{Progress, Step};

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
        let begun = self.begin(
            OpKind::Delete,
            &info,
            &req.name,
            &plan,
            OpParams {
                delete_names: names.clone(),
                ..OpParams::default()
            },
        )?;
        self.forward_delete(&begun, &Progress::default())
            .map_err(|err| Error::StepFailed {
                op: "delete",
                domain: req.domain.clone(),
                snapshot: req.name.clone(),
                step: "delete".into(),
                aftermath: "deletes always finish: the next domsnap command completes it".into(),
                source: Box::new(err),
            })?;
        Ok(names)
    }

    /// Runs every delete step not done yet, then commits. Used by recovery too.
    pub(crate) fn forward_delete(&mut self, b: &OpBegun, progress: &Progress) -> Result<()> {
        let catalog = self.journal.domain_catalog(&b.domain)?;
        let plan: Vec<Step> = b.steps.iter().filter_map(|s| Step::parse(s)).collect();
        for step in &plan {
            if progress.is_done(step) {
                continue;
            }
            self.run_step(b, step, |e| match step {
                Step::DeleteDisk(name, target) => {
                    let disk = catalog
                        .snapshots
                        .get(name)
                        .and_then(|s| s.disks.iter().find(|d| &d.target == target));
                    let exists = e.host.domain(&b.domain)?.disk(target).is_some();
                    match (disk, exists) {
                        (Some(d), true) if d.external => {
                            e.host
                                .remove_image(&b.domain, target, std::path::Path::new(&d.path))?
                        }
                        (Some(d), true) => {
                            e.host.delete_disk_snapshot(&b.domain, target, &d.tag)?
                        }
                        _ => {}
                    }
                    Ok((StepDetail::default(), Batch::new()))
                }
                Step::ReleaseImage(name) => {
                    let image = catalog
                        .snapshots
                        .get(name)
                        .and_then(|s| s.memory_image.clone());
                    let batch = match image {
                        Some(image) => e.memory.release(&e.journal, &image)?,
                        None => Batch::new(),
                    };
                    Ok((StepDetail::default(), batch))
                }
                other => Err(Error::Refused(format!(
                    "step {other} is not part of delete"
                ))),
            })?;
        }
        crate::engine::crash_point("engine::delete::before-commit");
        self.end(
            Event::OpCommitted {
                op: b.op,
                at: journal::now_millis(),
                change: journal::CatalogChange::Deleted {
                    names: b.params.delete_names.clone(),
                },
            },
            Batch::new(),
        )
    }
}
