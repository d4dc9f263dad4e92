//! Hosts that run Xen domains, as domsnap sees them.
//!
//! [`Host`] is the one boundary through which domsnap touches a domain: its run state, its
//! memory (as a byte stream, the way `xl save -p` writes it) and its disks (qcow2 images whose
//! internal snapshots are taken through the device model while the domain is active, and
//! directly on the image while it is shut off; LVM thin volumes, whose thin snapshots are
//! taken by LVM in every state). What stores a disk is its [`DiskKind`].
//!
//! Implementations:
//! - [`sim::SimHost`]: a simulated Xen host kept in a state directory (the default).
//! - `XenHost` (feature `xen`): a real Xen host through libxenctrl, `xl` and QMP.
#![warn(missing_docs)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[doc(hidden)]
pub mod contract;
mod error;
pub mod sim;
#[cfg(feature = "xen")]
pub mod xenhost;

pub use error::{Error, Result};

/// The run state of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Not running: no vCPU, no device model; its disks may be opened directly.
    Shutoff,
    /// vCPUs run.
    Running,
    /// vCPUs stopped; memory and device model kept.
    Paused,
}

impl RunState {
    /// Whether the domain exists in the hypervisor (running or paused).
    pub fn is_active(self) -> bool {
        !matches!(self, RunState::Shutoff)
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Shutoff => "shutoff",
            RunState::Running => "running",
            RunState::Paused => "paused",
        })
    }
}

/// One virtual disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Guest device name: `xvda`, `xvdb`, …
    pub target: String,
    /// The image file on the host.
    pub path: PathBuf,
    /// Image format as the configuration names it (`qcow2`, `raw`, …).
    pub format: String,
    /// How the disk's snapshots are kept, decided by the host from the domain's
    /// configuration; [`DiskKind::Unsupported`] says why domsnap cannot snapshot it.
    #[serde(default)]
    pub kind: DiskKind,
}

/// What stores a disk, as far as snapshots are concerned: one backend per kind (see
/// `disk::Backend`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum DiskKind {
    /// A qcow2 image file: internal snapshots in its snapshot table, or external ones
    /// (overlays).
    #[default]
    Qcow2,
    /// An LVM thin volume (a `phy:` disk on blkback): thin snapshots.
    LvmThin,
    /// Storage domsnap cannot snapshot.
    Unsupported {
        /// What it is and why it is refused, e.g. "a raw image file: raw files have no
        /// snapshots".
        reason: String,
    },
}

impl DiskInfo {
    /// Why this disk cannot take part in a snapshot (an external one if `external`), in a
    /// sentence naming the disk; `None` if it can.
    pub fn snapshot_refusal(&self, domain: &str, external: bool) -> Option<String> {
        let what = format!(
            "disk {} of domain {domain:?} ({})",
            self.target,
            self.path.display()
        );
        match &self.kind {
            DiskKind::Qcow2 => None,
            DiskKind::LvmThin if external => Some(format!(
                "{what} is an LVM thin volume: external snapshots are qcow2 overlays; take \
                 internal snapshots of this domain (without --external)"
            )),
            DiskKind::LvmThin => None,
            DiskKind::Unsupported { reason } => Some(format!("{what} is {reason}")),
        }
    }
}

/// What a host knows about one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// Domain name, unique on the host.
    pub name: String,
    /// Current run state.
    pub state: RunState,
    /// The host's id of the domain's current boot while it is active (the simulated
    /// guest's boot token, Xen's domid): a domain started again has a new one. None while
    /// shut off.
    #[serde(default)]
    pub instance: Option<u64>,
    /// Memory size in bytes.
    pub memory_bytes: u64,
    /// Where the domain's memory lives on the host, when it is a file (simulated host).
    pub memory_path: Option<PathBuf>,
    /// Disks in target order.
    pub disks: Vec<DiskInfo>,
}

impl DomainInfo {
    /// The disk with guest device name `target`.
    pub fn disk(&self, target: &str) -> Option<&DiskInfo> {
        self.disks.iter().find(|d| d.target == target)
    }

    /// Why the domain's disks cannot be snapshotted together (externally if `external`),
    /// naming the first disk that cannot; `None` if every disk can.
    pub fn snapshot_refusal(&self, external: bool) -> Option<String> {
        self.disks
            .iter()
            .find_map(|d| d.snapshot_refusal(&self.name, external))
    }
}

