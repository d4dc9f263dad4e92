//! External snapshots of the simulated host's disks: which image paths are accepted, image
//! chains inside a domain directory, and the three [`Host`](crate::Host) operations on them
//! (overlay creation, revert onto a fresh overlay, removal of an image from its chains).

use super::*;

/// The file name of an image path a caller gave, once checked: a bare file name, or an
/// absolute path whose directory is the domain directory; the name passes
/// [`validate_image_name`]; no empty, `.` or `..` component; if the file exists it is a
/// regular file (not a symbolic link). Nothing else ever becomes an image path.
fn image_name(dir: &DomainDir, path: &Path) -> Result<String> {
    let refuse = |why: &str| {
        Error::Invalid(format!(
            "image path {}: {why}; images live in {}",
            path.display(),
            dir.path.display()
        ))
    };
    let text = path.to_str().ok_or_else(|| refuse("not UTF-8"))?;
    let segments: Vec<&str> = text.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        if (segment.is_empty() && i != 0) || *segment == "." || *segment == ".." {
            return Err(refuse("empty, `.` or `..` path component"));
        }
    }
    let Some((file, parents)) = segments.split_last() else {
        return Err(refuse("empty path"));
    };
    validate_image_name(file).map_err(|e| refuse(&e.to_string()))?;
    if !parents.is_empty() {
        if !path.is_absolute() {
            return Err(refuse("a relative path with a directory"));
        }
        let parent = path.parent().ok_or_else(|| refuse("no directory"))?;
        let inside = match (parent.canonicalize(), dir.path.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !inside {
            return Err(refuse("outside the domain directory"));
        }
    }
    match std::fs::symlink_metadata(dir.path.join(file)) {
        Ok(meta) if !meta.file_type().is_file() => Err(refuse("not a regular file")),
        Ok(_) => Ok((*file).to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((*file).to_owned()),
        Err(e) => Err(Error::io("stat", dir.path.join(file))(e)),
    }
}

/// The file name of `path` if it is an image file of the domain directory.
fn name_in_dir(dir: &DomainDir, path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    validate_image_name(file).ok()?;
    let parent = path.parent()?.canonicalize().ok()?;
    (parent == dir.path.canonicalize().ok()?).then(|| file.to_owned())
}

/// Whether two paths name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The images of the domain directory (valid names, regular files) whose backing file is
/// `image`, sorted. An image whose header cannot be read is an error, not skipped: it may be
/// a child.
fn children_of(dir: &DomainDir, image: &str) -> Result<Vec<String>> {
    let image_path = dir.path.join(image);
    let entries = std::fs::read_dir(&dir.path).map_err(Error::io("list", &dir.path))?;
    let mut children = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::io("list", &dir.path))?;
        let Some(file) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if file == image || validate_image_name(&file).is_err() {
            continue;
        }
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(Error::io("stat", &path))?;
        if !meta.file_type().is_file() {
            continue;
        }
        let backing = disk::backing_file(&path).map_err(disk_error(&path))?;
        if backing.is_some_and(|b| same_file(&b, &image_path)) {
            children.push(file);
        }
    }
    children.sort();
    Ok(children)
}

/// Deepest backing chain followed.
const MAX_CHAIN: usize = 1024;

/// The image `top` and its backing chain, as far as it stays inside the domain directory.
fn chain_names(dir: &DomainDir, top: &str) -> Result<Vec<String>> {
    let mut names = vec![top.to_owned()];
    while names.len() < MAX_CHAIN {
        let Some(last) = names.last() else { break };
        let path = dir.path.join(last);
        let next = match disk::backing_file(&path) {
            Ok(Some(b)) => name_in_dir(dir, &b),
            Ok(None) => None,
            Err(e) => return Err(disk_error(&path)(e)),
        };
        match next {
            Some(n) if !names.contains(&n) => names.push(n),
            _ => break,
        }
    }
    Ok(names)
}

