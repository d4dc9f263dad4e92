//! External snapshots on Xen: a disk's qcow2 image is frozen and a new overlay backed by it
//! becomes the disk.
//!
//! - Shut off: the overlay is made beside the image (under a temporary name, renamed into
//!   place) and the domain's configuration in the store names it.
//! - Active (paused): the same overlay file, then through QMP `blockdev-add` of a qcow2 node on
//!   it (no backing yet) and `blockdev-snapshot` onto the node the disk uses: the device model
//!   writes to the overlay from then on. libxl never learns of it (`xl list -l` keeps the old
//!   path); the store does, and a restore or start uses the store's paths (see `stream`).
//!   Before the switch, the store records it as pending: after a crash in the middle, the
//!   next look at the domain asks the device model which image the disk is on.
//! - Removing an image from a chain (`remove_image`) rebases its children onto its backing
//!   file, offline with `disk::rebase`, or for an image the device model uses with a QMP
//!   `block-stream` job into the child, then deletes the file.
//!
//! Image paths come from domsnap, never from a user, and are checked all the same: an
//! absolute path in the directory of the disk's current image, a file name of A-Z a-z 0-9 . _ -
//! ending in `.qcow2`, a regular file if it exists.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::config::{self, Saved, Switch};
use super::disks::disk_err;
use super::domains::Active;
use super::{qmp, XenHost, QMP_TIMEOUT};
use crate::{Error, Result, RunState};

/// A checked image path in the directory of `current` (see the module documentation).
fn check_image_path(current: &Path, path: &Path) -> Result<()> {
    let refuse = |why: &str| Error::Invalid(format!("image path {}: {why}", path.display()));
    if !path.is_absolute() {
        return Err(refuse("not absolute"));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| refuse("no UTF-8 file name"))?;
    crate::sim::validate_image_name(name).map_err(|e| refuse(&e.to_string()))?;
    if path.components().any(|c| {
        matches!(
            c,
            std::path::Component::ParentDir | std::path::Component::CurDir
        )
    }) {
        return Err(refuse("`.` or `..` in the path"));
    }
    let same_dir = match (
        path.parent().map(Path::canonicalize),
        current.parent().map(Path::canonicalize),
    ) {
        (Some(Ok(a)), Some(Ok(b))) => a == b,
        _ => false,
    };
    if !same_dir {
        return Err(refuse(&format!(
            "not in the directory of the disk's image {}",
            current.display()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => Err(refuse("not a regular file")),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("stat", path)(e)),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("sync directory", dir))
}

/// Makes `overlay` an overlay of `base` unless it is one already (what an interrupted earlier
/// attempt leaves); any other existing file there is refused.
fn prepare_overlay(base: &Path, overlay: &Path) -> Result<()> {
    if overlay.exists() {
        let backing = disk::backing_file(overlay).map_err(disk_err(overlay))?;
        return match backing {
            Some(b) if same_file(&b, base) => Ok(()),
            _ => Err(Error::Invalid(format!(
                "{} exists and is not an overlay of {}",
                overlay.display(),
                base.display()
            ))),
        };
    }
    let dir = overlay.parent().unwrap_or(Path::new("/"));
    let name = overlay
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("remove", &tmp)(e))
        }
        _ => {}
    }
    disk::create_overlay(base, &tmp).map_err(disk_err(&tmp))?;
    std::fs::rename(&tmp, overlay).map_err(Error::io("rename", &tmp))?;
    sync_dir(dir)
}

