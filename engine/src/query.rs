//! Read-only views for `list`, `info` and `history`, shaped for both human and `--json`
//! output.

use serde::Serialize;

use journal::{DomainCatalog, Event, Millis, OpSummary, SnapshotMeta};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::names;

/// RFC 3339 (UTC, milliseconds) of a journal time.
pub fn rfc3339(ms: Millis) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// One disk of a snapshot, as shown.
#[derive(Debug, Clone, Serialize)]
pub struct DiskView {
    /// Guest device.
    pub target: String,
    /// qcow2 snapshot tag.
    pub tag: String,
    /// Image path (for external snapshots: the frozen image).
    pub path: String,
    /// External snapshot (overlay chain) rather than an internal one.
    pub external: bool,
}

/// One snapshot, as shown by `list` and `info`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotView {
    /// Name.
    pub name: String,
    /// Parent snapshot.
    pub parent: Option<String>,
    /// `checkpoint` or `disk-only`.
    pub kind: String,
    /// Creation time (RFC 3339).
    pub created: String,
    /// Whether the domain's present state descends from it directly.
    pub current: bool,
    /// Run state of the domain when taken.
    pub domain_state: String,
    /// BLAKE3 of the memory image, for checkpoints.
    pub memory_image: Option<String>,
    /// Size of the memory image.
    pub memory_bytes: u64,
    /// Every disk.
    pub disks: Vec<DiskView>,
    /// Free text.
    pub description: Option<String>,
    /// Only crash-consistent (disk-only of a running domain).
    pub crash_consistent: bool,
    /// Operation that took it.
    pub op: u64,
    /// Names of its children.
    pub children: Vec<String>,
}

impl SnapshotView {
    fn of(s: &SnapshotMeta, catalog: &DomainCatalog) -> SnapshotView {
        SnapshotView {
            name: s.name.clone(),
            parent: s.parent.clone(),
            kind: s.kind.as_str().into(),
            created: rfc3339(s.created),
            current: catalog.current.as_deref() == Some(&s.name),
            domain_state: s.domain_state.as_str().into(),
            memory_image: s.memory_image.clone(),
            memory_bytes: s.memory_bytes,
            disks: s
                .disks
                .iter()
                .map(|d| DiskView {
                    target: d.target.clone(),
                    tag: d.tag.clone(),
                    path: d.path.clone(),
                    external: d.external,
                })
                .collect(),
            description: s.description.clone(),
            crash_consistent: s.crash_consistent,
            op: s.op,
            children: catalog
                .children(Some(&s.name))
                .into_iter()
                .map(|c| c.name.clone())
                .collect(),
        }
    }
}

/// One step of an operation, as shown by `history`.
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    /// Step name.
    pub name: String,
    /// Began.
    pub started: String,
    /// Ended, if it did.
    pub ended: Option<String>,
    /// Milliseconds it took.
    pub duration_ms: Option<u64>,
    /// `done`, `failed` or `interrupted`.
    pub outcome: String,
    /// Memory steps: bytes read or written.
    pub bytes_read: Option<u64>,
    /// Memory save: bytes newly stored after deduplication.
    pub bytes_new: Option<u64>,
    /// The error of a failed step.
    pub error: Option<String>,
}

/// One operation, as shown by `history`.
#[derive(Debug, Clone, Serialize)]
pub struct OpView {
    /// Operation id.
    pub id: u64,
    /// create / revert / delete.
    pub kind: String,
    /// Domain.
    pub domain: String,
    /// Snapshot.
    pub snapshot: String,
    /// Who ran it.
    pub user: String,
    /// Which host.
    pub host: String,
    /// Began.
    pub started: String,
    /// Ended.
    pub ended: Option<String>,
    /// `committed`, `rolled-back`, `rolled-forward`, `failed` or `open`.
    pub outcome: String,
    /// Recovery's decision and reason, if recovery handled it.
    pub recovery: Option<String>,
    /// Why it was rolled back or failed.
    pub reason: Option<String>,
    /// Steps in order.
    pub steps: Vec<StepView>,
    /// For a create of a running domain: how long it was paused, in milliseconds (from the
    /// start of its first `pause` or `save-memory` step to the end of its `resume` step).
    pub pause_ms: Option<u64>,
}

/// Filters for `history`.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Only this domain.
    pub domain: Option<String>,
    /// Only this operation.
    pub op: Option<u64>,
    /// Only operations that began at or after this time.
    pub since: Option<Millis>,
}

impl Engine {
    /// A domain's snapshots, oldest first.
    pub fn list(&self, domain: &str) -> Result<Vec<SnapshotView>> {
        names::check("domain", domain)?;
        self.trusted()?;
        let catalog = self.journal.domain_catalog(domain)?;
        if catalog.snapshots.is_empty() {
            // A domain nobody knows is an error, not an empty list (a domain gone from the
            // host whose snapshots are still catalogued stays listable).
            self.host.domain(domain)?;
        }
        let mut snaps: Vec<&SnapshotMeta> = catalog.snapshots.values().collect();
        snaps.sort_by_key(|s| (s.created, s.op));
        Ok(snaps
            .into_iter()
            .map(|s| SnapshotView::of(s, &catalog))
            .collect())
    }

    /// A domain's catalog (for tree output).
    pub fn catalog(&self, domain: &str) -> Result<DomainCatalog> {
        names::check("domain", domain)?;
        self.trusted()?;
        Ok(self.journal.domain_catalog(domain)?)
    }