/// Pages of a domain's memory written since the host's dirty-page log was last reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    /// What [`Host::reset_dirty_pages`] named the memory the log is relative to.
    pub base: u64,
    /// Indexes of the 4 KiB pages (of the memory stream) written since, ascending.
    pub pages: Vec<u64>,
}

/// A new domain's configuration ([`Host::define_domain`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSpec {
    /// Memory size in bytes.
    pub memory_bytes: u64,
    /// Virtual size of each disk (`xvda`, `xvdb`, …), in bytes.
    pub disk_sizes: Vec<u64>,
    /// What the simulated guest runs (`counter`, `idle`); None: the host's default.
    pub workload: Option<String>,
}

/// What a host may or may not do ([`Host::supports`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    /// [`Host::define_domain`] and [`Host::undefine_domain`]: domain configurations kept by the host.
    Definitions,
    /// [`Host::shutdown_domain`].
    Shutdown,
    /// [`Host::set_domain_workload`].
    Workloads,
}

impl Feature {
    /// What the feature does, in words.
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Definitions => "defining and undefining domains",
            Feature::Shutdown => "graceful shutdown",
            Feature::Workloads => "guest workloads",
        }
    }
}

/// A Xen host: the domains on it, their run state, memory and disks.
///
/// Every method is synchronous and returns only once its effect is complete. Methods named
/// idempotent may be called again after a crash with the same arguments and converge on the
/// same outcome; recovery relies on that.
pub trait Host {
    /// Short name of the implementation (`sim`, `xen`), recorded in the journal.
    fn kind(&self) -> &'static str;

    /// Every domain the host knows, including shut-off ones it has a configuration for.
    fn domains(&self) -> Result<Vec<DomainInfo>>;

    /// One domain; [`Error::NoSuchDomain`] if the host does not know it.
    fn domain(&self, name: &str) -> Result<DomainInfo>;

    /// Stops the domain's vCPUs. Returns only once they have stopped and every disk write
    /// they issued is complete and flushed to the image. Idempotent; an error if shut off.
    fn pause(&self, name: &str) -> Result<()>;

    /// Lets a paused domain run again. Idempotent; an error if shut off.
    fn unpause(&self, name: &str) -> Result<()>;

    /// Writes the domain's memory and device state to `sink`, as `xl save -p` does: the
    /// domain is paused (if it was not already) and is left paused, with its disks quiesced,
    /// so that disk snapshots taken now match the saved memory. Returns the bytes written.
    /// If it fails, the domain is left paused or running, never destroyed.
    fn save_memory(&self, name: &str, sink: &mut dyn Write) -> Result<u64>;

    /// The pages of the (paused) domain's memory stream written since
    /// [`Host::reset_dirty_pages`], when the host tracks them and can read pages of the
    /// stream one by one ([`Host::read_memory_pages`]); `None` otherwise (the default), or
    /// when the log does not cover everything written (the domain booted or was restored
    /// since the reset).
    fn dirty_pages(&self, name: &str) -> Result<Option<DirtyPages>> {
        let _ = name;
        Ok(None)
    }

    /// Clears the dirty-page log of the (paused) domain and records `base` as what it is
    /// now relative to. A no-op where the host does not track pages.
    fn reset_dirty_pages(&self, name: &str, base: u64) -> Result<()> {
        let _ = (name, base);
        Ok(())
    }

    /// Pauses the domain (as [`Host::save_memory`] does) and gives `sink` the listed 4 KiB
    /// pages of its memory stream, in the order listed (the last page may be shorter). Only
    /// hosts whose save stream is raw memory have it.
    fn read_memory_pages(
        &self,
        name: &str,
        pages: &[u64],
        sink: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        let _ = (name, pages, sink);
        Err(Error::Invalid(format!(
            "the {} host cannot read single pages of memory",
            self.kind()
        )))
    }

    /// Ends the domain at once, discarding its memory, and returns only once its device model
    /// has released the disk images. Idempotent: Ok if already shut off.
    fn destroy(&self, name: &str) -> Result<()>;

    /// Creates the (shut-off) domain from a stream written by [`Host::save_memory`] and leaves
    /// it paused. On error the domain is left shut off.
    fn restore_memory(&self, name: &str, source: &mut dyn Read) -> Result<()>;

    /// Boots a shut-off domain from its configuration, paused or running.
    fn start(&self, name: &str, paused: bool) -> Result<()>;

