//! `create`: take a checkpoint (memory + every disk at one instant) or a disk-only snapshot.

use journal::{
    Batch, Decision, DiskSnapshot, DomainState, Event, OpBegun, OpKind, OpParams, SnapshotKind,
    SnapshotMeta, StepDetail,
};
use std::path::{Path, PathBuf};

use xen::RunState;

use crate::engine::{error_chain, Engine};
use crate::error::{Error, Result};
use crate::plan::{decide, Progress, Step};

/// What to create.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// Domain name.
    pub domain: String,
    /// Snapshot name.
    pub name: String,
    /// Disks only, no memory.
    pub disk_only: bool,
    /// Accept a crash-consistent disk-only snapshot of a running domain.
    pub crash_consistent: bool,
    /// External (overlay) disk snapshots.
    pub external: bool,
    /// Free text.
    pub description: Option<String>,
}

/// The journal's name for a host run state.
pub(crate) fn journal_state(s: RunState) -> DomainState {
    match s {
        RunState::Shutoff => DomainState::Shutoff,
        RunState::Running => DomainState::Running,
        RunState::Paused => DomainState::Paused,
    }
}

/// The qcow2 snapshot tag of snapshot `name` taken by operation `op`: checkable by recovery.
pub fn disk_tag(name: &str, op: u64) -> String {
    format!("{name}@{op}")
}

/// The overlay an external snapshot (or revert) by operation `op` gives disk `target` whose
/// image is `image`: beside it, named after the target and the operation.
pub(crate) fn overlay_path(image: &Path, target: &str, op: u64) -> PathBuf {
    image
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(format!("{target}-{op}.qcow2"))
}

/// A writer that counts bytes and reports progress.
struct Counting<'a, W: std::io::Write> {
    inner: W,
    bytes: u64,
    total: u64,
    observer: &'a dyn crate::engine::Observer,
}

impl<W: std::io::Write> std::io::Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        self.observer.bytes(self.bytes, self.total);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Engine {
    /// Creates a snapshot. A shut-off domain gets a disk-only snapshot (it has no memory);
    /// a running or paused one a checkpoint unless `disk_only`.
    pub fn create(&mut self, req: &CreateRequest) -> Result<SnapshotMeta> {
        let (info, catalog) = self.prepare(&req.domain, &req.name)?;
        if catalog.snapshots.contains_key(&req.name) {
            return Err(Error::SnapshotExists {
                domain: req.domain.clone(),
                name: req.name.clone(),
            });
        }
        if let Some(other) = catalog
            .snapshots
            .values()
            .find(|s| s.disks.iter().any(|d| d.external != req.external))
        {
            let (has, asked) = if req.external {
                ("internal", "external")
            } else {
                ("external", "internal")
            };
            return Err(Error::Refused(format!(
                "domain {:?} has {has} snapshots (e.g. {:?}); its snapshots must all be {has}, \
                 so an {asked} one cannot be added. Nothing was changed.",
                req.domain, other.name
            )));
        }
        if info.disks.is_empty() && (req.disk_only || info.state == RunState::Shutoff) {
            return Err(Error::Refused(format!(
                "domain {:?} has no disks: a disk-only snapshot would hold nothing",
                req.domain
            )));
        }
        if let Some(why) = info.snapshot_refusal(req.external) {
            return Err(Error::Refused(format!("{why}. Nothing was changed.")));
        }
        let state = info.state;
        let disk_only = req.disk_only || state == RunState::Shutoff;
        if req.disk_only && state == RunState::Running && !req.crash_consistent {
            return Err(Error::Refused(format!(
                "domain {:?} is running: a disk-only snapshot of a running domain is only \
                 crash-consistent (guest caches are not flushed). Pass --crash-consistent to \
                 accept that, or take a checkpoint (without --disk-only). Nothing was changed.",
                req.domain
            )));
        }
        if req.crash_consistent && !(req.disk_only && state == RunState::Running) {
            return Err(Error::Refused(
                "--crash-consistent applies only to --disk-only snapshots of a running domain"
                    .into(),
            ));
        }

        let op = self.journal.next_seq();
        let mut plan = Vec::new();
        if disk_only && state == RunState::Running {
            plan.push(Step::Pause);
        }
        if !disk_only {
            plan.push(Step::SaveMemory);
        }
        for d in &info.disks {
            plan.push(Step::SnapshotDisk(d.target.clone()));
        }
        if state == RunState::Running {
            plan.push(Step::Resume);
        }
        let meta = SnapshotMeta {
            domain: req.domain.clone(),
            name: req.name.clone(),
            parent: catalog.current.clone(),
            kind: if disk_only {
                SnapshotKind::DiskOnly
            } else {
                SnapshotKind::Checkpoint
            },
            created: journal::now_millis(),
            op,
            domain_state: journal_state(state),
            memory_image: None,
            memory_bytes: 0,
            disks: info
                .disks
                .iter()
                .map(|d| DiskSnapshot {
                    target: d.target.clone(),
                    path: d.path.display().to_string(),
                    tag: if req.external {
                        overlay_path(&d.path, &d.target, op).display().to_string()
                    } else {
                        disk_tag(&req.name, op)
                    },
                    external: req.external,
                })
                .collect(),
            description: req.description.clone(),
            crash_consistent: disk_only && state == RunState::Running,
        };
        let begun = self.begin(
            OpKind::Create,
            &info,
            &req.name,
            &plan,
            OpParams {
                disk_only,
                crash_consistent: meta.crash_consistent,
                external: req.external,
                description: req.description.clone(),
                snapshot: Some(meta),
                ..OpParams::default()
            },
        )?;
        debug_assert_eq!(begun.op, op);

        let mut progress = Progress::default();
        for step in &plan {
            progress.begun.push(step.clone());
            match self.run_step(&begun, step, |e| e.create_step(&begun, step)) {
                Ok(_) => progress.done.push(step.clone()),
                Err(err) => {
                    // The same rule as recovery's: once every data step is done the
                    // snapshot is complete and is finished, never thrown away.
                    let aftermath = match decide(OpKind::Create, &plan, &progress).0 {
                        Decision::Forward => "the snapshot itself is complete; the next domsnap \
                            command finishes the operation and restores the run state"
                            .to_string(),
                        Decision::Back => {
                            match self.undo_create(&begun, &progress, &error_chain(&err)) {
                                Ok(()) => {
                                    "the snapshot was rolled back; the domain is as it was".into()
                                }
                                Err(undo) => format!(
                                    "rolling back failed too ({}); the next domsnap command will \
                                     retry",
                                    error_chain(&undo)
                                ),
                            }
                        }
                    };
                    return Err(Error::StepFailed {
                        op: "create",
                        domain: req.domain.clone(),
                        snapshot: req.name.clone(),
                        step: step.to_string(),
                        aftermath,
                        source: Box::new(err),
                    });
                }
            }
        }
        self.commit_create(&begun)
    }

