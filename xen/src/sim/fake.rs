//! [`FakeHost`]: a deterministic, in-process [`Host`] for tests of code above the trait.
//!
//! Domains have real qcow2 disks (through the `disk` crate, in a directory the caller
//! gives) but their memory lives in this process and no guest process runs: the `counter`
//! vCPU advances only when a test calls [`FakeHost::step`]. Any operation can be made to
//! fail once, before it has any effect, with [`FakeHost::fail_next`]. It keeps the same
//! contract as [`SimHost`](super::SimHost) (see [`crate::contract`]), so tests can run fast
//! and exactly reproducibly, then the same scenario on the real simulation.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::{DiskInfo, DomainInfo, Error, Host, Result, RunState};

use super::config::{disk_configs, validate_memory, validate_name};

/// An operation of [`Host`] that [`FakeHost::fail_next`] can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FakeOp {
    /// [`Host::pause`].
    Pause,
    /// [`Host::unpause`].
    Unpause,
    /// [`Host::save_memory`].
    SaveMemory,
    /// [`Host::destroy`].
    Destroy,
    /// [`Host::restore_memory`].
    RestoreMemory,
    /// [`Host::start`].
    Start,
    /// [`Host::create_disk_snapshot`].
    CreateDiskSnapshot,
    /// [`Host::delete_disk_snapshot`].
    DeleteDiskSnapshot,
    /// [`Host::apply_disk_snapshot`].
    ApplyDiskSnapshot,
    /// [`Host::save_memory`] failing the way `xl save` does: after the domain was paused
    /// (a paused domain is first let run), the save fails and the domain is left running.
    SaveMemoryResuming,
    /// [`Host::undefine_domain`].
    Undefine,
}

#[derive(Debug)]
struct FakeDomain {
    state: RunState,
    /// The boot instance while active.
    instance: Option<u64>,
    memory: Vec<u8>,
    disks: Vec<DiskInfo>,
    /// Open while the domain is active (its "device model").
    xvda: Option<disk::DataImage>,
}

#[derive(Debug, Default)]
struct Inner {
    domains: BTreeMap<String, FakeDomain>,
    failures: BTreeMap<FakeOp, u32>,
    /// The last boot instance handed out.
    boots: u64,
}

impl Inner {
    fn next_boot(&mut self) -> u64 {
        self.boots += 1;
        self.boots
    }
}

/// A deterministic in-process host: real qcow2 disks in a caller's directory, memory in
/// this process, no guest process; the `counter` vCPU advances only in [`FakeHost::step`],
/// and [`FakeHost::fail_next`] makes an operation fail once before it has any effect.
#[derive(Debug)]
pub struct FakeHost {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

impl FakeHost {
    /// A host with no domain, keeping disk images in `dir` (which must exist).
    pub fn new(dir: &Path) -> FakeHost {
        FakeHost {
            dir: dir.to_owned(),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Defines a shut-off domain with zeroed memory and empty qcow2 disks `xvda`, `xvdb`, …
    /// (checked as [`SimHost::define`](super::SimHost::define) checks them).
    pub fn define(&self, name: &str, memory_bytes: u64, disk_sizes: &[u64]) -> Result<DomainInfo> {
        validate_name(name)?;
        validate_memory(memory_bytes)?;
        let configs = disk_configs(disk_sizes)?;
        let mut inner = self.lock();
        if inner.domains.contains_key(name) {
            return Err(Error::DomainExists(name.to_owned()));
        }
        let memory_len = usize::try_from(memory_bytes)
            .map_err(|_| Error::Invalid(format!("memory size {memory_bytes} too large")))?;
        let mut disks = Vec::new();
        for config in configs {
            let path = self.dir.join(format!("{name}-{}", config.file_name()));
            disk::create_image(&path, config.size, None).map_err(|source| Error::Disk {
                path: path.clone(),
                source,
            })?;
            disks.push(DiskInfo {
                target: config.target,
                path,
                format: "qcow2".to_owned(),
                kind: crate::DiskKind::Qcow2,
            });
        }
        inner.domains.insert(
            name.to_owned(),
            FakeDomain {
                state: RunState::Shutoff,
                instance: None,
                memory: vec![0; memory_len],
                disks,
                xvda: None,
            },
        );
        drop(inner);
        self.domain(name)
    }

    /// Puts disk `target` of a shut-off domain on another image or another kind of storage,
    /// as an operator editing the domain's configuration would.
    pub fn set_disk(
        &self,
        name: &str,
        target: &str,
        path: PathBuf,
        kind: crate::DiskKind,
    ) -> Result<()> {
        let mut inner = self.lock();
        let domain = domain_mut(&mut inner, name)?;
        let disk = domain
            .disks
            .iter_mut()
            .find(|d| d.target == target)
            .ok_or_else(|| Error::NoSuchDisk {
                domain: name.to_owned(),
                target: target.to_owned(),
            })?;
        disk.path = path;
        disk.kind = kind;
        Ok(())
    }

    /// Makes the next `times` calls of `op` fail (with [`Error::DeviceModel`]) before doing
    /// anything.
    pub fn fail_next(&self, op: FakeOp, times: u32) {
        self.lock().failures.insert(op, times);
    }

    /// Runs `iterations` iterations of the `counter` vCPU of a running domain (none if it is
    /// not running): `n += 1`, `n` to `xvda` offset 0, `n` to memory offset 0. Returns `n`.
    pub fn step(&self, name: &str, iterations: u64) -> Result<u64> {
        let mut inner = self.lock();
        let domain = domain_mut(&mut inner, name)?;
        let mut n = counter(&domain.memory);
        if domain.state != RunState::Running {
            return Ok(n);
        }
        for _ in 0..iterations {
            n += 1;
            if let (Some(image), Some(xvda)) = (domain.xvda.as_mut(), domain.disks.first()) {
                image
                    .write_at(&n.to_le_bytes(), 0)
                    .map_err(|source| Error::Disk {
                        path: xvda.path.clone(),
                        source,
                    })?;
            }
            domain.memory[..8].copy_from_slice(&n.to_le_bytes());
        }
        Ok(n)
    }

    /// The counter at memory offset 0.
    pub fn memory_counter(&self, name: &str) -> Result<u64> {
        let mut inner = self.lock();
        Ok(counter(&domain_mut(&mut inner, name)?.memory))
    }
}

fn counter(memory: &[u8]) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&memory[..8]);
    u64::from_le_bytes(le)
}

fn domain_mut<'a>(inner: &'a mut Inner, name: &str) -> Result<&'a mut FakeDomain> {
    inner
        .domains
        .get_mut(name)
        .ok_or_else(|| Error::NoSuchDomain(name.to_owned()))
}