    /// Whether the host implements `feature`; the methods of a feature it lacks fail with
    /// [`Error::Unsupported`].
    fn supports(&self, feature: Feature) -> bool {
        let _ = feature;
        false
    }

    /// Defines a new shut-off domain ([`Feature::Definitions`]). [`Error::DomainExists`] if
    /// the name is taken; nothing is left behind on error.
    fn define_domain(&self, name: &str, spec: &DomainSpec) -> Result<DomainInfo> {
        let _ = (name, spec);
        Err(unsupported(self.kind(), Feature::Definitions))
    }

    /// Removes a shut-off domain and every file of it, disks and their snapshots included
    /// ([`Feature::Definitions`]). Atomic.
    fn undefine_domain(&self, name: &str) -> Result<()> {
        let _ = name;
        Err(unsupported(self.kind(), Feature::Definitions))
    }

    /// Stops the domain gracefully: disks flushed and closed, then shut off
    /// ([`Feature::Shutdown`]). Idempotent: Ok if already shut off.
    fn shutdown_domain(&self, name: &str) -> Result<()> {
        let _ = name;
        Err(unsupported(self.kind(), Feature::Shutdown))
    }

    /// Sets what the domain's guest runs from its next start on ([`Feature::Workloads`]).
    /// Idempotent.
    fn set_domain_workload(&self, name: &str, workload: &str) -> Result<()> {
        let _ = (name, workload);
        Err(unsupported(self.kind(), Feature::Workloads))
    }

    /// Names (tags) of the internal snapshots of disk `target`, in table order.
    fn disk_snapshots(&self, name: &str, target: &str) -> Result<Vec<String>>;

    /// Takes internal snapshot `tag` of disk `target`: through the device model while the
    /// domain is active, on the image while it is shut off. Idempotent: Ok if `tag` exists.
    fn create_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()>;

    /// Deletes internal snapshot `tag` of disk `target` (through the device model while the
    /// domain is active). Idempotent: Ok if `tag` does not exist.
    fn delete_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()>;

    /// Makes snapshot `tag` the current state of disk `target`. The domain must be shut off.
    /// Idempotent (applying twice gives the same image content).
    fn apply_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()>;

    /// External snapshot of disk `target`: creates `overlay`, a qcow2 image backed by the
    /// disk's current image, and makes it the disk's image (through the device model while
    /// the domain is active; the domain must be paused or shut off). From then on the old
    /// image is never written. Idempotent: Ok if the disk's image is `overlay` already.
    fn create_external_snapshot(&self, name: &str, target: &str, overlay: &Path) -> Result<()> {
        let _ = (name, target, overlay);
        Err(external_unsupported(self.kind()))
    }

    /// Reverts disk `target` to the image `base` of an external snapshot: creates `overlay`
    /// backed by `base` (if it does not exist) and makes it the disk's image. The domain must
    /// be shut off. The previous image is left in place (see [`Host::remove_image`]).
    /// Idempotent.
    fn revert_external_snapshot(
        &self,
        name: &str,
        target: &str,
        base: &Path,
        overlay: &Path,
    ) -> Result<()> {
        let _ = (name, target, base, overlay);
        Err(external_unsupported(self.kind()))
    }

    /// Checks the qcow2 image of disk `target`: every cluster's refcount against the
    /// references found (corruptions, leaks). Read-only. The domain must be shut off, so no
    /// device model holds metadata that is not on disk yet.
    fn check_disk(&self, name: &str, target: &str) -> Result<disk::CheckReport> {
        let path = self.shut_off_disk(name, target, "check a disk")?;
        disk::check(&path).map_err(|source| Error::Disk { path, source })
    }

    /// Frees the leaked clusters of disk `target`'s image (nothing else: corruption is
    /// reported, never "repaired" by guessing). The domain must be shut off.
    fn repair_disk(&self, name: &str, target: &str) -> Result<disk::CheckReport> {
        let path = self.shut_off_disk(name, target, "repair a disk")?;
        disk::repair_leaks(&path).map_err(|source| Error::Disk { path, source })
    }

    /// The image of disk `target` of a shut-off domain.
    #[doc(hidden)]
    fn shut_off_disk(&self, name: &str, target: &str, operation: &'static str) -> Result<PathBuf> {
        let info = self.domain(name)?;
        if info.state != RunState::Shutoff {
            return Err(Error::WrongState {
                domain: name.to_string(),
                state: info.state,
                operation,
                needs: "shut off",
            });
        }
        info.disk(target)
            .map(|d| d.path.clone())
            .ok_or_else(|| Error::NoSuchDisk {
                domain: name.to_string(),
                target: target.to_string(),
            })
    }