    /// The forward action of one create step.
    fn create_step(&mut self, b: &OpBegun, step: &Step) -> Result<(StepDetail, Batch)> {
        let domain = &b.domain;
        match step {
            Step::Pause => {
                self.host.pause(domain)?;
                Ok((StepDetail::default(), Batch::new()))
            }
            Step::SaveMemory => {
                let total = self.host.domain(domain)?.memory_bytes;
                let parent = self.parent_checkpoint(b)?;
                let host = self.host.as_ref();
                let observer = self.observer.as_ref();
                // Where the host logs the pages written since the parent checkpoint was
                // taken, only those are read.
                let mut captured = None;
                let mut read_pages = None;
                if let Some((image, parent_op)) = &parent {
                    if host.dirty_pages(domain)?.is_some() {
                        host.pause(domain)?;
                        if let Some(dirty) = host.dirty_pages(domain)? {
                            if dirty.base == *parent_op {
                                read_pages = Some(dirty.pages.len());
                                captured = self.memory.capture_pages(
                                    &self.journal,
                                    b.op,
                                    image,
                                    total,
                                    &dirty.pages,
                                    |sink| {
                                        host.read_memory_pages(domain, &dirty.pages, sink)?;
                                        Ok::<(), Error>(())
                                    },
                                )?;
                            }
                        }
                    }
                }
                let note = read_pages.filter(|_| captured.is_some()).map(|n| {
                    format!("read only the {n} pages the domain wrote since its parent checkpoint")
                });
                let captured = match captured {
                    Some(c) => c,
                    None => self.memory.capture(
                        &self.journal,
                        b.op,
                        parent.as_ref().map(|(image, _)| image.as_str()),
                        |sink| {
                            let mut counting = Counting {
                                inner: sink,
                                bytes: 0,
                                total,
                                observer,
                            };
                            host.save_memory(domain, &mut counting)?;
                            Ok::<(), Error>(())
                        },
                    )?,
                };
                // From here on the log holds what the guest writes after this checkpoint.
                host.reset_dirty_pages(domain, b.op)?;
                crate::engine::crash_point("engine::create::save-memory-ingested");
                let sealed = self.memory.seal(captured)?;
                Ok((
                    StepDetail {
                        bytes_read: Some(sealed.bytes),
                        bytes_new: Some(sealed.bytes_new),
                        image: Some(sealed.image),
                        note,
                    },
                    sealed.batch,
                ))
            }
            Step::SnapshotDisk(target) => {
                let disk = b
                    .params
                    .snapshot
                    .as_ref()
                    .and_then(|s| s.disks.iter().find(|d| &d.target == target))
                    .ok_or_else(|| {
                        Error::Refused(format!("operation {} has no disk {target}", b.op))
                    })?;
                if disk.external {
                    self.host
                        .create_external_snapshot(domain, target, Path::new(&disk.tag))?;
                } else {
                    self.host.create_disk_snapshot(domain, target, &disk.tag)?;
                }
                Ok((StepDetail::default(), Batch::new()))
            }
            Step::Resume => {
                self.resume_if_was_running(b)?;
                Ok((StepDetail::default(), Batch::new()))
            }
            other => Err(Error::Refused(format!(
                "step {other} is not part of create"
            ))),
        }
    }

