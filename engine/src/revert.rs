//! `revert`: bring a snapshot's instant back — memory and every disk — running or paused.

use journal::{
    Batch, DomainState, Event, OpBegun, OpKind, OpParams, SnapshotKind, SnapshotMeta, StepDetail,
};
use xen::RunState;

use std::path::{Path, PathBuf};

use crate::create::overlay_path;
use crate::engine::{error_chain, Engine};
use crate::error::{Error, Result};
use crate::plan::{Progress, Step};

/// What to revert to.
#[derive(Debug, Clone, Default)]
pub struct RevertRequest {
    /// Domain name.
    pub domain: String,
    /// Snapshot name.
    pub name: String,
    /// The run state to end in; default: the snapshot's (shut off for disk-only).
    pub state: Option<DomainState>,
}

impl Engine {
    /// Reverts the domain to a snapshot. Everything that could make it fail part-way
    /// (missing disk snapshots, a damaged memory image) is checked before the domain is
    /// touched.
    pub fn revert(&mut self, req: &RevertRequest) -> Result<SnapshotMeta> {
        let (info, catalog) = self.prepare(&req.domain, &req.name)?;
        let snap =
            catalog
                .snapshots
                .get(&req.name)
                .cloned()
                .ok_or_else(|| Error::NoSuchSnapshot {
                    domain: req.domain.clone(),
                    name: req.name.clone(),
                })?;
        if req.state == Some(DomainState::Shutoff) && snap.kind == SnapshotKind::Checkpoint {
            // A checkpoint's point is its memory; shut off is not a state to revert into.
            return Err(Error::Refused(
                "a checkpoint reverts to running or paused".into(),
            ));
        }
        for d in &snap.disks {
            let Some(now) = info.disk(&d.target) else {
                return Err(Error::Refused(format!(
                    "snapshot {:?} has disk {} but domain {:?} no longer does; nothing was changed",
                    req.name, d.target, req.domain
                )));
            };
            // An internal snapshot lives in the disk's own storage: a disk now on another
            // image or volume (or of another kind) does not have it, whatever it is called.
            if !d.external && now.path.display().to_string() != d.path {
                return Err(Error::Refused(format!(
                    "disk {} of domain {:?} is {} now, but snapshot {:?} was taken of {}; \
                     nothing was changed",
                    d.target,
                    req.domain,
                    now.path.display(),
                    req.name,
                    d.path
                )));
            }
            if let Some(why) = now.snapshot_refusal(&req.domain, d.external) {
                return Err(Error::Refused(format!("{why}; nothing was changed")));
            }
            if d.external {
                if !Path::new(&d.path).exists() {
                    return Err(Error::Refused(format!(
                        "the image {} of disk {} (snapshot {:?}) is missing; run `domsnap \
                         verify`; nothing was changed",
                        d.path, d.target, req.name
                    )));
                }
                continue;
            }
            let tags = self.host.disk_snapshots(&req.domain, &d.target)?;
            if !tags.contains(&d.tag) {
                return Err(Error::Refused(format!(
                    "disk {} of domain {:?} has lost its snapshot {:?} (of snapshot {:?}); \
                     run `domsnap verify`; nothing was changed",
                    d.target, req.domain, d.tag, req.name
                )));
            }
        }
        let target = match snap.kind {
            SnapshotKind::Checkpoint => req.state.unwrap_or(snap.domain_state),
            SnapshotKind::DiskOnly => req.state.unwrap_or(DomainState::Shutoff),
        };
        let mut plan = Vec::new();
        if snap.kind == SnapshotKind::Checkpoint {
            plan.push(Step::VerifyImage);
        }
        plan.push(Step::StopDomain);
        for d in &snap.disks {
            plan.push(Step::RevertDisk(d.target.clone()));
            if d.external {
                plan.push(Step::DiscardImage(d.target.clone()));
            }
        }
        if snap.kind == SnapshotKind::Checkpoint {
            plan.push(Step::RestoreMemory);
        }
        plan.push(Step::SetRunState);

        let begun = self.begin(
            OpKind::Revert,
            &info,
            &req.name,
            &plan,
            OpParams {
                target_state: Some(target),
                snapshot: Some(snap.clone()),
                disk_images: info
                    .disks
                    .iter()
                    .map(|d| (d.target.clone(), d.path.display().to_string()))
                    .collect(),
                ..OpParams::default()
            },
        )?;
        let mut progress = Progress::default();
        for step in &plan {
            progress.begun.push(step.clone());
            if let Err(err) = self.run_step(&begun, step, |e| e.revert_step(&begun, step)) {
                let destructive = progress.has_begun(&Step::StopDomain);
                let aftermath = if destructive {
                    "the domain was already stopped; the next domsnap command finishes the revert"
                        .to_string()
                } else {
                    match self.end_rolled_back(&begun, &error_chain(&err)) {
                        Ok(()) => "nothing was changed".into(),
                        Err(e) => format!("journaling the roll-back failed: {}", error_chain(&e)),
                    }
                };
                return Err(Error::StepFailed {
                    op: "revert",
                    domain: req.domain.clone(),
                    snapshot: req.name.clone(),
                    step: step.to_string(),
                    aftermath,
                    source: Box::new(err),
                });
            }
            progress.done.push(step.clone());
        }
        self.commit_revert(&begun)?;
        Ok(snap)
    }

