//! Guest data I/O for the device model, through the `imago` library.
//!
//! Writes must go through a qcow2 implementation that honours the COPIED flag: a cluster
//! whose L2 entry lacks COPIED is shared with an internal snapshot (refcount > 1) and must be
//! copied before it is written. `imago` does that copy-on-write (and also for shared L2
//! tables). `qcow2-rs` does not: it writes shared clusters in place, which changes the
//! snapshots' content and leaves refcounts wrong, so it is not used for writing.

use crate::error::{Error, Result};
use imago::file::File;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};
use std::path::{Path, PathBuf};

/// A qcow2 image opened for guest reads and writes (its backing chain is opened read-only).
///
/// Only one `DataImage` (or other writer) may have an image open at a time, and snapshot
/// operations need the image closed: drop the `DataImage` first. Dropping flushes; call
/// [`DataImage::flush`] to learn whether that succeeded.
pub struct DataImage {
    path: PathBuf,
    inner: FormatAccess<File>,
    /// Holds the QEMU-compatible locks (see `lock`) while the image is open.
    _lock: std::fs::File,
}

impl std::fmt::Debug for DataImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataImage")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl DataImage {
    /// Opens `path` for reading and writing.
    pub fn open(path: &Path) -> Result<Self> {
        // Refuse what the snapshot code refuses too, with this crate's errors.
        let img = crate::meta::Image::open(path, false)?;
        img.header.check_writable(path)?;
        let h = &img.header;
        if h.extended_l2() || h.incompatible & crate::format::INCOMPAT_COMPRESSION != 0 {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: "guest I/O on images with extended L2 entries or zstd compression".into(),
            });
        }
        // imago takes no locks: hold QEMU-compatible ones on a file of our own, taken before
        // imago writes anything.
        let lock_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(crate::error::io("open image for locking", path))?;
        crate::lock::writer(&lock_file, path)?;
        let qcow2 = Qcow2::<File>::builder_path(path)
            .write(true)
            .open(PermissiveImplicitOpenGate::default())
            .map_err(|source| Error::Io {
                op: "open image with imago",
                path: path.to_path_buf(),
                source,
            })?;
        Ok(DataImage {
            path: path.to_path_buf(),
            inner: FormatAccess::new(qcow2),
            _lock: lock_file,
        })
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.inner.size()
    }

    fn bounds(&self, len: usize, offset: u64) -> Result<()> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > self.virtual_size())
        {
            return Err(Error::InvalidArgument {
                path: self.path.clone(),
                what: format!(
                    "I/O at {offset:#x} (+{len}) beyond virtual size {}",
                    self.virtual_size()
                ),
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of guest data at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.bounds(buf.len(), offset)?;
        self.inner.read(buf, offset).map_err(|source| Error::Io {
            op: "read guest data",
            path: self.path.clone(),
            source,
        })
    }

    /// Writes `buf` as guest data at `offset` (not durable until [`DataImage::flush`]).
    ///
    /// imago writes a new L1 entry to the file at once but keeps the refcount of the cluster
    /// it names in its cache: a process killed between the two would leave a reference to a
    /// cluster with refcount 0 (`qemu-img check`: "refcount=0 reference=1"). So every write
    /// hands imago's cached metadata to the operating system before it returns (no fsync):
    /// once `write_at` has returned, a crash of this process leaves at most leaked clusters.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.bounds(buf.len(), offset)?;
        self.inner.write(buf, offset).map_err(|source| Error::Io {
            op: "write guest data",
            path: self.path.clone(),
            source,
        })?;
        self.inner.flush().map_err(|source| Error::Io {
            op: "write back image metadata",
            path: self.path.clone(),
            source,
        })
    }

    /// Makes all writes so far durable: flushes imago's metadata caches, then `fsync`s.
    pub fn flush(&mut self) -> Result<()> {
        self.inner.flush().map_err(|source| Error::Io {
            op: "flush image caches",
            path: self.path.clone(),
            source,
        })?;
        self.inner.sync().map_err(|source| Error::Io {
            op: "fsync image",
            path: self.path.clone(),
            source,
        })
    }
}

#[allow(dead_code)]
fn assert_send() {
    fn is_send<T: Send>() {}
    is_send::<DataImage>();
}
