//! `verify`: the journal's projections against its events, the catalog against every
//! disk's qcow2 snapshot table, and the memory image store against the catalog.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::engine::{error_chain, Engine};
use crate::error::Result;

/// What `verify` found; empty lists mean all is well.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// The journal does not belong with the stores beside it (missing, another state
    /// directory's, older than what the stores have seen).
    pub identity: Vec<String>,
    /// Projections that disagree with the events, open operations.
    pub journal: Vec<String>,
    /// Disk snapshots missing from an image or present without a catalog entry.
    pub disks: Vec<String>,
    /// Memory image store problems.
    pub memory: Vec<String>,
    /// Files and directories readable or writable by others than their owner: in the state
    /// directory, and the disk images of the domains it has snapshots of.
    pub files: Vec<String>,
    /// What the image checks found fine or skipped.
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.identity.is_empty()
            && self.journal.is_empty()
            && self.disks.is_empty()
            && self.memory.is_empty()
            && self.files.is_empty()
    }
}

/// Whether a qcow2 snapshot tag has the shape domsnap gives its tags (`name@op`).
fn looks_like_ours(tag: &str) -> bool {
    tag.rsplit_once('@').is_some_and(|(name, op)| {
        !name.is_empty() && !op.is_empty() && op.bytes().all(|b| b.is_ascii_digit())
    })
}

/// What `verify` does with the qcow2 images themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskCheck {
    /// Only the snapshot tables.
    #[default]
    Tables,
    /// Also every image's refcounts against its references.
    Check,
    /// Check, and free leaked clusters.
    Repair,
}

impl Engine {
    /// Checks (or with [`DiskCheck::Repair`], repairs leaks in) the qcow2 images of every
    /// shut-off domain, or of `domain`. Running domains are reported as skipped.
    pub fn check_disks(
        &mut self,
        domain: Option<&str>,
        mode: DiskCheck,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        if mode == DiskCheck::Tables {
            return Ok((problems, notes));
        }
        let domains = match domain {
            Some(d) => vec![self.host.domain(d)?],
            None => self.host.domains()?,
        };
        for info in domains {
            if mode == DiskCheck::Repair {
                self.hold_domain(&info.name)?;
            }
            for disk in &info.disks {
                let place = format!("{}/{} ({})", info.name, disk.target, disk.path.display());
                let result = match mode {
                    DiskCheck::Repair => self.host.repair_disk(&info.name, &disk.target),
                    _ => self.host.check_disk(&info.name, &disk.target),
                };
                match result {
                    Ok(r) => {
                        if r.corruptions > 0 {
                            problems.push(format!(
                                "{place}: {} corruptions: {}",
                                r.corruptions,
                                r.messages.join("; ")
                            ));
                        }
                        if r.leaks > 0 {
                            problems.push(format!("{place}: {} leaked clusters", r.leaks));
                        } else if mode == DiskCheck::Repair {
                            notes.push(format!("{place}: no leaks"));
                        } else {
                            notes.push(format!("{place}: clean"));
                        }
                    }
                    Err(xen::Error::WrongState { state, .. }) => notes.push(format!(
                        "{place}: not checked, the domain is {state} (shut it off to check its images)"
                    )),
                    Err(e) => problems.push(format!("{place}: {}", error_chain(&e))),
                }
            }
        }
        Ok((problems, notes))
    }