/// Consumes one injected failure of `op`, if any.
fn injected(inner: &mut Inner, op: FakeOp, name: &str) -> Result<()> {
    match inner.failures.get_mut(&op) {
        Some(left) if *left > 0 => {
            *left -= 1;
            Err(Error::DeviceModel {
                domain: name.to_owned(),
                message: format!("injected failure of {op:?}"),
            })
        }
        _ => Ok(()),
    }
}

fn wrong_state(name: &str, state: RunState, operation: &'static str, needs: &'static str) -> Error {
    Error::WrongState {
        domain: name.to_owned(),
        state,
        operation,
        needs,
    }
}

/// Looks up a domain, checks for an injected failure of `op`, and checks that the domain is
/// active (`active`) or shut off (`!active`).
fn enter<'a>(
    inner: &'a mut Inner,
    name: &str,
    op: FakeOp,
    operation: &'static str,
    active: bool,
) -> Result<&'a mut FakeDomain> {
    domain_mut(inner, name)?;
    injected(inner, op, name)?;
    let domain = domain_mut(inner, name)?;
    match (active, domain.state.is_active()) {
        (true, false) => Err(wrong_state(
            name,
            domain.state,
            operation,
            "running or paused",
        )),
        (false, true) => Err(wrong_state(name, domain.state, operation, "shut off")),
        _ => Ok(domain),
    }
}

fn disk_path(domain: &FakeDomain, name: &str, target: &str) -> Result<PathBuf> {
    domain
        .disks
        .iter()
        .find(|d| d.target == target)
        .map(|d| d.path.clone())
        .ok_or_else(|| Error::NoSuchDisk {
            domain: name.to_owned(),
            target: target.to_owned(),
        })
}

fn disk_error(path: &Path) -> impl FnOnce(disk::Error) -> Error + '_ {
    move |source| Error::Disk {
        path: path.to_owned(),
        source,
    }
}

impl FakeDomain {
    fn flush(&mut self) -> Result<()> {
        if let (Some(image), Some(xvda)) = (self.xvda.as_mut(), self.disks.first()) {
            image.flush().map_err(disk_error(&xvda.path))?;
        }
        Ok(())
    }

    /// Runs `op` on the image of `path` with xvda closed if it is that disk.
    fn with_closed(&mut self, path: &Path, op: impl FnOnce() -> Result<()>) -> Result<()> {
        let is_xvda = self.disks.first().map(|d| d.path.as_path()) == Some(path);
        let reopen = is_xvda && self.xvda.is_some();
        if reopen {
            self.flush()?;
            self.xvda = None;
        }
        let result = op();
        if reopen {
            self.xvda = Some(disk::DataImage::open(path).map_err(disk_error(path))?);
        }
        result
    }
}

