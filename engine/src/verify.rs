//! `verify`: the journal's projections against its events, the catalog against every
//! disk's qcow2 snapshot table, and the memory image store against the catalog.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::engine::{error_chain, Engine};
use crate::error::Result;

/// What `verify` found; empty lists mean all is well.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Projections that disagree with the events, open operations.
    pub journal: Vec<String>,
    /// Disk snapshots missing from an image or present without a catalog entry.
    pub disks: Vec<String>,
    /// Memory image store problems.
    pub memory: Vec<String>,
    /// What the image checks found fine or skipped.
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.journal.is_empty() && self.disks.is_empty() && self.memory.is_empty()
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
