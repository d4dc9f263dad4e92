//! `create`: take a checkpoint (memory + every disk at one instant) or a disk-only snapshot.

use journal::{
    Batch, CatalogChange, Decision, DiskSnapshot, DomainState, OpKind, OpParams, SnapshotKind,
    SnapshotMeta, StepDetail,
};
use std::path::{Path, PathBuf};

use xen::RunState;

use crate::engine::{crash_point, Engine};
use crate::error::{host_kind, Error, ErrorKind, Result};
use crate::plan::{Failpoint, Operation, Progress, Rule, Step, StepKind, StepRule};
use crate::runner::{journal_state, NewOp, OpRecord};

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

/// The description of `create`.
#[derive(Debug)]
pub(crate) struct Create;

/// The one instance.
pub(crate) static CREATE: Create = Create;

const STEPS: &[StepRule] = &[
    StepRule::undo(
        StepKind::Pause,
        "pause the domain",
        "restore the run state it had (same boot only)",
    ),
    StepRule::undo(
        StepKind::SaveMemory,
        "save memory into the image store; the domain stays paused",
        "drop what it stored but did not record; restore the run state it had",
    ),
    StepRule::undo(
        StepKind::SnapshotDisk,
        "take the disk snapshot (internal tag `name@op`, or an external overlay)",
        "delete the internal tag (an external overlay stays: it is empty)",
    ),
    StepRule::redo(
        StepKind::Resume,
        "unpause if it was running (same boot only)",
    ),
];

const RULES: &[Rule] = &[
    Rule {
        interrupted: "before every data step (memory, each disk) finished",
        recovery:
            "roll back: delete the disk snapshots, release the memory image, restore the run state",
    },
    Rule {
        interrupted: "after every data step finished",
        recovery: "roll forward: resume if it was running, commit",
    },
];

/// The crash point inside `save-memory`, after the image is stored and before its
/// `StepDone`.
const SAVE_MEMORY_INGESTED: &str = "save-memory-ingested";

impl Operation for Create {
    fn kind(&self) -> OpKind {
        OpKind::Create
    }