/// The qcow2 images in `image`'s directory whose backing file is `image`, sorted.
fn children_of(image: &Path) -> Result<Vec<PathBuf>> {
    let dir = image.parent().unwrap_or(Path::new("/"));
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io("list", dir))? {
        let entry = entry.map_err(Error::io("list", dir))?;
        let path = entry.path();
        let is_image = path.extension().is_some_and(|e| e == "qcow2")
            && entry.file_type().is_ok_and(|t| t.is_file())
            && path != image;
        if !is_image {
            continue;
        }
        // An image whose header cannot be read may be a child: an error, not skipped.
        if let Some(b) = disk::backing_file(&path).map_err(disk_err(&path))? {
            if same_file(&b, image) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The qcow2 node of the device model whose image file is `path`.
fn node_of(nodes: &Value, path: &Path) -> Option<String> {
    let path = path.to_string_lossy();
    nodes.as_array()?.iter().find_map(|n| {
        let s = |k: &str| n.get(k).and_then(Value::as_str);
        (s("drv") == Some("qcow2") && s("file") == Some(&path))
            .then(|| s("node-name").map(str::to_string))
            .flatten()
    })
}

/// A node name for the overlay `path`: `ds-` and its file stem, in QMP's alphabet, at most
/// 31 characters.
fn node_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name: String = format!("ds-{stem}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(31);
    name
}

impl XenHost {
    fn qmp(
        &self,
        name: &str,
        domid: u32,
        commands: &[(&str, Option<Value>)],
    ) -> Result<Vec<Value>> {
        qmp::run(&self.tools.qmp_socket(domid), QMP_TIMEOUT, commands).map_err(|e| {
            Error::DeviceModel {
                domain: name.into(),
                message: e.to_string(),
            }
        })
    }

    /// The image the device model has disk `current`'s chain on top of: the node whose file
    /// is `candidate` if the device model has it, else `current`.
    fn settle_switch(&self, name: &str, domid: u32, switch: &Switch) -> Result<PathBuf> {
        let nodes = self.qmp(
            name,
            domid,
            &[("query-named-block-nodes", Some(json!({"flat": true})))],
        )?;
        let nodes = nodes.into_iter().next().unwrap_or_default();
        // The overlay node exists once blockdev-add ran; it is in use once blockdev-snapshot
        // ran, which made it the parent of the old image: the old node has it as backing's
        // child, seen as the overlay's `backing_file`.
        let to = switch.to.to_string_lossy();
        let switched = nodes.as_array().into_iter().flatten().any(|n| {
            n.get("drv").and_then(Value::as_str) == Some("qcow2")
                && n.get("file").and_then(Value::as_str) == Some(&to)
                && n.get("backing_file_depth")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    > 0
        });
        Ok(if switched {
            switch.to.clone()
        } else {
            switch.from.clone()
        })
    }

    /// Finishes what an interrupted switch of an active domain left in the store (see the
    /// module documentation); returns the record as it is now.
    pub(crate) fn settle(&self, mut saved: Saved, domid: u32) -> Result<Saved> {
        let Some(switch) = saved.switch.clone() else {
            return Ok(saved);
        };
        let image = self.settle_switch(&saved.name, domid, &switch)?;
        config::set_disk_path(&mut saved.config, &switch.target, &image);
        saved.switch = None;
        self.store.save(&saved)?;
        Ok(saved)
    }

    pub(crate) fn external_snapshot(&self, name: &str, target: &str, overlay: &Path) -> Result<()> {
        let active = self.active(name)?;
        let mut saved = match &active {
            Some(a) => {
                if a.info.run_state() != RunState::Paused {
                    return Err(Error::WrongState {
                        domain: name.into(),
                        state: a.info.run_state(),
                        operation: "take an external snapshot",
                        needs: "paused or shut off",
                    });
                }
                self.saved(name)?
            }
            None => self.require_shutoff(name, "take an external snapshot")?,
        };
        let current = self.qcow2_path(name, &saved.config, target)?;
        if current == overlay {
            return Ok(());
        }
        check_image_path(&current, overlay)?;
        prepare_overlay(&current, overlay)?;
        let Some(a) = active else {
            config::set_disk_path(&mut saved.config, target, overlay);
            return self.store.save(&saved);
        };
        saved.switch = Some(Switch {
            target: target.into(),
            from: current.clone(),
            to: overlay.to_path_buf(),
        });
        self.store.save(&saved)?;
        self.switch_live(name, &a, &current, overlay)?;
        config::set_disk_path(&mut saved.config, target, overlay);
        saved.switch = None;
        self.store.save(&saved)
    }

    /// `blockdev-add` + `blockdev-snapshot`: the device model writes to `overlay` from now on.
    fn switch_live(&self, name: &str, a: &Active, current: &Path, overlay: &Path) -> Result<()> {
        let nodes = self.qmp(
            name,
            a.domid,
            &[("query-named-block-nodes", Some(json!({"flat": true})))],
        )?;
        let nodes = nodes.into_iter().next().unwrap_or_default();
        let top = node_of(&nodes, current).ok_or_else(|| Error::DeviceModel {
            domain: name.into(),
            message: format!("no qcow2 node on {} in the device model", current.display()),
        })?;
        let new = node_of(&nodes, overlay).unwrap_or_else(|| node_name(overlay));
        let mut commands = Vec::new();
        if node_of(&nodes, overlay).is_none() {
            commands.push((
                "blockdev-add",
                Some(json!({
                    "driver": "qcow2",
                    "node-name": new,
                    "file": {"driver": "file", "filename": overlay.to_string_lossy()},
                    "backing": null,
                })),
            ));
        }
        commands.push((
            "blockdev-snapshot",
            Some(json!({"node": top, "overlay": new})),
        ));
        self.qmp(name, a.domid, &commands)?;
        Ok(())
    }

    /// The qcow2 image of disk `target`, refused for any other kind.
    fn qcow2_path(&self, name: &str, config: &Value, target: &str) -> Result<PathBuf> {
        match self.storage(name, config, target)? {
            super::Storage::Qcow2(p) => Ok(p),
            super::Storage::Thin(p, _) => Err(Error::Invalid(format!(
                "disk {target} of domain {name:?} ({}) is an LVM thin volume: external \
                 snapshots are qcow2 overlays",
                p.display()
            ))),
        }
    }

    pub(crate) fn external_revert(
        &self,
        name: &str,
        target: &str,
        base: &Path,
        overlay: &Path,
    ) -> Result<()> {
        let mut saved = self.require_shutoff(name, "revert to an external snapshot")?;
        let current = self.qcow2_path(name, &saved.config, target)?;
        if current == overlay {
            return Ok(());
        }
        check_image_path(&current, base)?;
        check_image_path(&current, overlay)?;
        if !base.is_file() {
            return Err(Error::Invalid(format!("no image {}", base.display())));
        }
        prepare_overlay(base, overlay)?;
        config::set_disk_path(&mut saved.config, target, overlay);
        self.store.save(&saved)
    }

    pub(crate) fn remove_image_of(&self, name: &str, target: &str, image: &Path) -> Result<()> {
        let (saved, active) = match self.active(name)? {
            Some(a) => (self.saved(name)?, Some(a)),
            None => (self.require_shutoff(name, "remove an image")?, None),
        };
        let current = self.qcow2_path(name, &saved.config, target)?;
        check_image_path(&current, image)?;
        if same_file(&current, image) || current == image {
            return Err(Error::Invalid(format!(
                "{} is the current image of disk {target} of domain {name:?}",
                image.display()
            )));
        }
        if !image.exists() {
            return Ok(());
        }
        let backing = disk::backing_file(image).map_err(disk_err(image))?;
        let in_use = match &active {
            Some(a) => self.chain_files(name, a.domid)?,
            None => Vec::new(),
        };
        for child in children_of(image)? {
            match &active {
                Some(a) if in_use.contains(&child) => {
                    self.stream_into(name, a.domid, &child, backing.as_deref())?
                }
                _ => disk::rebase(&child, backing.as_deref()).map_err(disk_err(&child))?,
            }
        }
        std::fs::remove_file(image).map_err(Error::io("remove", image))?;
        sync_dir(image.parent().unwrap_or(Path::new("/")))
    }

    /// Files of the qcow2 nodes the device model has open.
    fn chain_files(&self, name: &str, domid: u32) -> Result<Vec<PathBuf>> {
        let nodes = self.qmp(
            name,
            domid,
            &[("query-named-block-nodes", Some(json!({"flat": true})))],
        )?;
        Ok(nodes
            .into_iter()
            .next()
            .unwrap_or_default()
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n.get("drv").and_then(Value::as_str) == Some("qcow2"))
            .filter_map(|n| n.get("file").and_then(Value::as_str).map(PathBuf::from))
            .collect())
    }

    /// Pulls the data of `child`'s backing image into `child` (a node the device model uses)
    /// and makes `new_backing` its backing file: a `block-stream` job, waited for.
    fn stream_into(
        &self,
        name: &str,
        domid: u32,
        child: &Path,
        new_backing: Option<&Path>,
    ) -> Result<()> {
        let nodes = self.qmp(
            name,
            domid,
            &[("query-named-block-nodes", Some(json!({"flat": true})))],
        )?;
        let nodes = nodes.into_iter().next().unwrap_or_default();
        let device = node_of(&nodes, child).ok_or_else(|| Error::DeviceModel {
            domain: name.into(),
            message: format!("no qcow2 node on {}", child.display()),
        })?;
        let job = format!("stream-{device}");
        let mut args = json!({"job-id": job, "device": device});
        if let Some(b) = new_backing {
            let base = node_of(&nodes, b).ok_or_else(|| Error::DeviceModel {
                domain: name.into(),
                message: format!("no qcow2 node on {}", b.display()),
            })?;
            args["base-node"] = json!(base);
        }
        let jobs = self.qmp(name, domid, &[("query-block-jobs", None)])?;
        let running = jobs.first().and_then(Value::as_array).is_some_and(|j| {
            j.iter()
                .any(|x| x.get("device").and_then(Value::as_str) == Some(&job))
        });
        if !running {
            self.qmp(name, domid, &[("block-stream", Some(args))])?;
        }
        let start = std::time::Instant::now();
        loop {
            let jobs = self.qmp(name, domid, &[("query-block-jobs", None)])?;
            let mine = jobs.first().and_then(Value::as_array).and_then(|j| {
                j.iter()
                    .find(|x| x.get("device").and_then(Value::as_str) == Some(&job))
                    .cloned()
            });
            match mine {
                None => break,
                Some(j) if j.get("status").and_then(Value::as_str) == Some("concluded") => {
                    self.qmp(name, domid, &[("job-dismiss", Some(json!({"id": job})))])?;
                    break;
                }
                Some(_) if start.elapsed() > super::XL_LONG => {
                    return Err(Error::DeviceModel {
                        domain: name.into(),
                        message: format!("block-stream into {} did not end", child.display()),
                    })
                }
                Some(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        }
        // The job is gone: the child's backing file says whether it did its work.
        let now = disk::backing_file(child).map_err(disk_err(child))?;
        let done = match (now.as_deref(), new_backing) {
            (None, None) => true,
            (Some(a), Some(b)) => same_file(a, b),
            _ => false,
        };
        if !done {
            return Err(Error::DeviceModel {
                domain: name.into(),
                message: format!(
                    "block-stream into {} ended without rebasing it",
                    child.display()
                ),
            });
        }
        Ok(())
    }
}