    /// Checks everything; `domain` limits the disk checks to one domain, `deep` also reads
    /// and hashes every chunk of every memory image.
    pub fn verify(&self, domain: Option<&str>, deep: bool) -> Result<VerifyReport> {
        let mut report = VerifyReport {
            journal: self.journal.verify()?,
            ..VerifyReport::default()
        };
        if let Some(mismatch) = self.identity_problem() {
            report
                .identity
                .push(format!("{mismatch}; {}", mismatch.remedy()));
        }
        for op in self.journal.open_ops()? {
            let summary = self.journal.op(op)?;
            let what = summary
                .as_ref()
                .map(|s| format!(" ({} of domain {:?})", s.kind.as_str(), s.domain))
                .unwrap_or_default();
            let needs = summary
                .as_ref()
                .is_some_and(|s| s.outcome == journal::Outcome::NeedsRecovery);
            report.journal.push(if needs {
                format!("operation {op}{what} needs recovery: run `domsnap recover`")
            } else {
                format!("operation {op}{what} is open (interrupted and not yet recovered)")
            });
        }
        let catalog = self.journal.catalog()?;
        let mut referenced: BTreeMap<String, u64> = BTreeMap::new();
        for (name, dc) in &catalog.domains {
            for snap in dc.snapshots.values() {
                if let Some(image) = &snap.memory_image {
                    *referenced.entry(image.clone()).or_default() += 1;
                }
            }
            if domain.is_some_and(|d| d != name) {
                continue;
            }
            let info = match self.host.domain(name) {
                Ok(info) => info,
                Err(e) => {
                    report.disks.push(format!(
                        "domain {name:?} has {} snapshots but the host does not know it: {}",
                        dc.snapshots.len(),
                        error_chain(&e)
                    ));
                    continue;
                }
            };
            for disk in &info.disks {
                let mut expected: BTreeSet<&str> = BTreeSet::new();
                for d in dc.snapshots.values().flat_map(|s| s.disks.iter()) {
                    if d.target != disk.target {
                        continue;
                    }
                    if !d.external {
                        expected.insert(d.tag.as_str());
                    } else if !std::path::Path::new(&d.path).exists() {
                        report.disks.push(format!(
                            "{name}/{}: the image {} of an external snapshot is missing",
                            disk.target, d.path
                        ));
                    }
                }
                let tags = match self.host.disk_snapshots(name, &disk.target) {
                    Ok(tags) => tags,
                    Err(e) => {
                        report.disks.push(format!(
                            "{name}/{}: cannot read the snapshot table: {}",
                            disk.target,
                            error_chain(&e)
                        ));
                        continue;
                    }
                };
                let present: BTreeSet<&str> = tags.iter().map(String::as_str).collect();
                for tag in expected.difference(&present) {
                    report.disks.push(format!(
                        "{name}/{} ({}): snapshot {tag:?} is in the catalog but not in the image",
                        disk.target,
                        disk.path.display()
                    ));
                }
                for tag in present.difference(&expected) {
                    if looks_like_ours(tag) {
                        report.disks.push(format!(
                            "{name}/{} ({}): snapshot {tag:?} is in the image but not in the catalog",
                            disk.target,
                            disk.path.display()
                        ));
                    }
                }
            }
        }
        report.memory = self.memory.check(&self.journal, &referenced)?;
        report.files = wide_modes(&self.state);
        let mut images = BTreeSet::new();
        for (name, dc) in &catalog.domains {
            if let Ok(info) = self.host.domain(name) {
                images.extend(info.disks.iter().map(|d| d.path.clone()));
            }
            for d in dc.snapshots.values().flat_map(|s| s.disks.iter()) {
                images.insert(std::path::PathBuf::from(&d.path));
            }
        }
        for image in images.iter().filter(|p| !p.starts_with(&self.state)) {
            if let Some(problem) = wide_mode(image) {
                report.files.push(problem);
            }
        }
        if deep {
            for image in referenced.keys() {
                if let Err(e) = self.memory.verify(&self.journal, image) {
                    report
                        .memory
                        .push(format!("image {image}: {}", error_chain(&e)));
                }
            }
        }
        Ok(report)
    }
}

/// What is wrong with the mode of `path` (not followed if it is a symbolic link): `None` if
/// only its owner may read or write it, or if it does not exist.
fn wide_mode(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path).ok()?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() || mode & 0o077 == 0 {
        return None;
    }
    let (what, want) = if meta.is_dir() {
        ("directory", "0700")
    } else {
        ("file", "0600")
    };
    Some(format!(
        "{what} {} has mode {mode:04o}: others than its owner may use it (want {want}; guest data is secret)",
        path.display()
    ))
}

/// Every file and directory under `root` (and `root` itself) whose mode is wider than its
/// owner's; symbolic links are not followed.
fn wide_modes(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        if let Some(problem) = wide_mode(&path) {
            out.push(problem);
        }
        let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if is_dir {
            if let Ok(entries) = std::fs::read_dir(&path) {
                let mut children: Vec<_> =
                    entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
                children.sort();
                stack.extend(children.into_iter().rev());
            }
        }
    }
    out
}

impl Engine {
    /// Rewrites the catalog and the operation index from the journal's events.
    pub fn rebuild_catalog(&mut self) -> Result<()> {
        self.require_writer()?;
        Ok(self.journal.rebuild_projections()?)
    }

    /// What the memory image store holds.
    pub fn memory_stats(&self) -> Result<crate::memstore::Stats> {
        Ok(self.memory.stats(&self.journal)?)
    }

    /// Removes memory chunks that no image needs any more and pack files nothing points
    /// into.
    pub fn gc(&mut self) -> Result<crate::memstore::GcReport> {
        self.require_writer()?;
        let mut live = BTreeSet::new();
        for dc in self.journal.catalog()?.domains.values() {
            for snap in dc.snapshots.values() {
                live.extend(snap.memory_image.clone());
            }
        }
        for op in self.journal.open_ops()? {
            for event in self.journal.op_events(op)? {
                if let journal::Event::StepDone { detail, .. } = event {
                    live.extend(detail.image);
                }
            }
        }
        Ok(self.memory.collect(&mut self.journal, &live)?)
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_ours;

    #[test]
    fn recognises_its_own_tags() {
        assert!(looks_like_ours("before-upgrade@12"));
        assert!(!looks_like_ours("manual"));
        assert!(!looks_like_ours("x@"));
        assert!(!looks_like_ours("@12"));
        assert!(!looks_like_ours("a@1b"));
    }
}