    fn steps(&self) -> &'static [StepRule] {
        STEPS
    }

    fn rules(&self) -> &'static [Rule] {
        RULES
    }

    fn extra_failpoints(&self) -> &'static [&'static str] {
        &[SAVE_MEMORY_INGESTED]
    }

    fn decide(&self, plan: &[Step], progress: &Progress) -> (Decision, String) {
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

    fn redo(&self, e: &mut Engine, op: &OpRecord, step: &Step) -> Result<(StepDetail, Batch)> {
        let domain = op.domain();
        let none = || Ok((StepDetail::default(), Batch::new()));
        match step {
            Step::Pause => {
                e.host.pause(domain)?;
                none()
            }
            Step::SaveMemory => {
                let total = e.host.domain(domain)?.memory_bytes;
                let parent = parent_checkpoint(e, op)?;
                let host = e.host.as_ref();
                let observer = e.observer.as_ref();
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
                                captured = e.memory.capture_pages(
                                    &e.journal,
                                    op.op(),
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
                    None => e.memory.capture(
                        &e.journal,
                        op.op(),
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
                host.reset_dirty_pages(domain, op.op())?;
                crash_point(&Failpoint::extra(OpKind::Create, SAVE_MEMORY_INGESTED));
                let sealed = e.memory.seal(captured)?;
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
                let disk = snapshot_disk(op, target)?;
                if disk.external {
                    e.host
                        .create_external_snapshot(domain, target, Path::new(&disk.tag))?;
                } else {
                    e.host.create_disk_snapshot(domain, target, &disk.tag)?;
                }
                none()
            }
            Step::Resume => {
                let info = e.host.domain(domain)?;
                if op.begun.prior_state == DomainState::Running
                    && info.state == RunState::Paused
                    && op.is_begin_boot(info.instance)
                {
                    e.host.unpause(domain)?;
                }
                none()
            }
            other => Err(not_a_step(op, other)),
        }
    }

    fn undo(&self, e: &mut Engine, op: &OpRecord, step: &Step) -> Result<Batch> {
        let domain = op.domain();
        match step {
            Step::Pause => {
                restore_run_state(e, op)?;
                Ok(Batch::new())
            }
            Step::SaveMemory => {
                let batch = match op
                    .progress
                    .detail(&Step::SaveMemory)
                    .and_then(|d| d.image.clone())
                {
                    Some(image) => e.memory.release(&e.journal, &image)?,
                    None => {
                        e.memory.abandon(&e.journal, op.op())?;
                        Batch::new()
                    }
                };
                restore_run_state(e, op)?;
                Ok(batch)
            }
            // An external snapshot's overlay stays as the disk's image: it is empty (the
            // domain has not run since), so the disk reads as before.
            Step::SnapshotDisk(target) => {
                let disk = snapshot_disk(op, target)?;
                if !disk.external && e.host.domain(domain)?.disk(target).is_some() {
                    match e.host.delete_disk_snapshot(domain, target, &disk.tag) {
                        Ok(()) => {}
                        // An image that cannot be read holds no tag this operation could
                        // remove (verify reports the damage).
                        Err(err) if host_kind(&err) == ErrorKind::Corruption => {}
                        Err(err) => return Err(err.into()),
                    }
                }
                Ok(Batch::new())
            }
            other => Err(not_a_step(op, other)),
        }
    }

    fn commit(&self, _e: &mut Engine, op: &OpRecord) -> Result<CatalogChange> {
        let mut meta = op
            .begun
            .params
            .snapshot
            .clone()
            .ok_or_else(|| Error::Corrupt {
                op: op.op(),
                what: "its parameters".into(),
                why: "hold no snapshot".into(),
            })?;
        if let Some(detail) = op.progress.detail(&Step::SaveMemory) {
            meta.memory_image = detail.image.clone();
            meta.memory_bytes = detail.bytes_read.unwrap_or(0);
        }
        Ok(CatalogChange::Created(meta))
    }

    fn abandon(&self, e: &mut Engine, op: &OpRecord) -> Result<Batch> {
        // The domain is gone: its disks with it. The memory image is the store's to free.
        if op.progress.undone.contains(&Step::SaveMemory) {
            return Ok(Batch::new());
        }
        match op
            .progress
            .detail(&Step::SaveMemory)
            .and_then(|d| d.image.clone())
        {
            Some(image) => Ok(e.memory.release(&e.journal, &image)?),
            None => {
                e.memory.abandon(&e.journal, op.op())?;
                Ok(Batch::new())
            }
        }
    }
}

/// The memory image (and operation) of the nearest checkpoint above the snapshot being
/// created: what its memory is compared with first.
fn parent_checkpoint(e: &Engine, op: &OpRecord) -> Result<Option<(String, u64)>> {
    let catalog = e.journal.domain_catalog(op.domain())?;
    let mut next = op
        .begun
        .params
        .snapshot
        .as_ref()
        .and_then(|s| s.parent.clone());
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

/// The error for a step that is not part of the operation's kind.
pub(crate) fn not_a_step(op: &OpRecord, step: &Step) -> Error {
    Error::Corrupt {
        op: op.op(),
        what: format!("step {step}"),
        why: format!("is not a step of {}", op.begun.kind.as_str()),
    }
}

/// The snapshot's record of disk `target`, from the operation's parameters.
fn snapshot_disk<'a>(op: &'a OpRecord, target: &str) -> Result<&'a DiskSnapshot> {
    op.begun
        .params
        .snapshot
        .as_ref()
        .and_then(|s| s.disks.iter().find(|d| d.target == target))
        .ok_or_else(|| Error::Corrupt {
            op: op.op(),
            what: format!("disk {target}"),
            why: "is not in the operation's snapshot".into(),
        })
}

/// Brings the boot the operation began with back to the run state it had then: unpause if
/// it ran, pause again if it was paused (`xl save` resumes a domain when it fails). Another
/// boot (started after an interruption) is left alone.
pub(crate) fn restore_run_state(e: &mut Engine, op: &OpRecord) -> Result<()> {
    let info = match e.host.domain(op.domain()) {
        Ok(info) => info,
        Err(xen::Error::NoSuchDomain(_)) => return Ok(()),
        Err(err) => return Err(err.into()),
    };
    if !op.is_begin_boot(info.instance) {
        return Ok(());
    }
    match (op.begun.prior_state, info.state) {
        (DomainState::Running, RunState::Paused) => e.host.unpause(op.domain())?,
        (DomainState::Paused, RunState::Running) => e.host.pause(op.domain())?,
        _ => {}
    }
    Ok(())
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
                 so an {asked} one cannot be added",
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
                 accept that, or take a checkpoint (without --disk-only)",
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
        let (_, change) = self.execute(NewOp {
            kind: OpKind::Create,
            domain: req.domain.clone(),
            snapshot: req.name.clone(),
            prior: state,
            instance: info.instance,
            plan,
            params: OpParams {
                disk_only,
                crash_consistent: meta.crash_consistent,
                external: req.external,
                description: req.description.clone(),
                snapshot: Some(meta),
                ..OpParams::default()
            },
            notes: Vec::new(),
        })?;
        match change {
            CatalogChange::Created(meta) => Ok(meta),
            other => Err(Error::Refused(format!(
                "create committed an unexpected change {other:?}"
            ))),
        }
    }
}
