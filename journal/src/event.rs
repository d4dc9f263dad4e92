//! The event schema: everything domsnap ever did, as append-only events.
//!
//! Versioning policy: [`Event`] is serialized with bincode 1.3.3 (variant index + fields), so
//! variants are only ever appended at the end of an enum and fields are never reordered or
//! removed. A change that cannot follow that rule bumps [`crate::record::VERSION`] and keeps a
//! decoder for every older version.

use serde::{Deserialize, Serialize};

/// Position of an event in the journal: 1, 2, 3, … without gaps.
pub type Seq = u64;

/// An operation's id: the sequence number of its [`Event::OpBegun`].
pub type OpId = u64;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// Now, in [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One journaled fact.
// Events are built and written one at a time; boxing `OpBegun` would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// An operation started; its plan follows as steps.
    OpBegun(OpBegun),
    /// A step is about to run.
    StepBegun {
        /// Operation.
        op: OpId,
        /// Step name, e.g. `save-memory`, `snapshot-disk:xvda`.
        step: String,
        /// When.
        at: Millis,
    },
    /// A step finished.
    StepDone {
        /// Operation.
        op: OpId,
        /// Step name.
        step: String,
        /// When.
        at: Millis,
        /// What it produced.
        detail: StepDetail,
    },
    /// A step failed; the operation will be rolled back or forward.
    StepFailed {
        /// Operation.
        op: OpId,
        /// Step name.
        step: String,
        /// When.
        at: Millis,
        /// The error, as text.
        error: String,
    },
    /// The operation took effect; the catalog changes as `change` says.
    OpCommitted {
        /// Operation.
        op: OpId,
        /// When.
        at: Millis,
        /// How the catalog changes.
        change: CatalogChange,
    },
    /// The operation was undone; nothing of it remains.
    OpRolledBack {
        /// Operation.
        op: OpId,
        /// When.
        at: Millis,
        /// Why.
        reason: String,
    },
    /// Recovery found the operation interrupted and chose what to do with it.
    RecoveryDecided {
        /// Operation.
        op: OpId,
        /// When.
        at: Millis,
        /// Forward or back.
        decision: Decision,
        /// Why, in words (which steps had finished).
        reason: String,
    },
    /// The operation was abandoned: it could neither finish nor be undone.
    OpFailed {
        /// Operation.
        op: OpId,
        /// When.
        at: Millis,
        /// Why.
        error: String,
    },
    /// A fact about the operation that recovery needs (its domain's boot instance, its
    /// configuration); journaled with `OpBegun` or with the `StepDone` of the step that
    /// learned it.
    OpNoted {
        /// Operation.
        op: OpId,
        /// When.
        at: Millis,
        /// The fact.
        note: OpNote,
    },
    /// The operation could neither finish nor be undone by itself (a failure past a
    /// revert's point of no return, a failed recovery): it stays open, automatic recovery
    /// leaves it alone, and only `domsnap recover` continues it.
    OpNeedsRecovery {
        /// Operation.
        op: OpId,
        /// When.
        at: Millis,
        /// Why, as text.
        error: String,
    },
}

impl Event {
    /// The operation the event belongs to.
    pub fn op(&self) -> OpId {
        match self {
            Event::OpBegun(b) => b.op,
            Event::StepBegun { op, .. }
            | Event::StepDone { op, .. }
            | Event::StepFailed { op, .. }
            | Event::OpCommitted { op, .. }
            | Event::OpRolledBack { op, .. }
            | Event::RecoveryDecided { op, .. }
            | Event::OpFailed { op, .. }
            | Event::OpNoted { op, .. }
            | Event::OpNeedsRecovery { op, .. } => *op,
        }
    }

