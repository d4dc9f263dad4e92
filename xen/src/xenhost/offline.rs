//! Internal snapshots of the qcow2 image of a shut-off domain, through the `disk` crate.

use std::path::Path;

use crate::{Error, Result};

fn disk_err(path: &Path) -> impl FnOnce(disk::Error) -> Error + '_ {
    move |source| Error::Disk {
        path: path.to_path_buf(),
        source,
    }
}

/// Snapshot names in table order.
pub(crate) fn list(path: &Path) -> Result<Vec<String>> {
    disk::list_snapshots(path)
        .map(|s| s.into_iter().map(|s| s.name).collect())
        .map_err(disk_err(path))
}

/// Takes snapshot `tag` of the image.
pub(crate) fn create(path: &Path, tag: &str) -> Result<()> {
    disk::create_snapshot(path, tag)
        .map(|_| ())
        .map_err(disk_err(path))
}

/// Deletes snapshot `tag`.
pub(crate) fn delete(path: &Path, tag: &str) -> Result<()> {
    disk::delete_snapshot(path, tag)
        .map(|_| ())
        .map_err(disk_err(path))
}

/// Makes snapshot `tag` the image's current state.
pub(crate) fn apply(path: &Path, tag: &str) -> Result<()> {
    disk::apply_snapshot(path, tag)
        .map(|_| ())
        .map_err(disk_err(path))
}
