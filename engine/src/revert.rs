//! `revert`: bring a snapshot's instant back — memory and every disk — running or paused.

use journal::{
    Batch, CatalogChange, Decision, DomainState, OpKind, OpParams, SnapshotKind, SnapshotMeta,
    StepDetail,
};
use xen::RunState;

use std::path::{Path, PathBuf};

use crate::create::{not_a_step, overlay_path};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::plan::{OnForwardFailure, Operation, Progress, Rule, Step, StepKind, StepRule};
use crate::runner::{NewOp, OpRecord};

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
                    "snapshot {:?} has disk {} but domain {:?} no longer does",
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
                         verify`",
                        d.path, d.target, req.name
                    )));
                }
                continue;
            }
            let tags = self.host.disk_snapshots(&req.domain, &d.target)?;
            if !tags.contains(&d.tag) {
                return Err(Error::Refused(format!(
                    "disk {} of domain {:?} has lost its snapshot {:?} (of snapshot {:?}); \
                     run `domsnap verify`",
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

        self.execute(NewOp {
            kind: OpKind::Revert,
            domain: req.domain.clone(),
            snapshot: req.name.clone(),
            prior: info.state,
            instance: info.instance,
            plan,
            params: OpParams {
                target_state: Some(target),
                snapshot: Some(snap.clone()),
                disk_images: info
                    .disks
                    .iter()
                    .map(|d| (d.target.clone(), d.path.display().to_string()))
                    .collect(),
                ..OpParams::default()
            },
            notes: Vec::new(),
        })?;
        Ok(snap)
    }
}

/// The description of `revert`.
#[derive(Debug)]
pub(crate) struct Revert;

/// The one instance.
pub(crate) static REVERT: Revert = Revert;

const STEPS: &[StepRule] = &[
    StepRule::redo(
        StepKind::VerifyImage,
        "read and hash every chunk of the memory image",
    ),
    StepRule::redo(
        StepKind::StopDomain,
        "destroy the domain (the point of no return)",
    )
    .guarded(),
    StepRule::redo(
        StepKind::RevertDisk,
        "apply the disk snapshot / a new overlay on the snapshot's image",
    )
    .guarded(),
    StepRule::redo(
        StepKind::DiscardImage,
        "remove the image the disk used before (external)",
    ),
    StepRule::redo(StepKind::RestoreMemory, "destroy, restore memory (paused)")
        .guarded()
        .boots(),
    StepRule::redo(StepKind::SetRunState, "unpause / start / leave as asked")
        .guarded()
        .boots(),
];

const RULES: &[Rule] = &[
    Rule {
        interrupted: "before the domain was stopped",
        recovery: "roll back: nothing was changed",
    },
    Rule {
        interrupted: "after the domain was stopped",
        recovery: "roll forward: redo the remaining steps — never half-reverted",
    },
];

impl Operation for Revert {
    fn kind(&self) -> OpKind {
        OpKind::Revert
    }

    fn steps(&self) -> &'static [StepRule] {
        STEPS
    }

    fn rules(&self) -> &'static [Rule] {
        RULES
    }

    fn decide(&self, _plan: &[Step], progress: &Progress) -> (Decision, String) {
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

    fn on_forward_failure(&self) -> OnForwardFailure {
        OnForwardFailure::NeedsRecovery
    }

    fn redo(&self, e: &mut Engine, op: &OpRecord, step: &Step) -> Result<(StepDetail, Batch)> {
        e.revert_step(op, step)
    }

    fn commit(&self, _e: &mut Engine, op: &OpRecord) -> Result<CatalogChange> {
        Ok(CatalogChange::Reverted {
            name: op.begun.snapshot.clone(),
        })
    }
}

impl Engine {
    /// The forward action of one revert step. Each is idempotent: recovery redoes them.
    fn revert_step(&mut self, b: &OpRecord, step: &Step) -> Result<(StepDetail, Batch)> {
        let domain = b.domain();
        let snap = b
            .begun
            .params
            .snapshot
            .as_ref()
            .ok_or_else(|| Error::Corrupt {
                op: b.op(),
                what: "its parameters".into(),
                why: "hold no snapshot".into(),
            })?;
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
                    let overlay = overlay_path(base, target, b.op());
                    self.host
                        .revert_external_snapshot(domain, target, base, &overlay)?;
                } else {
                    self.host.apply_disk_snapshot(domain, target, &d.tag)?;
                }
            }
            Step::DiscardImage(target) => {
                let old = b
                    .begun
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
                // A pipe of 1 MiB (the default 64 KiB would hand the pipe over to the
                // host 16 times per MiB restored, each hand-over waiting for a CPU on a
                // busy machine); where the kernel refuses, the default size serves.
                widen_pipe(&writer);
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
                let target = b.begun.params.target_state.unwrap_or(DomainState::Shutoff);
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
            other => return Err(not_a_step(b, other)),
        }
        Ok((detail, Batch::new()))
    }
}

/// Asks the kernel for a 1 MiB pipe buffer (the most an unprivileged process may ask by
/// default, `/proc/sys/fs/pipe-max-size`). A refusal leaves the pipe as it was.
fn widen_pipe(pipe: &std::io::PipeWriter) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ only reads the descriptor, which `pipe` keeps open for the call.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}
