//! qcow2 snapshot operations for domsnap.
//!
//! - Internal snapshots ([`create_snapshot`], [`apply_snapshot`], [`delete_snapshot`],
//!   [`list_snapshots`]) written from the qcow2 specification (QEMU's
//!   `docs/interop/qcow2.txt`); images stay readable and writable by `qemu-img`, and every
//!   change is atomic: see `meta` for the ordering of writes and `fsync`s.
//! - Guest data I/O while a domain runs ([`DataImage`]), through the `imago` library, whose
//!   writes honour the COPIED flag (copy-on-write of clusters shared with snapshots).
//! - A disk's content at an internal snapshot, cluster by cluster ([`snapshot_reader`]), and
//!   a standalone image written from such clusters ([`write_image`]): export and import.
//! - Image creation ([`create_image`]), consistency check and leak repair ([`check()`],
//!   [`repair_leaks`]), and external snapshots ([`create_overlay`], [`commit_overlay`],
//!   [`rebase`], [`backing_file`]).
//! - One interface for the named snapshots of a disk, whatever stores it ([`Backend`]):
//!   qcow2 internal snapshots ([`Qcow2Image`]) and LVM thin snapshots ([`lvm::ThinVolume`]).
//!
//! Snapshot operations and checks work on a closed image: the caller drops its `DataImage`
//! first. [`list_snapshots`] only reads and may run while a `DataImage` is open elsewhere.
//!
//! Supported: qcow2 version 2 and 3, cluster sizes 512 B … 2 MiB, refcount widths 1…64
//! bits, compressed clusters (zlib or zstd: snapshot operations never decompress), extended
//! L2 entries. Refused with [`Error::Unsupported`]: encryption, external data files, unknown
//! incompatible features, and images with the dirty bit set (run `qemu-img check -r all`).
#![warn(missing_docs)]

mod backend;
mod check;
mod create;
mod data;
mod error;
mod export;
mod format;
mod internal;
mod lock;
pub mod lvm;
mod meta;
mod overlay;
mod table;

pub use backend::{Backend, Qcow2Image};
pub use check::CheckReport;
pub use data::DataImage;
pub use error::{Error, Result};
pub use export::{Cluster, SnapshotReader};

use std::path::{Path, PathBuf};

/// An internal snapshot, as listed in the image's snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Unique ID (QEMU numbers them "1", "2", ...).
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// Size of saved VM state (0 for disk-only snapshots, which this crate makes).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Creation time, seconds since the Unix epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time at the snapshot, in nanoseconds (0 for snapshots made here).
    pub vm_clock_nsec: u64,
}

/// Creates an empty qcow2 version 3 image of `virtual_size` bytes (16-bit refcounts,
/// `cluster_size` default 64 KiB). Fails with [`Error::AlreadyExists`] rather than overwrite.
/// Durable on return (file and directory `fsync`ed).
pub fn create_image(path: &Path, virtual_size: u64, cluster_size: Option<u32>) -> Result<()> {
    create::create(path, virtual_size, cluster_size, None)
}

/// Lists the internal snapshots, in table order. Read-only; safe while another process
/// writes guest data to the image (the snapshot table never changes then).
pub fn list_snapshots(path: &Path) -> Result<Vec<Snapshot>> {
    internal::list(path)
}

/// Creates an internal snapshot of the current disk content. Atomic and durable on return:
/// after a crash the image has the snapshot or not, and no leaked clusters.
pub fn create_snapshot(path: &Path, name: &str) -> Result<Snapshot> {
    internal::create(path, name)
}

/// Reverts the current disk content to the snapshot `name` (which is kept). Atomic and
/// durable on return.
pub fn apply_snapshot(path: &Path, name: &str) -> Result<()> {
    internal::apply(path, name)
}

/// Deletes the snapshot `name`, freeing clusters only it used. Atomic and durable on return.
pub fn delete_snapshot(path: &Path, name: &str) -> Result<()> {
    internal::delete(path, name)
}

/// Compares every cluster's refcount with the references found in the image. Read-only.
pub fn check(path: &Path) -> Result<CheckReport> {
    check::check(path)
}

/// Lowers the refcount of leaked clusters to their reference count (freeing unreferenced
/// ones) in one atomic metadata switch; refuses if [`check()`] finds corruptions. Returns the
/// report of a check made after the repair.
pub fn repair_leaks(path: &Path) -> Result<CheckReport> {
    check::repair_leaks(path)
}

/// Creates `overlay`, a qcow2 image whose backing file is the qcow2 image `base`, with the
/// same virtual size. The backing path is stored relative if both are in one directory.
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<()> {
    overlay::create_overlay(base, overlay)
}

/// The backing file of `path`, resolved relative to the image's directory; `None` if it has
/// none.
pub fn backing_file(path: &Path) -> Result<Option<PathBuf>> {
    overlay::backing_file(path)
}

/// Writes every cluster allocated in `overlay` into its backing image (through `imago`, so
/// shared clusters are copied first) and makes the backing image durable. The overlay is left
/// as it is; it now reads the same as its backing image.
pub fn commit_overlay(overlay: &Path) -> Result<()> {
    overlay::commit_overlay(overlay)
}

/// Changes the backing file of `image` to `new_backing` (or none) without changing what the
/// guest reads: clusters that `image` does not hold and that read differently through the
/// new chain are first copied into `image`. Removing an image from the middle of a chain
/// `a ← b ← c` is `rebase(c, Some(a))` followed by deleting `b`.
pub fn rebase(image: &Path, new_backing: Option<&Path>) -> Result<()> {
    overlay::rebase(image, new_backing)
}

/// Opens the content of `path` as it was at its internal snapshot `name`, for reading
/// cluster by cluster (export). Read-only; safe while the image is in use, since a snapshot's
/// tables and clusters never change while it exists. Refused ([`Error::Unsupported`]) for
/// images with a backing file, extended L2 entries or compressed clusters in the snapshot.
pub fn snapshot_reader(path: &Path, name: &str) -> Result<SnapshotReader> {
    SnapshotReader::open(path, name)
}

/// Creates `path`, a new qcow2 image of `disk_size` bytes with clusters of `cluster_size`
/// bytes, holding `clusters` (guest cluster index and its bytes; others read as zeros).
/// Durable on return; never overwrites ([`Error::AlreadyExists`]). An error from the
/// iterator stops the writing and is returned; the partial image is left for the caller to
/// remove.
pub fn write_image<I>(path: &Path, disk_size: u64, cluster_size: u32, clusters: I) -> Result<()>
where
    I: IntoIterator<Item = Result<(u64, Vec<u8>)>>,
{
    export::write_image(path, disk_size, cluster_size, clusters)
}
