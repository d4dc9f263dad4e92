//! `recover --adopt`: a new journal for a state directory whose journal is lost, replaced
//! by an older copy, or another state directory's.
//!
//! The new journal keeps the stores' state id and starts its sequence numbers above every
//! operation id seen anywhere — the stores' high-water marks, the old journal (if there is
//! one), memory pack names (`op-<op>.pack`), disk snapshot tags (`name@op`)
//! and external overlay names (`<target>-<op>.qcow2`) — so no operation id is ever given
//! twice. Each domain's catalog is rebuilt from its disks' snapshot tags and the memory
//! store (a tag `name@op` whose operation left a manifest `manifests/<state>/<op>` is a
//! checkpoint with that image; the chunk index is rebuilt from the packs' trailers), and
//! journaled as one `adopt` operation; what could not be rebuilt is reported (and
//! journaled in the operation's step).
//!
//! Crash safety: the new journal is built whole in `<state>/journal.new`, closed, and only
//! then renamed into place (the old one, if any, to `journal.replaced-<ms>`: nothing is
//! deleted). The marks are rewritten last. A crash before the rename leaves the state
//! directory as it was (adopt again); between the two renames, no journal (adopt again);
//! after, a complete journal whose marks are raised by the next writer's open.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use journal::{
    Batch, CatalogChange, DiskSnapshot, DomainState, Event, Journal, JournalIdentity, OpBegun,
    OpId, OpKind, OpParams, SnapshotKind, SnapshotMeta, StateId, StepDetail,
};
use serde::Serialize;
use store::{LocalStore, ObjectStore};
use xen::Host;

use crate::engine::{
    lock_waiting, make_private_dir, markers, memory_dir, memory_read_only, Observer,
};
use crate::error::{Error, Result};
use crate::identity::{Check, Mark};
use crate::memstore::MemStore;
use crate::plan::{Operation, Progress, Rule, Step, StepKind, StepRule};
use crate::runner::OpRecord;
use crate::Engine;

/// The step an adopt operation journals.
const STEP: &str = "rebuild-catalog";

/// The adopt operation: one step, journaled with its begin and commit in one write, so it
/// is never found open (if it were, there would be nothing to undo).
pub(crate) struct Adopt;

/// Its description.
pub(crate) static ADOPT: Adopt = Adopt;

static ADOPT_STEPS: [StepRule; 1] = [StepRule::redo(
    StepKind::RebuildCatalog,
    "the catalog from the disks' tags and the store's manifests, in one write",
)];

static ADOPT_RULES: [Rule; 1] = [Rule {
    interrupted: "never (one write)",
    recovery: "roll back: nothing to undo",
}];

impl Operation for Adopt {
    fn kind(&self) -> OpKind {
        OpKind::Adopt
    }

    fn steps(&self) -> &'static [StepRule] {
        &ADOPT_STEPS
    }

    fn rules(&self) -> &'static [Rule] {
        &ADOPT_RULES
    }

    fn decide(&self, _plan: &[Step], _progress: &Progress) -> (journal::Decision, String) {
        (
            journal::Decision::Back,
            "an adoption is journaled in one write and changes nothing before: nothing to undo"
                .into(),
        )
    }

    fn redo(&self, _e: &mut Engine, op: &OpRecord, step: &Step) -> Result<(StepDetail, Batch)> {
        Err(Error::Refused(format!(
            "step {step} of adopt operation {} is journaled with the operation, never run again",
            op.op()
        )))
    }

    fn commit(&self, _e: &mut Engine, op: &OpRecord) -> Result<CatalogChange> {
        Err(Error::Refused(format!(
            "adopt operation {} is committed in the write that begins it",
            op.op()
        )))
    }

    fn journaled_at_once(&self) -> bool {
        true
    }
}

/// What `recover --adopt` did.
#[derive(Debug, Clone, Serialize)]
pub struct AdoptReport {
    /// The state id the new journal belongs to.
    pub state: String,
    /// Its first operation id: above every id seen.
    pub first_op: OpId,
    /// Where the journal it replaced was moved, if there was one.
    pub replaced: Option<PathBuf>,
    /// Per domain: the adopt operation and the snapshots it found.
    pub domains: Vec<AdoptedDomain>,
    /// What could not be rebuilt.
    pub problems: Vec<String>,
}

/// One domain's part of an adoption.
#[derive(Debug, Clone, Serialize)]
pub struct AdoptedDomain {
    /// Domain.
    pub domain: String,
    /// The operation that recorded its catalog.
    pub op: OpId,
    /// The snapshots found, by name.
    pub snapshots: Vec<String>,
}

/// A snapshot tag as domsnap writes it: `(name, op)` of `name@op`.
fn parse_tag(tag: &str) -> Option<(&str, OpId)> {
    let (name, op) = tag.rsplit_once('@')?;
    if name.is_empty() || op.is_empty() || !op.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, op.parse().ok()?))
}