    /// When it happened.
    pub fn at(&self) -> Millis {
        match self {
            Event::OpBegun(b) => b.at,
            Event::StepBegun { at, .. }
            | Event::StepDone { at, .. }
            | Event::StepFailed { at, .. }
            | Event::OpCommitted { at, .. }
            | Event::OpRolledBack { at, .. }
            | Event::RecoveryDecided { at, .. }
            | Event::OpFailed { at, .. }
            | Event::OpNoted { at, .. }
            | Event::OpNeedsRecovery { at, .. } => *at,
        }
    }

    /// Whether the event ends its operation.
    pub fn is_end(&self) -> bool {
        matches!(
            self,
            Event::OpCommitted { .. } | Event::OpRolledBack { .. } | Event::OpFailed { .. }
        )
    }
}

/// What kind of operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpKind {
    /// Take a snapshot.
    Create,
    /// Bring a snapshot back.
    Revert,
    /// Remove a snapshot (or a subtree).
    Delete,
    /// Define a new (shut-off) domain.
    Define,
    /// Boot a shut-off domain.
    Start,
    /// Stop a running domain's vCPUs.
    Pause,
    /// Let a paused domain run.
    Unpause,
    /// Stop a domain gracefully.
    Shutdown,
    /// Stop a domain at once.
    Destroy,
    /// Remove a shut-off domain (and, when asked, its snapshots).
    Undefine,
    /// Rebuild a domain's catalog from what is on disk, in a new journal that replaces a
    /// lost one (`recover --adopt`).
    Adopt,
}

impl OpKind {
    /// Every kind, in declaration order.
    pub const ALL: [OpKind; 11] = [
        OpKind::Create,
        OpKind::Revert,
        OpKind::Delete,
        OpKind::Define,
        OpKind::Start,
        OpKind::Pause,
        OpKind::Unpause,
        OpKind::Shutdown,
        OpKind::Destroy,
        OpKind::Undefine,
        OpKind::Adopt,
    ];

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Create => "create",
            OpKind::Revert => "revert",
            OpKind::Delete => "delete",
            OpKind::Define => "define",
            OpKind::Start => "start",
            OpKind::Pause => "pause",
            OpKind::Unpause => "unpause",
            OpKind::Shutdown => "shutdown",
            OpKind::Destroy => "destroy",
            OpKind::Undefine => "undefine",
            OpKind::Adopt => "adopt",
        }
    }
}

/// A domain's run state as the journal records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DomainState {
    /// Not running.
    Shutoff,
    /// Running.
    Running,
    /// Paused.
    Paused,
}

impl DomainState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Shutoff => "shutoff",
            DomainState::Running => "running",
            DomainState::Paused => "paused",
        }
    }
}

/// The first event of an operation: everything needed to finish or undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpBegun {
    /// Its id (= this event's sequence number).
    pub op: OpId,
    /// When.
    pub at: Millis,
    /// Create, revert or delete.
    pub kind: OpKind,
    /// Domain name.
    pub domain: String,
    /// Snapshot name the operation is about.
    pub snapshot: String,
    /// Who asked (user name) and from which process.
    pub user: String,
    /// Process id of the domsnap that ran it.
    pub pid: u32,
    /// Host implementation (`sim`, `xen`).
    pub host: String,
    /// The domain's state when the operation began; recovery restores it.
    pub prior_state: DomainState,
    /// The plan: step names in order.
    pub steps: Vec<String>,
    /// Options.
    pub params: OpParams,
}

/// Options of an operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpParams {
    /// create: disks only, no memory.
    pub disk_only: bool,
    /// create: disk-only of a running domain, accepted as crash-consistent.
    pub crash_consistent: bool,
    /// create: external (overlay) disk snapshots.
    pub external: bool,
    /// create: free text.
    pub description: Option<String>,
    /// revert: the run state the domain must end in.
    pub target_state: Option<DomainState>,
    /// delete: the snapshots removed, children before parents (`--children` gives several).
    pub delete_names: Vec<String>,
    /// create: the snapshot as it will be committed, minus what steps produce.
    pub snapshot: Option<SnapshotMeta>,
    /// revert of external snapshots: (disk target, image the disk used when the operation
    /// began), discarded once the disk uses its new overlay.
    pub disk_images: Vec<(String, String)>,
}