impl Host for FakeHost {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn domains(&self) -> Result<Vec<DomainInfo>> {
        let names: Vec<String> = self.lock().domains.keys().cloned().collect();
        names.iter().map(|n| self.domain(n)).collect()
    }

    fn domain(&self, name: &str) -> Result<DomainInfo> {
        let mut inner = self.lock();
        let domain = domain_mut(&mut inner, name)?;
        Ok(DomainInfo {
            name: name.to_owned(),
            state: domain.state,
            instance: domain.instance,
            memory_bytes: domain.memory.len() as u64,
            memory_path: None,
            disks: domain.disks.clone(),
        })
    }

    fn pause(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        let domain = enter(&mut inner, name, FakeOp::Pause, "pause", true)?;
        domain.flush()?;
        domain.state = RunState::Paused;
        Ok(())
    }

    fn unpause(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        let domain = enter(&mut inner, name, FakeOp::Unpause, "unpause", true)?;
        domain.state = RunState::Running;
        Ok(())
    }

    fn save_memory(&self, name: &str, sink: &mut dyn Write) -> Result<u64> {
        let mut inner = self.lock();
        if let Err(e) = injected(&mut inner, FakeOp::SaveMemoryResuming, name) {
            let domain = enter(&mut inner, name, FakeOp::SaveMemory, "save memory", true)?;
            domain.state = RunState::Running;
            return Err(e);
        }
        let domain = enter(&mut inner, name, FakeOp::SaveMemory, "save memory", true)?;
        domain.flush()?;
        domain.state = RunState::Paused;
        let stream = |source| Error::Stream {
            domain: name.to_owned(),
            source,
        };
        sink.write_all(&domain.memory).map_err(stream)?;
        sink.flush().map_err(stream)?;
        Ok(domain.memory.len() as u64)
    }

    fn destroy(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        domain_mut(&mut inner, name)?;
        injected(&mut inner, FakeOp::Destroy, name)?;
        let domain = domain_mut(&mut inner, name)?;
        // Like a killed device model: unflushed writes may be lost; here they are kept.
        domain.xvda = None;
        domain.state = RunState::Shutoff;
        domain.instance = None;
        Ok(())
    }