    /// One snapshot.
    pub fn info(&self, domain: &str, name: &str) -> Result<SnapshotView> {
        names::check("domain", domain)?;
        names::check("snapshot", name)?;
        self.trusted()?;
        let catalog = self.journal.domain_catalog(domain)?;
        let s = catalog
            .snapshots
            .get(name)
            .ok_or_else(|| Error::NoSuchSnapshot {
                domain: domain.into(),
                name: name.into(),
            })?;
        Ok(SnapshotView::of(s, &catalog))
    }

    /// Operations, oldest first.
    pub fn history(&self, filter: &HistoryFilter) -> Result<Vec<OpView>> {
        if let Some(d) = &filter.domain {
            names::check("domain", d)?;
        }
        self.trusted()?;
        let ops: Vec<OpSummary> = match filter.op {
            Some(op) => self.journal.op(op)?.into_iter().collect(),
            None => self.journal.ops()?,
        };
        let mut out = Vec::new();
        for summary in ops {
            if filter.domain.as_ref().is_some_and(|d| *d != summary.domain)
                || filter.since.is_some_and(|t| summary.started < t)
            {
                continue;
            }
            out.push(self.op_view(&summary)?);
        }
        Ok(out)
    }

    /// Operations that began and have not ended (of `domain`, or all), oldest first:
    /// running now, or interrupted and waiting for recovery.
    pub fn open_ops(&self, domain: Option<&str>) -> Result<Vec<OpView>> {
        self.trusted()?;
        let mut out = Vec::new();
        for op in self.journal.open_ops()? {
            let Some(summary) = self.journal.op(op)? else {
                continue;
            };
            if domain.is_none_or(|d| d == summary.domain) {
                out.push(self.op_view(&summary)?);
            }
        }
        Ok(out)
    }

    fn op_view(&self, summary: &OpSummary) -> Result<OpView> {
        let events = self.journal.op_events(summary.op)?;
        let mut view = OpView {
            id: summary.op,
            kind: summary.kind.as_str().into(),
            domain: summary.domain.clone(),
            snapshot: summary.snapshot.clone(),
            user: String::new(),
            host: String::new(),
            started: rfc3339(summary.started),
            ended: summary.ended.map(rfc3339),
            outcome: summary.outcome.as_str().into(),
            recovery: None,
            reason: None,
            steps: Vec::new(),
            pause_ms: None,
        };
        let mut paused_at: Option<Millis> = None;
        let mut open: Vec<(String, Millis)> = Vec::new();
        for event in &events {
            match event {
                Event::OpBegun(b) => {
                    view.user = b.user.clone();
                    view.host = b.host.clone();
                }
                Event::StepBegun { step, at, .. } => {
                    if paused_at.is_none() && (step == "pause" || step == "save-memory") {
                        paused_at = Some(*at);
                    }
                    // A step begun again (by recovery) supersedes the interrupted attempt.
                    if let Some(i) = open.iter().position(|(s, _)| s == step) {
                        let (name, started) = open.remove(i);
                        view.steps
                            .push(step_view(name, started, None, "interrupted", None));
                    }
                    open.push((step.clone(), *at));
                }
                Event::StepDone {
                    step, at, detail, ..
                } => {
                    let started = take_open(&mut open, step).unwrap_or(*at);
                    if step == "resume" {
                        view.pause_ms = paused_at.map(|p| at.saturating_sub(p));
                    }
                    let mut s = step_view(step.clone(), started, Some(*at), "done", None);
                    s.bytes_read = detail.bytes_read;
                    s.bytes_new = detail.bytes_new;
                    view.steps.push(s);
                }
                Event::StepFailed {
                    step, at, error, ..
                } => {
                    let started = take_open(&mut open, step).unwrap_or(*at);
                    view.steps.push(step_view(
                        step.clone(),
                        started,
                        Some(*at),
                        "failed",
                        Some(error.clone()),
                    ));
                }
                Event::RecoveryDecided {
                    decision, reason, ..
                } => {
                    for (name, started) in open.drain(..) {
                        view.steps
                            .push(step_view(name, started, None, "interrupted", None));
                    }
                    view.recovery = Some(format!("{decision:?}: {reason}").to_lowercase());
                }
                Event::OpRolledBack { reason, .. } => view.reason = Some(reason.clone()),
                Event::OpFailed { error, .. } | Event::OpNeedsRecovery { error, .. } => {
                    view.reason = Some(error.clone())
                }
                Event::OpCommitted { .. } | Event::OpNoted { .. } => {}
            }
        }
        for (name, started) in open {
            view.steps
                .push(step_view(name, started, None, "interrupted", None));
        }
        Ok(view)
    }
}

fn take_open(open: &mut Vec<(String, Millis)>, step: &str) -> Option<Millis> {
    let i = open.iter().position(|(s, _)| s == step)?;
    Some(open.remove(i).1)
}

fn step_view(
    name: String,
    started: Millis,
    ended: Option<Millis>,
    outcome: &str,
    error: Option<String>,
) -> StepView {
    StepView {
        name,
        started: rfc3339(started),
        ended: ended.map(rfc3339),
        duration_ms: ended.map(|e| e.saturating_sub(started)),
        outcome: outcome.into(),
        bytes_read: None,
        bytes_new: None,
        error,
    }
}
