//! One interface for the named snapshots of a disk, whatever stores the disk: a qcow2 image's
//! internal snapshot table ([`Qcow2Image`]), thin snapshots of an LVM thin volume
//! ([`crate::lvm::ThinVolume`]); a later backend (Ceph RBD, ZFS) is one more implementation.
//! External qcow2 snapshots are image chains rather than named snapshots of one disk: see
//! [`crate::create_overlay`] and [`crate::rebase`].
//!
//! Every operation is atomic and durable on return; create and delete are idempotent (Ok if
//! the snapshot exists, respectively does not), and apply may be repeated after a crash: it
//! converges on the snapshot's content. Tags are the names domsnap gives (`name@op`);
//! a backend that cannot store a tag refuses it with [`crate::Error::InvalidArgument`].
//! Operations run while nobody writes to the disk (its domain paused or shut off; apply only
//! while shut off): the caller makes sure of that.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Named snapshots of one disk.
pub trait Backend: std::fmt::Debug {
    /// What the disk is, for messages: `qcow2 image /var/lib/images/a.qcow2`.
    fn describe(&self) -> String;

    /// The tags of the disk's snapshots (sorted or in table order).
    fn snapshots(&self) -> Result<Vec<String>>;

    /// Takes snapshot `tag` of the disk's current content. Ok if it exists.
    fn create_snapshot(&self, tag: &str) -> Result<()>;

    /// Deletes snapshot `tag`. Ok if it does not exist.
    fn delete_snapshot(&self, tag: &str) -> Result<()>;

    /// Makes snapshot `tag` (which is kept) the disk's current content;
    /// [`Error::NoSuchSnapshot`] if there is none.
    fn apply_snapshot(&self, tag: &str) -> Result<()>;
}

/// The internal snapshots of a qcow2 image file.
#[derive(Debug, Clone)]
pub struct Qcow2Image {
    path: PathBuf,
}

impl Qcow2Image {
    /// The image at `path` (opened by each operation).
    pub fn new(path: impl Into<PathBuf>) -> Qcow2Image {
        Qcow2Image { path: path.into() }
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Backend for Qcow2Image {
    fn describe(&self) -> String {
        format!("qcow2 image {}", self.path.display())
    }

    fn snapshots(&self) -> Result<Vec<String>> {
        Ok(crate::list_snapshots(&self.path)?
            .into_iter()
            .map(|s| s.name)
            .collect())
    }

    fn create_snapshot(&self, tag: &str) -> Result<()> {
        if self.snapshots()?.iter().any(|t| t == tag) {
            return Ok(());
        }
        crate::create_snapshot(&self.path, tag).map(|_| ())
    }

    fn delete_snapshot(&self, tag: &str) -> Result<()> {
        if !self.snapshots()?.iter().any(|t| t == tag) {
            return Ok(());
        }
        crate::delete_snapshot(&self.path, tag)
    }

    fn apply_snapshot(&self, tag: &str) -> Result<()> {
        if !self.snapshots()?.iter().any(|t| t == tag) {
            return Err(Error::NoSuchSnapshot {
                path: self.path.clone(),
                name: tag.to_string(),
            });
        }
        crate::apply_snapshot(&self.path, tag)
    }
}