    fn restore_memory(&self, name: &str, source: &mut dyn Read) -> Result<()> {
        let mut inner = self.lock();
        let domain = enter(
            &mut inner,
            name,
            FakeOp::RestoreMemory,
            "restore memory",
            false,
        )?;
        let mut image = Vec::with_capacity(domain.memory.len());
        source
            .read_to_end(&mut image)
            .map_err(|source| Error::Stream {
                domain: name.to_owned(),
                source,
            })?;
        if image.len() != domain.memory.len() {
            return Err(Error::Stream {
                domain: name.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "stream holds {} bytes, the domain has {} of memory",
                        image.len(),
                        domain.memory.len()
                    ),
                ),
            });
        }
        let xvda = match domain.disks.first() {
            Some(d) => Some(disk::DataImage::open(&d.path).map_err(disk_error(&d.path))?),
            None => None,
        };
        domain.memory = image;
        domain.xvda = xvda;
        domain.state = RunState::Paused;
        let boot = inner.next_boot();
        domain_mut(&mut inner, name)?.instance = Some(boot);
        Ok(())
    }

    fn start(&self, name: &str, paused: bool) -> Result<()> {
        let mut inner = self.lock();
        let domain = enter(&mut inner, name, FakeOp::Start, "start", false)?;
        domain.xvda = match domain.disks.first() {
            Some(d) => Some(disk::DataImage::open(&d.path).map_err(disk_error(&d.path))?),
            None => None,
        };
        domain.state = if paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        let boot = inner.next_boot();
        domain_mut(&mut inner, name)?.instance = Some(boot);
        Ok(())
    }

    fn supports(&self, feature: crate::Feature) -> bool {
        matches!(
            feature,
            crate::Feature::Definitions | crate::Feature::Shutdown
        )
    }

    fn define_domain(&self, name: &str, spec: &crate::DomainSpec) -> Result<DomainInfo> {
        if spec.workload.as_deref().is_some_and(|w| w != "counter") {
            return Err(crate::unsupported(self.kind(), crate::Feature::Workloads));
        }
        FakeHost::define(self, name, spec.memory_bytes, &spec.disk_sizes)
    }

    fn undefine_domain(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        enter(&mut inner, name, FakeOp::Undefine, "undefine", false)?;
        let domain = inner
            .domains
            .remove(name)
            .ok_or_else(|| Error::NoSuchDomain(name.to_owned()))?;
        for d in &domain.disks {
            std::fs::remove_file(&d.path).map_err(Error::io("remove", &d.path))?;
        }
        Ok(())
    }

    fn shutdown_domain(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        let domain = domain_mut(&mut inner, name)?;
        domain.flush()?;
        domain.xvda = None;
        domain.state = RunState::Shutoff;
        domain.instance = None;
        Ok(())
    }

    fn disk_snapshots(&self, name: &str, target: &str) -> Result<Vec<String>> {
        let mut inner = self.lock();
        let path = disk_path(domain_mut(&mut inner, name)?, name, target)?;
        let snapshots = disk::list_snapshots(&path).map_err(disk_error(&path))?;
        Ok(snapshots.into_iter().map(|s| s.name).collect())
    }

    fn create_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        let mut inner = self.lock();
        let path = disk_path(domain_mut(&mut inner, name)?, name, target)?;
        injected(&mut inner, FakeOp::CreateDiskSnapshot, name)?;
        let domain = domain_mut(&mut inner, name)?;
        domain.with_closed(&path, || match disk::create_snapshot(&path, tag) {
            Ok(_) | Err(disk::Error::SnapshotExists { .. }) => Ok(()),
            Err(e) => Err(disk_error(&path)(e)),
        })
    }

    fn delete_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        let mut inner = self.lock();
        let path = disk_path(domain_mut(&mut inner, name)?, name, target)?;
        injected(&mut inner, FakeOp::DeleteDiskSnapshot, name)?;
        let domain = domain_mut(&mut inner, name)?;
        domain.with_closed(&path, || match disk::delete_snapshot(&path, tag) {
            Ok(_) | Err(disk::Error::NoSuchSnapshot { .. }) => Ok(()),
            Err(e) => Err(disk_error(&path)(e)),
        })
    }

    fn apply_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        let mut inner = self.lock();
        let path = disk_path(domain_mut(&mut inner, name)?, name, target)?;
        enter(
            &mut inner,
            name,
            FakeOp::ApplyDiskSnapshot,
            "apply a disk snapshot",
            false,
        )?;
        match disk::apply_snapshot(&path, tag) {
            Ok(()) => Ok(()),
            Err(disk::Error::NoSuchSnapshot { .. }) => Err(Error::NoSuchDiskSnapshot {
                domain: name.to_owned(),
                target: target.to_owned(),
                tag: tag.to_owned(),
            }),
            Err(e) => Err(disk_error(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fake_keeps_the_host_contract() {
        let tmp = tempfile::tempdir().unwrap();
        let host = FakeHost::new(tmp.path());
        host.define("fake", 1 << 20, &[16 << 20, 1 << 20]).unwrap();
        crate::contract::run_all(&host, "fake");
    }

    #[test]
    fn counter_steps_only_when_asked_and_running() {
        let tmp = tempfile::tempdir().unwrap();
        let host = FakeHost::new(tmp.path());
        let info = host.define("c", 1 << 20, &[1 << 20]).unwrap();
        assert_eq!(host.step("c", 5).unwrap(), 0, "shut off");
        host.start("c", true).unwrap();
        assert_eq!(host.step("c", 5).unwrap(), 0, "paused");
        host.unpause("c").unwrap();
        assert_eq!(host.step("c", 5).unwrap(), 5);
        let mut image = Vec::new();
        host.save_memory("c", &mut image).unwrap();
        assert_eq!(image[..8], 5u64.to_le_bytes());
        host.destroy("c").unwrap();
        let xvda = &info.disks[0].path;
        assert_eq!(crate::contract::read_disk_u64(xvda, 0), 5);
        host.restore_memory("c", &mut &image[..]).unwrap();
        host.unpause("c").unwrap();
        assert_eq!(host.step("c", 2).unwrap(), 7);
        host.destroy("c").unwrap();
    }

    #[test]
    fn injected_failures_have_no_effect() {
        let tmp = tempfile::tempdir().unwrap();
        let host = FakeHost::new(tmp.path());
        host.define("f", 1 << 20, &[1 << 20]).unwrap();
        host.fail_next(FakeOp::Start, 1);
        assert!(matches!(
            host.start("f", false),
            Err(Error::DeviceModel { .. })
        ));
        assert_eq!(host.domain("f").unwrap().state, RunState::Shutoff);
        host.start("f", false).unwrap();
        host.fail_next(FakeOp::CreateDiskSnapshot, 2);
        assert!(host.create_disk_snapshot("f", "xvda", "s").is_err());
        assert!(host.create_disk_snapshot("f", "xvda", "s").is_err());
        assert!(host.disk_snapshots("f", "xvda").unwrap().is_empty());
        host.create_disk_snapshot("f", "xvda", "s").unwrap();
        assert_eq!(host.disk_snapshots("f", "xvda").unwrap(), ["s"]);
        host.destroy("f").unwrap();
    }
}