/// The operation in an external overlay's file name `<target>-<op>.qcow2`.
fn overlay_op(file: &str, target: &str) -> Option<OpId> {
    let op = file
        .strip_prefix(target)?
        .strip_prefix('-')?
        .strip_suffix(".qcow2")?;
    if op.is_empty() || !op.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    op.parse().ok()
}

/// The operation of a format-1 memory pack file `op-<op>.pack`.
fn pack_op(file: &str) -> Option<OpId> {
    let op = file.strip_prefix("op-")?.strip_suffix(".pack")?;
    op.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| op.parse().ok())
        .flatten()
}

/// `(state, op)` of a manifest object `manifests/<state>/<op>`.
fn manifest_op(object: &str) -> Option<(&str, OpId)> {
    let (state, op) = object.strip_prefix("manifests/")?.split_once('/')?;
    if op.is_empty() || !op.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((state, op.parse().ok()?))
}

/// What the disks of one domain hold.
#[derive(Debug, Default)]
struct DomainScan {
    /// Internal snapshots: (name, op) → the disks that have the tag.
    tags: BTreeMap<(String, OpId), BTreeSet<String>>,
    /// Every disk of the domain: target → image path.
    disks: BTreeMap<String, PathBuf>,
}

impl Engine {
    /// Replaces the state directory's journal by one rebuilt from what is on disk (see the
    /// module documentation), then opens the engine on it. Refused ([`Error::Refused`]) if
    /// the journal belongs with the stores already, or there is nothing to adopt.
    pub fn adopt(
        state: &Path,
        host: Box<dyn Host>,
        wait: Duration,
        observer: Box<dyn Observer>,
    ) -> Result<(Engine, AdoptReport)> {
        make_private_dir(state, "create state directory")?;
        let db = state.join("journal");
        let mut lock = lock_waiting(&db, wait, observer.as_ref())?;
        let looking = memory_read_only(state)?;
        let check = Check::read(&markers(state, host.kind(), &looking), looking.as_ref())?;
        let mut seen: OpId = check
            .marks
            .iter()
            .filter_map(|(_, m)| m.map(|m| m.high_water))
            .max()
            .unwrap_or(0);

        let states: BTreeSet<StateId> = check
            .marks
            .iter()
            .filter_map(|(_, m)| m.map(|m| m.state))
            .collect();
        if states.len() > 1 {
            let which: Vec<String> = check
                .marks
                .iter()
                .filter_map(|(k, m)| {
                    m.map(|m| format!("{} ({}): {}", k.what, k.location(), m.state))
                })
                .collect();
            return Err(Error::Refused(format!(
                "the stores belong to different state directories ({}); nothing was changed",
                which.join(", ")
            )));
        }

        if Journal::exists(&db) {
            let journal = Journal::open_writer(&db, lock)?;
            let mismatch = check.against(&journal);
            if mismatch.is_none() {
                return Err(Error::Refused(format!(
                    "the journal {} belongs with this state directory: there is nothing to \
                     adopt, and nothing was changed",
                    db.display()
                )));
            }
            // Even another state directory's ids only raise the first id: harmless.
            seen = seen.max(journal.next_seq() - 1);
            lock = journal
                .close()
                .ok_or_else(|| Error::Refused("the journal was not opened for writing".into()))?;
        } else if check.without_journal(&db).is_none() && host.domains()?.is_empty() {
            return Err(Error::Refused(format!(
                "{} has no journal and nothing to adopt; nothing was changed",
                state.display()
            )));
        }
        let mut problems = Vec::new();
        // Operation ids in the memory store: manifests `manifests/<state>/<op>` (of any
        // state: only an id's reuse matters) and format-1 packs `packs/op-<op>.pack`.
        let listed = |prefix: &str| {
            looking
                .list(prefix)
                .map_err(|e| Error::Memory(crate::memstore::Error::from(e)))
        };
        let mut manifests: BTreeMap<String, BTreeSet<OpId>> = BTreeMap::new();
        for meta in listed("manifests/")? {
            if let Some((owner, op)) = manifest_op(&meta.name) {
                seen = seen.max(op);
                manifests.entry(owner.to_string()).or_default().insert(op);
            }
        }
        // The state id: the marks', else (marks lost too) the one the manifests name.
        let state_id = match states.iter().next() {
            Some(id) => *id,
            None => match manifests
                .keys()
                .filter_map(|o| o.parse::<StateId>().ok())
                .collect::<Vec<_>>()[..]
            {
                [one] => one,
                _ => StateId::random()?,
            },
        };
        let mut memory_ops: BTreeSet<OpId> =
            manifests.remove(&state_id.to_string()).unwrap_or_default();
        for meta in listed("packs/")? {
            if let Some(op) = meta.name.strip_prefix("packs/").and_then(pack_op) {
                memory_ops.insert(op);
                seen = seen.max(op);
            }
        }
        // Every domain's disks: snapshot tags and overlay names.
        let mut scans: BTreeMap<String, DomainScan> = BTreeMap::new();
        for info in host.domains()? {
            let mut scan = DomainScan::default();
            for disk in &info.disks {
                scan.disks.insert(disk.target.clone(), disk.path.clone());
                match host.disk_snapshots(&info.name, &disk.target) {
                    Ok(tags) => {
                        for tag in tags {
                            if let Some((name, op)) = parse_tag(&tag) {
                                seen = seen.max(op);
                                scan.tags
                                    .entry((name.to_string(), op))
                                    .or_default()
                                    .insert(disk.target.clone());
                            }
                        }
                    }
                    Err(e) => problems.push(format!(
                        "{}/{}: the snapshot table cannot be read: {}",
                        info.name,
                        disk.target,
                        crate::engine::error_chain(&e)
                    )),
                }
            }
            // External snapshots: overlays are named `<target>-<op>.qcow2`; every image of
            // the domain that is no disk's current one was frozen by one of them.
            let current: BTreeSet<&Path> = info.disks.iter().map(|d| d.path.as_path()).collect();
            let dirs: BTreeSet<&Path> = info.disks.iter().filter_map(|d| d.path.parent()).collect();
            for dir in dirs {
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .collect();
                files.sort();
                for path in files {
                    let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
                        continue;
                    };
                    if !file.ends_with(".qcow2") || file.starts_with('.') {
                        continue;
                    }
                    for disk in &info.disks {
                        if let Some(op) = overlay_op(file, &disk.target) {
                            seen = seen.max(op);
                        }
                    }
                    if !current.contains(path.as_path()) {
                        problems.push(format!(
                            "{}: the image {} was frozen by an external snapshot, which cannot \
                             be adopted (only the journal named it); it is kept",
                            info.name,
                            path.display()
                        ));
                    }
                }
            }
            scans.insert(info.name.clone(), scan);
        }