/// Makes `overlay` (a checked file name) an overlay of `base`: creates it (under a hidden
/// temporary name, renamed into place, so a crash never leaves a half-written image under
/// the name) unless it exists. An existing file must be an overlay of `base` that no image
/// uses as backing file (what an interrupted earlier attempt leaves), else Error::Invalid.
pub(crate) fn prepare_overlay(dir: &DomainDir, base: &Path, overlay: &str) -> Result<()> {
    let path = dir.path.join(overlay);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) => {
            if !meta.file_type().is_file() {
                return Err(Error::Invalid(format!(
                    "{} exists and is not a regular file",
                    path.display()
                )));
            }
            let backing = disk::backing_file(&path).map_err(disk_error(&path))?;
            if !backing.as_deref().is_some_and(|b| same_file(b, base)) {
                return Err(Error::Invalid(format!(
                    "{} exists and is not an overlay of {}",
                    path.display(),
                    base.display()
                )));
            }
            let children = children_of(dir, overlay)?;
            if let Some(child) = children.first() {
                return Err(Error::Invalid(format!(
                    "{} exists and is the backing file of {child}",
                    path.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !base.is_file() {
                return Err(Error::Invalid(format!("no image {}", base.display())));
            }
            let tmp = dir.path.join(format!(".{overlay}.tmp"));
            match std::fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &tmp)(e)),
            }
            disk::create_overlay(base, &tmp).map_err(disk_error(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(Error::io("rename", &tmp))?;
            sync_dir(&dir.path)
        }
        Err(e) => Err(Error::io("stat", &path)(e)),
    }
}

/// Records durably that disk `target` is on `image` (a checked file name) from now on.
/// The caller holds the domain's [`HostLock`] (the guest: its caller does).
pub(crate) fn set_disk_image(dir: &DomainDir, target: &str, image: &str) -> Result<()> {
    let mut config = DomainConfig::load(dir)?;
    let name = config.name.clone();
    let disk = config
        .disks
        .iter_mut()
        .find(|d| d.target == target)
        .ok_or_else(|| Error::NoSuchDisk {
            domain: name,
            target: target.to_owned(),
        })?;
    if disk.file_name() == image {
        return Ok(());
    }
    disk.image = Some(image.to_owned());
    write_config(dir, &config)
}

/// Error::Invalid if `image` is the current image of a disk other than `target`.
fn refuse_other_disks(config: &DomainConfig, target: &str, image: &str) -> Result<()> {
    match config
        .disks
        .iter()
        .find(|d| d.target != target && d.file_name() == image)
    {
        Some(other) => Err(Error::Invalid(format!(
            "{image} is the image of disk {} of domain {}",
            other.target, config.name
        ))),
        None => Ok(()),
    }
}

impl SimHost {
    pub(super) fn external_create(&self, name: &str, target: &str, overlay: &Path) -> Result<()> {
        let dir = self.dir(name)?;
        let overlay = image_name(&dir, overlay)?;
        let _lock = HostLock::acquire(&dir, name)?;
        let config = load_config(&dir, name)?;
        let disk = config.disk(target)?;
        if disk.file_name() == overlay {
            return Ok(());
        }
        refuse_other_disks(&config, target, &overlay)?;
        match self.state(&dir, name)? {
            RunState::Shutoff => {
                process::remove_stale_files(&dir)?;
                let current = dir.path.join(disk.file_name());
                prepare_overlay(&dir, &current, &overlay)?;
                set_disk_image(&dir, target, &overlay)
            }
            RunState::Paused => {
                let request = Request::ExternalSnapshot {
                    disk: target.to_owned(),
                    overlay,
                };
                self.call_active(&dir, name, &request, "take an external snapshot")
                    .map(|_| ())
            }
            state @ RunState::Running => Err(Error::WrongState {
                domain: name.to_owned(),
                state,
                operation: "take an external snapshot",
                needs: "paused or shut off",
            }),
        }
    }

    pub(super) fn external_revert(
        &self,
        name: &str,
        target: &str,
        base: &Path,
        overlay: &Path,
    ) -> Result<()> {
        let dir = self.dir(name)?;
        let base = image_name(&dir, base)?;
        let overlay = image_name(&dir, overlay)?;
        if base == overlay {
            return Err(Error::Invalid(format!(
                "revert of {name}/{target}: the overlay cannot be its own base {base}"
            )));
        }
        let _lock = HostLock::acquire(&dir, name)?;
        let config = load_config(&dir, name)?;
        let disk = config.disk(target)?;
        self.require_shutoff(&dir, name, "revert to an external snapshot")?;
        let base_path = dir.path.join(&base);
        let overlay_path = dir.path.join(&overlay);
        if disk.file_name() == overlay {
            let backing = disk::backing_file(&overlay_path).map_err(disk_error(&overlay_path))?;
            if backing.is_some_and(|b| same_file(&b, &base_path)) {
                return Ok(());
            }
            return Err(Error::Invalid(format!(
                "{overlay} is the image of {name}/{target} already, but not an overlay of {base}"
            )));
        }
        refuse_other_disks(&config, target, &overlay)?;
        refuse_other_disks(&config, target, &base)?;
        prepare_overlay(&dir, &base_path, &overlay)?;
        set_disk_image(&dir, target, &overlay)
    }

    pub(super) fn external_remove(&self, name: &str, target: &str, image: &Path) -> Result<()> {
        let dir = self.dir(name)?;
        let image = image_name(&dir, image)?;
        let _lock = HostLock::acquire(&dir, name)?;
        let config = load_config(&dir, name)?;
        config.disk(target)?;
        if let Some(disk) = config.disks.iter().find(|d| d.file_name() == image) {
            return Err(Error::Invalid(format!(
                "{image} is the current image of {name}/{}",
                disk.target
            )));
        }
        let image_path = dir.path.join(&image);
        match std::fs::symlink_metadata(&image_path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("stat", &image_path)(e)),
        }
        let backing = disk::backing_file(&image_path).map_err(disk_error(&image_path))?;
        let backing = match backing {
            None => None,
            Some(b) => Some(name_in_dir(&dir, &b).ok_or_else(|| {
                Error::Invalid(format!(
                    "{image} is backed by {}, outside the domain directory",
                    b.display()
                ))
            })?),
        };
        // The images an active guest has open: each disk's current image and its chain.
        let mut open_chains = Vec::new();
        if self.state(&dir, name)?.is_active() {
            for disk in &config.disks {
                open_chains.push((disk.target.clone(), chain_names(&dir, &disk.file_name())?));
            }
        }
        for child in children_of(&dir, &image)? {
            let opened_by = open_chains
                .iter()
                .find(|(_, chain)| chain.contains(&child))
                .map(|(t, _)| t.clone());
            match opened_by {
                Some(disk) => {
                    let request = Request::RebaseImage {
                        disk,
                        image: child,
                        backing: backing.clone(),
                    };
                    self.call_active(&dir, name, &request, "remove an image")?;
                }
                None => {
                    let path = dir.path.join(&child);
                    let new_backing = backing.as_ref().map(|b| dir.path.join(b));
                    disk::rebase(&path, new_backing.as_deref()).map_err(disk_error(&path))?;
                }
            }
        }
        match std::fs::remove_file(&image_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &image_path)(e)),
        }
        sync_dir(&dir.path)
    }
}