    /// The memory image (and operation) of the nearest checkpoint above the snapshot being
    /// created: what its memory is compared with first.
    fn parent_checkpoint(&self, b: &OpBegun) -> Result<Option<(String, u64)>> {
        let catalog = self.journal.domain_catalog(&b.domain)?;
        let mut next = b.params.snapshot.as_ref().and_then(|s| s.parent.clone());
        let mut steps = 0;
        while let Some(name) = next {
            let Some(snap) = catalog.snapshots.get(&name) else {
                break;
            };
            if let Some(image) = &snap.memory_image {
                return Ok(Some((image.clone(), snap.op)));
            }
            next = snap.parent.clone();
            steps += 1;
            if steps > catalog.snapshots.len() {
                break;
            }
        }
        Ok(None)
    }

    /// Unpauses the domain if it was running when the operation began and is paused now.
    pub(crate) fn resume_if_was_running(&mut self, b: &OpBegun) -> Result<()> {
        if b.prior_state != DomainState::Running {
            return Ok(());
        }
        match self.host.domain(&b.domain)?.state {
            RunState::Paused => Ok(self.host.unpause(&b.domain)?),
            _ => Ok(()),
        }
    }

    /// Commits a create whose data steps are all done (normal path and roll-forward).
    pub(crate) fn commit_create(&mut self, b: &OpBegun) -> Result<SnapshotMeta> {
        let events = self.journal.op_events(b.op)?;
        let mut meta = b
            .params
            .snapshot
            .clone()
            .ok_or_else(|| Error::Refused(format!("operation {} has no snapshot", b.op)))?;
        for event in &events {
            if let Event::StepDone { step, detail, .. } = event {
                if Step::parse(step) == Some(Step::SaveMemory) {
                    meta.memory_image = detail.image.clone();
                    meta.memory_bytes = detail.bytes_read.unwrap_or(0);
                }
            }
        }
        crate::engine::crash_point("engine::create::before-commit");
        self.end(
            Event::OpCommitted {
                op: b.op,
                at: journal::now_millis(),
                change: journal::CatalogChange::Created(meta.clone()),
            },
            Batch::new(),
        )?;
        Ok(meta)
    }

    /// Rolls a create forward: resume if needed, commit.
    pub(crate) fn forward_create(&mut self, b: &OpBegun, progress: &Progress) -> Result<()> {
        let plan: Vec<Step> = b.steps.iter().filter_map(|s| Step::parse(s)).collect();
        if plan.contains(&Step::Resume) && !progress.is_done(&Step::Resume) {
            self.run_step(b, &Step::Resume, |e| {
                if e.host.domain(&b.domain)?.state.is_active() {
                    e.resume_if_was_running(b)?;
                }
                Ok((StepDetail::default(), Batch::new()))
            })?;
        }
        self.commit_create(b)?;
        Ok(())
    }

    /// Undoes every step of a create that began, in reverse, restores the run state, and
    /// journals `OpRolledBack`.
    pub(crate) fn undo_create(
        &mut self,
        b: &OpBegun,
        progress: &Progress,
        reason: &str,
    ) -> Result<()> {
        let events = self.journal.op_events(b.op)?;
        let image = events.iter().find_map(|e| match e {
            Event::StepDone { step, detail, .. } if Step::parse(step) == Some(Step::SaveMemory) => {
                detail.image.clone()
            }
            _ => None,
        });
        let undone: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                Event::StepDone { step, .. } => step.strip_prefix("undo:").map(str::to_string),
                _ => None,
            })
            .collect();
        for step in progress.begun.iter().rev() {
            if undone.contains(&step.to_string()) {
                continue;
            }
            match step {
                // An external snapshot's overlay stays as the disk's image: it is empty
                // (the domain has not run since), so the disk reads as before.
                Step::SnapshotDisk(_) if b.params.external => {}
                Step::SnapshotDisk(target) => {
                    let tag = disk_tag(&b.snapshot, b.op);
                    self.run_undo(b, step, |e| {
                        if e.host.domain(&b.domain)?.disk(target).is_some() {
                            e.host.delete_disk_snapshot(&b.domain, target, &tag)?;
                        }
                        Ok(Batch::new())
                    })?;
                }
                Step::SaveMemory => match &image {
                    Some(image) => {
                        let image = image.clone();
                        self.run_undo(b, step, |e| Ok(e.memory.release(&e.journal, &image)?))?;
                    }
                    None => self.memory.abandon(&self.journal, b.op)?,
                },
                _ => {}
            }
        }
        // The run state the domain had before: never leave it paused by us.
        if b.prior_state == DomainState::Running {
            if let Ok(info) = self.host.domain(&b.domain) {
                if info.state == RunState::Paused {
                    self.host.unpause(&b.domain)?;
                }
            }
        }
        self.end_rolled_back(b, reason)
    }
}
