//! The disks of a domain, each through the backend its kind calls for (see
//! [`crate::DiskKind`]):
//!
//! | kind     | domain active                                   | domain shut off            |
//! |----------|-------------------------------------------------|----------------------------|
//! | qcow2    | the device model (QMP `blockdev-snapshot-internal-sync`, …), which has the image open | the image, through `disk` |
//! | LVM thin | `lvm` (a thin snapshot suspends the origin's device for a moment, so it holds every write issued before) | `lvm` |
//!
//! Applying a snapshot needs the domain shut off whatever the kind. `lvm` reports are read
//! once per process and again after domsnap changed a volume group.

use std::path::{Path, PathBuf};

use disk::lvm::{ThinVolume, Volume};
use disk::Backend;
use serde_json::Value;

use super::config;
use super::XenHost;
use crate::{DiskKind, Error, Result};

/// How one disk is reached.
#[derive(Debug)]
pub(crate) enum Storage {
    /// A qcow2 image file.
    Qcow2(PathBuf),
    /// An LVM thin volume (its device path, and the volume).
    Thin(PathBuf, ThinVolume),
}

impl Storage {
    pub fn path(&self) -> &Path {
        match self {
            Storage::Qcow2(p) | Storage::Thin(p, _) => p,
        }
    }
}

/// A `disk` error on `path`.
pub(crate) fn disk_err(path: &Path) -> impl FnOnce(disk::Error) -> Error + '_ {
    move |source| Error::Disk {
        path: path.to_path_buf(),
        source,
    }
}

impl XenHost {
    /// The LV that block device `path` is, from the cached report.
    pub(crate) fn volume_of(&self, path: &Path) -> disk::Result<Option<Volume>> {
        let mut cache = self.lvs.lock().unwrap_or_else(|p| p.into_inner());
        if cache.is_none() {
            *cache = Some(self.lvm.volumes(None)?);
        }
        let volumes = cache.as_deref().unwrap_or_default();
        disk::lvm::find_device(volumes, path)
    }

    /// Forgets the cached `lvm` report (after a change).
    pub(crate) fn lvm_changed(&self) {
        *self.lvs.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Disk `target` of `config`, refused (naming the disk and why) unless domsnap can
    /// snapshot it.
    pub(crate) fn storage(&self, name: &str, config: &Value, target: &str) -> Result<Storage> {
        let d = config::disks(config)
            .into_iter()
            .find(|d| d.info.target == target)
            .ok_or_else(|| Error::NoSuchDisk {
                domain: name.into(),
                target: target.into(),
            })?;
        let path = d.info.path.clone();
        match self.classify(&d) {
            DiskKind::Qcow2 => Ok(Storage::Qcow2(path)),
            DiskKind::LvmThin => {
                let v = self
                    .volume_of(&path)
                    .map_err(disk_err(&path))?
                    .ok_or_else(|| Error::Invalid(format!("{} is no LV", path.display())))?;
                let thin = self
                    .lvm
                    .thin_volume(&v.vg, &v.name)
                    .map_err(disk_err(&path))?;
                Ok(Storage::Thin(path, thin))
            }
            kind => {
                let info = crate::DiskInfo { kind, ..d.info };
                Err(Error::Invalid(
                    info.snapshot_refusal(name, false).unwrap_or_default(),
                ))
            }
        }
    }

    /// Runs `f` on the backend of a disk that no device model holds (qcow2 of a shut-off
    /// domain, or any LVM volume); forgets the `lvm` report if `changes`.
    pub(crate) fn offline<T>(
        &self,
        storage: &Storage,
        changes: bool,
        f: impl FnOnce(&dyn Backend) -> disk::Result<T>,
    ) -> Result<T> {
        let out = match storage {
            Storage::Qcow2(path) => f(&disk::Qcow2Image::new(path)),
            Storage::Thin(_, v) => {
                let out = f(v);
                if changes {
                    self.lvm_changed();
                }
                out
            }
        };
        out.map_err(disk_err(storage.path()))
    }
}