/// What a finished step produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDetail {
    /// Memory steps: bytes read from (save) or written to (restore) the domain.
    pub bytes_read: Option<u64>,
    /// Memory save: bytes newly stored after deduplication.
    pub bytes_new: Option<u64>,
    /// Memory save: the image id (BLAKE3 of the whole image, hex).
    pub image: Option<String>,
    /// Anything else worth keeping, in words.
    pub note: Option<String>,
}

/// Whether recovery finishes or undoes an interrupted operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Redo the remaining steps and commit.
    Forward,
    /// Undo the finished steps in reverse.
    Back,
}

/// A fact about an operation, journaled in [`Event::OpNoted`]. Variants are only appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpNote {
    /// The boot instance of the operation's domain (the host's id of one boot: the
    /// simulated guest's token, Xen's domid): the one it found when it began (`step` None),
    /// or the one step `step` created. Recovery acts only on instances the operation knows.
    Instance {
        /// The step that created it; None: found when the operation began.
        step: Option<String>,
        /// The host's id of the boot.
        instance: u64,
    },
    /// define: the new domain's configuration.
    DomainSpec {
        /// Memory size in bytes.
        memory_bytes: u64,
        /// Virtual size of each disk, in target order.
        disk_sizes: Vec<u64>,
        /// What the simulated guest runs, if set.
        workload: Option<String>,
    },
}

/// How a committed operation changes the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatalogChange {
    /// A snapshot was added and became the domain's current one.
    Created(SnapshotMeta),
    /// The domain was reverted to this snapshot; it is now the current one.
    Reverted {
        /// Snapshot name.
        name: String,
    },
    /// These snapshots were removed; children of a removed snapshot move to its parent.
    Deleted {
        /// Snapshot names, children before parents.
        names: Vec<String>,
    },
    /// Nothing in the catalog changes (the `domain` commands).
    Unchanged,
    /// The domain's catalog was rebuilt from what is on disk (`recover --adopt`): it is
    /// exactly these snapshots.
    Adopted {
        /// Every snapshot found.
        snapshots: Vec<SnapshotMeta>,
        /// The current one, if known.
        current: Option<String>,
    },
}

/// Checkpoint (memory + disks) or disk-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// Memory and every disk at one instant.
    Checkpoint,
    /// Disks only.
    DiskOnly,
}

impl SnapshotKind {
    /// `checkpoint` or `disk-only`.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Checkpoint => "checkpoint",
            SnapshotKind::DiskOnly => "disk-only",
        }
    }
}

/// One disk's part of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshot {
    /// Guest device name (`xvda`).
    pub target: String,
    /// The image at snapshot time.
    pub path: String,
    /// Internal snapshot tag in the qcow2 snapshot table, or for external snapshots the
    /// overlay file that was the active image after the snapshot.
    pub tag: String,
    /// Internal (snapshot table) or external (overlay file).
    pub external: bool,
}

/// A snapshot in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Domain name.
    pub domain: String,
    /// Snapshot name, unique in the domain.
    pub name: String,
    /// The domain's current snapshot when this one was taken.
    pub parent: Option<String>,
    /// Checkpoint or disk-only.
    pub kind: SnapshotKind,
    /// When it was taken.
    pub created: Millis,
    /// The operation that took it.
    pub op: OpId,
    /// The domain's state when it was taken.
    pub domain_state: DomainState,
    /// Memory image id (BLAKE3 hex) and size, for checkpoints.
    pub memory_image: Option<String>,
    /// Size of the memory image in bytes.
    pub memory_bytes: u64,
    /// Every disk.
    pub disks: Vec<DiskSnapshot>,
    /// Free text.
    pub description: Option<String>,
    /// Taken from a running domain without its memory: only crash-consistent.
    pub crash_consistent: bool,
}