    /// Removes `image` from the image chains of disk `target`: every image of the domain
    /// whose backing file is `image` is first rebased onto `image`'s own backing file (its
    /// data pulled in, so what the guest reads does not change; through the device model for
    /// the image an active domain is using), then the file is deleted. Refuses the disk's
    /// current image. Idempotent: Ok if the file no longer exists.
    fn remove_image(&self, name: &str, target: &str, image: &Path) -> Result<()> {
        let _ = (name, target, image);
        Err(external_unsupported(self.kind()))
    }
}

/// The error of a host without external snapshots.
fn external_unsupported(kind: &str) -> Error {
    Error::Invalid(format!(
        "external snapshots are not supported on the {kind} host"
    ))
}

/// The error of a host without `feature`.
pub fn unsupported(host: &'static str, feature: Feature) -> Error {
    Error::Unsupported { host, feature }
}

/// A shared host is a host: a test keeps one handle to steer a fake while the engine owns
/// the other.
impl<H: Host + ?Sized> Host for std::sync::Arc<H> {
    fn kind(&self) -> &'static str {
        (**self).kind()
    }
    fn domains(&self) -> Result<Vec<DomainInfo>> {
        (**self).domains()
    }
    fn domain(&self, name: &str) -> Result<DomainInfo> {
        (**self).domain(name)
    }
    fn pause(&self, name: &str) -> Result<()> {
        (**self).pause(name)
    }
    fn unpause(&self, name: &str) -> Result<()> {
        (**self).unpause(name)
    }
    fn save_memory(&self, name: &str, sink: &mut dyn Write) -> Result<u64> {
        (**self).save_memory(name, sink)
    }
    fn destroy(&self, name: &str) -> Result<()> {
        (**self).destroy(name)
    }
    fn dirty_pages(&self, name: &str) -> Result<Option<DirtyPages>> {
        (**self).dirty_pages(name)
    }
    fn reset_dirty_pages(&self, name: &str, base: u64) -> Result<()> {
        (**self).reset_dirty_pages(name, base)
    }
    fn read_memory_pages(
        &self,
        name: &str,
        pages: &[u64],
        sink: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        (**self).read_memory_pages(name, pages, sink)
    }
    fn restore_memory(&self, name: &str, source: &mut dyn Read) -> Result<()> {
        (**self).restore_memory(name, source)
    }
    fn start(&self, name: &str, paused: bool) -> Result<()> {
        (**self).start(name, paused)
    }
    fn supports(&self, feature: Feature) -> bool {
        (**self).supports(feature)
    }
    fn define_domain(&self, name: &str, spec: &DomainSpec) -> Result<DomainInfo> {
        (**self).define_domain(name, spec)
    }
    fn undefine_domain(&self, name: &str) -> Result<()> {
        (**self).undefine_domain(name)
    }
    fn shutdown_domain(&self, name: &str) -> Result<()> {
        (**self).shutdown_domain(name)
    }
    fn set_domain_workload(&self, name: &str, workload: &str) -> Result<()> {
        (**self).set_domain_workload(name, workload)
    }
    fn disk_snapshots(&self, name: &str, target: &str) -> Result<Vec<String>> {
        (**self).disk_snapshots(name, target)
    }
    fn create_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        (**self).create_disk_snapshot(name, target, tag)
    }
    fn delete_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        (**self).delete_disk_snapshot(name, target, tag)
    }
    fn apply_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        (**self).apply_disk_snapshot(name, target, tag)
    }
    fn create_external_snapshot(&self, name: &str, target: &str, overlay: &Path) -> Result<()> {
        (**self).create_external_snapshot(name, target, overlay)
    }
    fn revert_external_snapshot(
        &self,
        name: &str,
        target: &str,
        base: &Path,
        overlay: &Path,
    ) -> Result<()> {
        (**self).revert_external_snapshot(name, target, base, overlay)
    }
    fn check_disk(&self, name: &str, target: &str) -> Result<disk::CheckReport> {
        (**self).check_disk(name, target)
    }
    fn repair_disk(&self, name: &str, target: &str) -> Result<disk::CheckReport> {
        (**self).repair_disk(name, target)
    }
    fn remove_image(&self, name: &str, target: &str, image: &Path) -> Result<()> {
        (**self).remove_image(name, target, image)
    }
}