        // The memory store's index, from its packs and this state's manifests.
        let rebuilt =
            MemStore::with_objects(looking.clone(), &memory_dir(state), &state_id.to_string())
                .rebuild_index()?;
        problems.extend(rebuilt.problems.iter().cloned());
        let first_seq = seen + 1;
        let identity = JournalIdentity {
            state: state_id,
            first_seq,
        };
        let now = journal::now_millis();
        let mut domains = Vec::new();
        let mut batch = Batch::new();
        let mut seq = first_seq;
        let mut adopt_op = |domain: &str,
                            snapshots: Vec<SnapshotMeta>,
                            notes: Vec<String>,
                            batch: &mut Batch|
         -> OpId {
            let op = seq;
            batch.event(Event::OpBegun(OpBegun {
                op,
                at: now,
                kind: OpKind::Adopt,
                domain: domain.to_string(),
                snapshot: String::new(),
                user: crate::whoami(),
                pid: std::process::id(),
                host: host.kind().to_string(),
                prior_state: DomainState::Shutoff,
                steps: vec![STEP.into()],
                params: OpParams::default(),
            }));
            batch.event(Event::StepBegun {
                op,
                step: STEP.into(),
                at: now,
            });
            batch.event(Event::StepDone {
                op,
                step: STEP.into(),
                at: now,
                detail: StepDetail {
                    note: (!notes.is_empty()).then(|| notes.join("; ")),
                    ..StepDetail::default()
                },
            });
            batch.event(Event::OpCommitted {
                op,
                at: now,
                change: CatalogChange::Adopted {
                    snapshots,
                    current: None,
                },
            });
            seq += 4;
            op
        };
        for (domain, scan) in &scans {
            let mut notes = Vec::new();
            let mut by_name: BTreeMap<String, SnapshotMeta> = BTreeMap::new();
            for ((name, op), on) in &scan.tags {
                if on.len() != scan.disks.len() {
                    let missing: Vec<&str> = scan
                        .disks
                        .keys()
                        .filter(|t| !on.contains(*t))
                        .map(String::as_str)
                        .collect();
                    notes.push(format!(
                        "snapshot {name}@{op} is on {} but not on {}: not adopted",
                        on.iter().cloned().collect::<Vec<_>>().join(", "),
                        missing.join(", ")
                    ));
                    continue;
                }
                let image = rebuilt.images.get(op);
                let lost_memory = image.is_none() && memory_ops.contains(op);
                if lost_memory {
                    notes.push(format!(
                        "snapshot {name}@{op} was a checkpoint: its memory image cannot be \
                         rebuilt, adopted as a crash-consistent disk-only snapshot"
                    ));
                }
                let parent = image
                    .and_then(|i| i.parent_op)
                    .and_then(|p| scan.tags.keys().find(|(_, o)| *o == p))
                    .map(|(n, _)| n.clone());
                let lost = if image.is_some() {
                    "its run state at the instant (it comes back running unless reverted \
                     with --paused), creation time and description"
                } else {
                    "its parent, creation time and description"
                };
                let meta = SnapshotMeta {
                    domain: domain.clone(),
                    name: name.clone(),
                    parent,
                    kind: if image.is_some() {
                        SnapshotKind::Checkpoint
                    } else {
                        SnapshotKind::DiskOnly
                    },
                    created: now,
                    op: *op,
                    domain_state: if image.is_some() {
                        DomainState::Running
                    } else {
                        DomainState::Shutoff
                    },
                    memory_image: image.map(|i| i.image.clone()),
                    memory_bytes: image.map_or(0, |i| i.bytes),
                    disks: scan
                        .disks
                        .iter()
                        .map(|(target, path)| DiskSnapshot {
                            target: target.clone(),
                            path: path.display().to_string(),
                            tag: crate::create::disk_tag(name, *op),
                            external: false,
                        })
                        .collect(),
                    description: Some(format!(
                        "adopted from the disks' snapshot tags and the memory store; {lost} \
                         were lost with the journal"
                    )),
                    crash_consistent: lost_memory,
                };
                if let Some(older) = by_name.insert(name.clone(), meta) {
                    notes.push(format!(
                        "snapshot {name} is on the disks twice (operations {} and {op}): the \
                         later one is adopted",
                        older.op
                    ));
                }
            }
            let names: Vec<String> = by_name.keys().cloned().collect();
            problems.extend(notes.iter().map(|n| format!("{domain}: {n}")));
            let op = adopt_op(domain, by_name.into_values().collect(), notes, &mut batch);
            domains.push(AdoptedDomain {
                domain: domain.clone(),
                op,
                snapshots: names,
            });
        }
        if domains.is_empty() {
            adopt_op("", Vec::new(), problems.clone(), &mut batch);
        }
        let v1_packs = memory_ops
            .iter()
            .filter(|op| !rebuilt.images.contains_key(op))
            .count();
        if v1_packs > 0 {
            problems.push(format!(
                "{v1_packs} operation(s) left memory in the store that cannot be adopted; it is \
                 kept (gc leaves what this journal does not know; verify lists it)"
            ));
        }
        batch.extend(rebuilt.batch);