    /// The forward action of one revert step. Each is idempotent: recovery redoes them.
    fn revert_step(&mut self, b: &OpBegun, step: &Step) -> Result<(StepDetail, Batch)> {
        let domain = &b.domain;
        let snap = b
            .params
            .snapshot
            .as_ref()
            .ok_or_else(|| Error::Refused(format!("operation {} has no snapshot", b.op)))?;
        let mut detail = StepDetail::default();
        match step {
            Step::VerifyImage => {
                // Every chunk read (pack by pack, in order) and checked before anything is
                // touched. The reads leave the image in the page cache, where the restore
                // reads it again, checking every chunk as it streams it: the image is read
                // from disk once (twice if it is larger than the page cache can hold).
                let image = snap.memory_image.as_deref().unwrap_or_default();
                detail.bytes_read = Some(self.memory.verify(&self.journal, image)?);
            }
            Step::StopDomain => self.host.destroy(domain)?,
            Step::RevertDisk(target) => {
                let d = snap
                    .disks
                    .iter()
                    .find(|d| &d.target == target)
                    .ok_or_else(|| Error::Refused(format!("snapshot has no disk {target}")))?;
                if self.host.domain(domain)?.state.is_active() {
                    self.host.destroy(domain)?;
                }
                if d.external {
                    let base = Path::new(&d.path);
                    let overlay = overlay_path(base, target, b.op);
                    self.host
                        .revert_external_snapshot(domain, target, base, &overlay)?;
                } else {
                    self.host.apply_disk_snapshot(domain, target, &d.tag)?;
                }
            }
            Step::DiscardImage(target) => {
                let old = b
                    .params
                    .disk_images
                    .iter()
                    .find(|(t, _)| t == target)
                    .map(|(_, p)| PathBuf::from(p));
                let current = self
                    .host
                    .domain(domain)?
                    .disk(target)
                    .map(|d| d.path.clone());
                let frozen: Vec<String> = self
                    .journal
                    .domain_catalog(domain)?
                    .snapshots
                    .values()
                    .flat_map(|s| s.disks.iter().map(|d| d.path.clone()))
                    .collect();
                if let Some(old) = old {
                    let needed = frozen.contains(&old.display().to_string());
                    if Some(&old) != current.as_ref() && !needed {
                        self.host.remove_image(domain, target, &old)?;
                    }
                }
            }
            Step::RestoreMemory => {
                let image = snap.memory_image.clone().unwrap_or_default();
                // A restore interrupted part-way left a domain that is not the snapshot's.
                self.host.destroy(domain)?;
                let total = snap.memory_bytes;
                let observer = self.observer.as_ref();
                let host = self.host.as_ref();
                let memory = &self.memory;
                let journal = &self.journal;
                let (reader, mut writer) = std::io::pipe().map_err(|source| Error::Io {
                    op: "create pipe for memory restore",
                    path: self.state.clone(),
                    source,
                })?;
                let (restored, fed) = std::thread::scope(|s| {
                    let feeder = s.spawn(move || {
                        let mut progress = |n: u64| observer.bytes(n, total);
                        memory.restore(journal, &image, &mut writer, &mut progress)
                        // `writer` drops here: the host sees the end of the stream.
                    });
                    let mut reader = reader;
                    let restored = host.restore_memory(domain, &mut reader);
                    drop(reader);
                    (restored, feeder.join())
                });
                let outcome = match (restored, fed) {
                    (Ok(()), Ok(Ok(n))) => Ok(n),
                    (_, Ok(Err(e))) => Err(e.into()),
                    (Err(e), _) => Err(e.into()),
                    (Ok(()), Err(_)) => {
                        Err(Error::Refused("memory restore thread panicked".into()))
                    }
                };
                let written = match outcome {
                    Ok(n) => n,
                    Err(e) => {
                        // Never leave a domain with a partial or unverified memory.
                        self.host.destroy(domain)?;
                        return Err(e);
                    }
                };
                // Memory is the snapshot's image now: the next checkpoint needs to read
                // only what the guest writes from here on.
                self.host.reset_dirty_pages(domain, snap.op)?;
                detail.bytes_read = Some(written);
            }
            Step::SetRunState => {
                let target = b.params.target_state.unwrap_or(DomainState::Shutoff);
                let now = self.host.domain(domain)?.state;
                match (target, now) {
                    (DomainState::Running, RunState::Paused) => self.host.unpause(domain)?,
                    (DomainState::Running, RunState::Shutoff) => self.host.start(domain, false)?,
                    (DomainState::Paused, RunState::Shutoff) => self.host.start(domain, true)?,
                    (DomainState::Paused, RunState::Running) => self.host.pause(domain)?,
                    (DomainState::Shutoff, RunState::Running | RunState::Paused) => {
                        self.host.destroy(domain)?
                    }
                    _ => {}
                }
            }
            other => {
                return Err(Error::Refused(format!(
                    "step {other} is not part of revert"
                )))
            }
        }
        Ok((detail, Batch::new()))
    }

    fn commit_revert(&mut self, b: &OpBegun) -> Result<()> {
        crate::engine::crash_point("engine::revert::before-commit");
        self.end(
            Event::OpCommitted {
                op: b.op,
                at: journal::now_millis(),
                change: journal::CatalogChange::Reverted {
                    name: b.snapshot.clone(),
                },
            },
            Batch::new(),
        )
    }

    /// Rolls a revert forward: redoes every step from the first one not done, then commits.
    pub(crate) fn forward_revert(&mut self, b: &OpBegun, progress: &Progress) -> Result<()> {
        let plan: Vec<Step> = b.steps.iter().filter_map(|s| Step::parse(s)).collect();
        let first = plan
            .iter()
            .position(|s| !progress.is_done(s))
            .unwrap_or(plan.len());
        for step in &plan[first..] {
            if *step == Step::VerifyImage {
                continue;
            }
            self.run_step(b, step, |e| e.revert_step(b, step))?;
        }
        self.commit_revert(b)
    }

    /// Rolls back a revert that stopped before anything destructive.
    pub(crate) fn undo_revert(&mut self, b: &OpBegun, reason: &str) -> Result<()> {
        self.end_rolled_back(b, reason)
    }
}