        // Build the new journal beside the old one, then swap.
        let new = state.join("journal.new");
        if new.exists() {
            std::fs::remove_dir_all(&new).map_err(io("remove the leftover", &new))?;
        }
        let mut journal = Journal::create(&new, lock, identity)?;
        journal.commit(batch)?;
        let last = journal.next_seq() - 1;
        let lock = journal
            .close()
            .ok_or_else(|| Error::Refused("the new journal was not opened for writing".into()))?;
        let replaced = if db.exists() {
            let aside = state.join(format!("journal.replaced-{now}"));
            std::fs::rename(&db, &aside).map_err(io("move aside", &db))?;
            Some(aside)
        } else {
            None
        };
        std::fs::rename(&new, &db).map_err(io("move into place", &new))?;
        std::fs::File::open(state)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", state))?;
        let writable: Arc<dyn ObjectStore> = Arc::new(
            LocalStore::open(&memory_dir(state), false).map_err(crate::memstore::Error::from)?,
        );
        for marker in markers(state, host.kind(), &writable) {
            if marker.writable() {
                marker.write(&Mark {
                    state: state_id,
                    high_water: last,
                })?;
            }
        }
        drop(lock);
        let engine = Engine::open(state, host, crate::Access::Write, None, wait, observer)?;
        Ok((
            engine,
            AdoptReport {
                state: state_id.to_string(),
                first_op: first_seq,
                replaced,
                domains,
                problems,
            },
        ))
    }
}

fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> Error + 'p {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_operation_ids_from_names() {
        assert_eq!(parse_tag("before-upgrade@12"), Some(("before-upgrade", 12)));
        assert_eq!(parse_tag("a@b@3"), Some(("a@b", 3)));
        assert_eq!(parse_tag("manual"), None);
        assert_eq!(parse_tag("@3"), None);
        assert_eq!(parse_tag("x@"), None);
        assert_eq!(overlay_op("xvda-17.qcow2", "xvda"), Some(17));
        assert_eq!(overlay_op("xvda.qcow2", "xvda"), None);
        assert_eq!(overlay_op("xvdb-17.qcow2", "xvda"), None);
        assert_eq!(pack_op("op-9.pack"), Some(9));
        assert_eq!(manifest_op("manifests/ab/12"), Some(("ab", 12)));
        assert_eq!(manifest_op("manifests/ab/x"), None);
        assert_eq!(pack_op("gc-9.pack"), None);
    }
}
