//! The simulated Xen host, kept in a state directory: domsnap's default host.
//!
//! A domain is a directory `<state_dir>/sim/domains/<name>/` (layout in `config.rs`):
//! a raw memory file, qcow2 disks and `domain.json`. An active (running or paused) domain is
//! a **guest process** ([`guest_main`]): a vCPU thread that changes memory and disks, and a
//! device model that owns the disk images and answers on a control socket, as QEMU does for
//! a Xen guest. The guest is detached from the command that started it (own process group,
//! not waited for), so killing a domsnap command never kills a domain.
//!
//! **Wiring the guest.** [`SimHost::start`] runs `<exe> __sim-guest <state_dir> <name>`,
//! where `<exe>` is, in order: the path given to [`SimHost::with_guest_exe`], the
//! environment variable `DOMSNAP_SIM_GUEST_EXE` ([`GUEST_EXE_ENV`]), or the current
//! executable. A binary that may serve as `<exe>` must call [`guest_main_from_args`] (or
//! [`guest_main`]) when its first argument is [`GUEST_ARG`]; the `domsnap` binary does, and so
//! does this crate's `sim-guest` binary (used by tests).
//!
//! **Workloads.** What the vCPU does is a [`Workload`] kept in `domain.json`:
//! [`SimHost::define`] defines a [`Workload::Counter`] domain,
//! [`SimHost::define_with_workload`] takes one, [`SimHost::set_workload`] changes it for the
//! next start (`domsnap domain define|start NAME --workload counter|idle`). With `counter`,
//! memory offset 0 holds `m` and `xvda` offset 0 holds `m` or `m + 1` whenever the domain is
//! paused ([`SimHost::memory_counter`] reads `m`); the vCPU sleeps [`VCPU_PERIOD`] between
//! iterations (about 2,000 per second, a few percent of a core).
//!
//! **State.** A domain is active exactly while a guest process holds the `flock` on its
//! `guest.pid`; then its state is what the guest answers (`running` / `paused`). No lock
//! holder means shut off, whatever pid file or socket was left behind.
//!
//! **Concurrency.** Commands that change the run state or touch the images of a shut-off
//! domain (start, shutdown, destroy, restore, undefine, disk snapshots, external snapshots,
//! image removal) hold an `flock` on `host.lock`, so two domsnap processes never start one
//! domain twice. Pause, unpause and status go straight to the guest, which serializes them
//! itself.
//!
//! **External snapshots.** Each disk's current image is recorded in `domain.json` (default
//! `<target>.qcow2`); every image of a domain is a `*.qcow2` file of its directory, and image
//! paths given by callers are checked to be exactly that (a bare file name or an absolute
//! path whose directory is the domain directory; no symbolic links). While the domain is
//! active, switching a disk to a new overlay and rebasing an image the guest has open
//! (its current image or one of that image's backing chain) go through the device model,
//! which closes the disk for the operation. Overlays are created under a hidden temporary
//! name and renamed into place; `domain.json` is replaced atomically and durably.

mod config;
mod control;
mod dirty;
mod fake;
mod guest;
mod images;
mod process;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use config::{
    validate_image_name, validate_memory, validate_name, Workload, MAX_DISKS, MAX_IMAGE_NAME_LEN,
    MAX_NAME_LEN, MIN_MEMORY_BYTES, PAGE_SIZE,
};
pub use fake::{FakeHost, FakeOp};
pub use guest::{guest_main, guest_main_from_args, VCPU_PERIOD};
pub use process::GUEST_ARG;

use crate::{DomainInfo, Error, Host, Result, RunState};
use config::{DomainConfig, DomainDir, CONFIG_VERSION};
use control::{CallError, Request, Response};
use process::HostLock;

/// Environment variable naming the executable to run guests with (instead of the current
/// executable); [`SimHost::with_guest_exe`] takes precedence over it.
pub const GUEST_EXE_ENV: &str = "DOMSNAP_SIM_GUEST_EXE";

/// `<state_dir>/sim/domains`.
pub(crate) fn domains_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("sim").join("domains")
}

/// How long a status query waits for a guest that holds its domain but is still booting.
const BOOT_GRACE: Duration = Duration::from_secs(5);

/// The vCPU of a simulated guest, as [`SimHost::vcpu`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuStatus {
    /// Iterations of the workload run so far (idle ones included).
    pub steps: u64,
    /// The vCPU has stopped and waits to be let run.
    pub parked: bool,
}

/// The simulated Xen host of one state directory.
#[derive(Debug, Clone)]
pub struct SimHost {
    state_dir: PathBuf,
    domains_dir: PathBuf,
    guest_exe: Option<PathBuf>,
    start_timeout: Duration,
}

impl SimHost {
    /// Opens (creating it if needed, directories mode 0700) the simulated host kept under
    /// `<state_dir>/sim/`.
    pub fn open(state_dir: &Path) -> Result<SimHost> {
        let domains = domains_dir(state_dir);
        if !domains.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&domains)
                .map_err(Error::io("create", &domains))?;
        }
        let state_dir = state_dir
            .canonicalize()
            .map_err(Error::io("resolve", state_dir))?;
        Ok(SimHost {
            domains_dir: domains_dir(&state_dir),
            state_dir,
            guest_exe: None,
            start_timeout: process::START_TIMEOUT,
        })
    }

    /// Opens the simulated host of `state_dir` to look at it: nothing is created (a state
    /// directory without a simulated host has no domains). Commands that change domains
    /// create what they need as usual.
    pub fn open_read_only(state_dir: &Path) -> Result<SimHost> {
        let state_dir = match state_dir.canonicalize() {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => state_dir.to_path_buf(),
            Err(e) => return Err(Error::io("resolve", state_dir)(e)),
        };
        Ok(SimHost {
            domains_dir: domains_dir(&state_dir),
            state_dir,
            guest_exe: None,
            start_timeout: process::START_TIMEOUT,
        })
    }

    /// Runs guests with `exe` (which must handle [`GUEST_ARG`]) instead of the current
    /// executable or [`GUEST_EXE_ENV`].
    pub fn with_guest_exe(mut self, exe: impl Into<PathBuf>) -> SimHost {
        self.guest_exe = Some(exe.into());
        self
    }

    /// How long [`Host::start`] and [`Host::restore_memory`] wait for a new guest to answer
    /// on its control socket before they kill it and fail (default 15 s).
    pub fn with_start_timeout(mut self, timeout: Duration) -> SimHost {
        self.start_timeout = timeout;
        self
    }

    /// The state directory this host lives in.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Defines a shut-off domain running the [`Workload::Counter`] workload; see
    /// [`SimHost::define_with_workload`].
    pub fn define(&self, name: &str, memory_bytes: u64, disk_sizes: &[u64]) -> Result<DomainInfo> {
        self.define_with_workload(name, memory_bytes, disk_sizes, Workload::Counter)
    }

    /// Defines a shut-off domain: `memory_bytes` of zeroed memory (a sparse file, mode 0600)
    /// and one empty qcow2 disk per entry of `disk_sizes`, named `xvda`, `xvdb`, …
    ///
    /// The name is 1–64 characters of `[A-Za-z0-9._-]` not starting with `.`; memory is a
    /// multiple of 4096 bytes and at least 1 MiB; disk sizes are positive multiples of 512.
    /// [`Error::DomainExists`] if the name is taken. Atomic: built in a hidden directory and
    /// renamed into place, so nothing is left behind on error.
    pub fn define_with_workload(
        &self,
        name: &str,
        memory_bytes: u64,
        disk_sizes: &[u64],
        workload: Workload,
    ) -> Result<DomainInfo> {
        validate_name(name)?;
        validate_memory(memory_bytes)?;
        let disks = config::disk_configs(disk_sizes)?;
        let dir = DomainDir::new(&self.domains_dir, name);
        if dir.exists() {
            return Err(Error::DomainExists(name.to_owned()));
        }
        let config = DomainConfig {
            version: CONFIG_VERSION,
            name: name.to_owned(),
            memory_bytes,
            disks,
            workload,
        };
        let tmp = DomainDir {
            path: self.domains_dir.join(hidden_name("define", name)),
        };
        let built = build_domain_dir(&tmp, &config).and_then(|()| {
            match std::fs::rename(&tmp.path, &dir.path) {
                Ok(()) => Ok(()),
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) =>
                {
                    Err(Error::DomainExists(name.to_owned()))
                }
                Err(e) => Err(Error::io("rename", &tmp.path)(e)),
            }
        });
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp.path);
            return Err(e);
        }
        sync_dir(&self.domains_dir)?;
        self.domain(name)
    }

    /// The workload a domain runs when started.
    pub fn workload(&self, name: &str) -> Result<Workload> {
        Ok(DomainConfig::load(&self.dir(name)?)?.workload)
    }

    /// Sets the workload the domain runs from its next start on (the running guest, if
    /// any, keeps its own).
    pub fn set_workload(&self, name: &str, workload: Workload) -> Result<()> {
        let dir = self.dir(name)?;
        let _lock = HostLock::acquire(&dir, name)?;
        let mut config = DomainConfig::load(&dir)?;
        config.workload = workload;
        write_config(&dir, &config)
    }

    /// Writes the file at `path` (exactly as long as the domain's memory) into the memory of
    /// the active domain `name` through its guest, as its vCPU would: the pages that change
    /// are in the dirty-page log. A hook for tests and benchmarks that need memory of a
    /// given content.
    pub fn load_memory(&self, name: &str, path: &Path) -> Result<()> {
        let dir = self.dir(name)?;
        let path = path
            .canonicalize()
            .map_err(Error::io("resolve", path))?
            .display()
            .to_string();
        self.call_active(&dir, name, &Request::LoadMemory { path }, "load memory")
            .map(|_| ())
    }

    /// The counter stored at offset 0 of the domain's memory (u64, little-endian): what the
    /// [`Workload::Counter`] vCPU last stored. Readable in every state.
    pub fn memory_counter(&self, name: &str) -> Result<u64> {
        let dir = self.dir(name)?;
        let path = dir.memory();
        let file = File::open(&path).map_err(Error::io("open", &path))?;
        let mut bytes = [0u8; 8];
        file.read_exact_at(&mut bytes, 0)
            .map_err(Error::io("read", &path))?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// What the guest's vCPU is doing: how many workload iterations it has run and whether it
    /// has stopped and waits to be let run. [`Error::WrongState`] if the domain is shut off.
    /// Tests wait on these instead of sleeping: a paused domain whose vCPU is parked cannot
    /// move, and an idle one that has run iterations has had its chance to.
    pub fn vcpu(&self, name: &str) -> Result<VcpuStatus> {
        let dir = self.dir(name)?;
        let r = self
            .guest_status(&dir, name)?
            .ok_or_else(|| Error::WrongState {
                domain: name.to_owned(),
                state: RunState::Shutoff,
                operation: "read the vCPU status",
                needs: "running or paused",
            })?;
        Ok(VcpuStatus {
            steps: r.steps.unwrap_or(0),
            parked: r.parked.unwrap_or(false),
        })
    }

    /// Shuts the domain down gracefully: the vCPU stops, the disks are flushed and closed,
    /// the guest process exits. Returns once it has. Idempotent: Ok if already shut off.
    pub fn shutdown(&self, name: &str) -> Result<()> {
        let dir = self.dir(name)?;
        let _lock = HostLock::acquire(&dir, name)?;
        let Some(pid) = process::live_guest(&dir)? else {
            return process::remove_stale_files(&dir);
        };
        match control::call(&dir.socket(), &Request::Quit) {
            Ok(_) => {}
            // It went away on its own meanwhile.
            Err(CallError::NotListening(_)) if process::live_guest(&dir)?.is_none() => {}
            Err(e) => return Err(device_model(name, e)),
        }
        process::wait_gone(&dir, name, pid)?;
        process::remove_stale_files(&dir)
    }

    /// Removes a shut-off domain and all its files (memory, disks and their snapshots).
    pub fn undefine(&self, name: &str) -> Result<()> {
        let dir = self.dir(name)?;
        let lock = HostLock::acquire(&dir, name)?;
        self.require_shutoff(&dir, name, "undefine")?;
        let trash = self.domains_dir.join(hidden_name("undefine", name));
        std::fs::rename(&dir.path, &trash).map_err(Error::io("rename", &dir.path))?;
        sync_dir(&self.domains_dir)?;
        drop(lock);
        std::fs::remove_dir_all(&trash).map_err(Error::io("remove", &trash))
    }

    fn guest_exe(&self) -> Result<PathBuf> {
        if let Some(exe) = &self.guest_exe {
            return Ok(exe.clone());
        }
        if let Some(exe) = std::env::var_os(GUEST_EXE_ENV).filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(exe));
        }
        std::env::current_exe().map_err(Error::io("find", "the current executable"))
    }

    /// The directory of an existing domain.
    fn dir(&self, name: &str) -> Result<DomainDir> {
        validate_name(name)?;
        let dir = DomainDir::new(&self.domains_dir, name);
        if !dir.exists() {
            return Err(Error::NoSuchDomain(name.to_owned()));
        }
        Ok(dir)
    }

    /// What the guest says, or None if the domain is shut off. Waits a little for a guest
    /// that holds the domain but does not listen yet (booting).
    fn guest_status(&self, dir: &DomainDir, name: &str) -> Result<Option<Response>> {
        let deadline = Instant::now() + BOOT_GRACE;
        loop {
            let Some(pid) = process::live_guest(dir)? else {
                return Ok(None);
            };
            let answer = control::call(&dir.socket(), &Request::Status);
            if answer.is_err() && process::live_guest(dir)?.is_none() {
                // It died while we asked.
                return Ok(None);
            }
            match answer {
                Ok(response) => return Ok(Some(response)),
                Err(e @ CallError::Refused(_)) => return Err(device_model(name, e)),
                // Booting (not listening yet) or dying (connection reset before the kernel
                // released its lock): ask again.
                Err(e) if Instant::now() > deadline => {
                    return Err(Error::DeviceModel {
                        domain: name.to_owned(),
                        message: format!("guest process {pid} is alive but does not answer: {e}"),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn state(&self, dir: &DomainDir, name: &str) -> Result<RunState> {
        Ok(self.state_and_boot(dir, name)?.0)
    }

    /// The run state and, while active, the guest's boot token.
    fn state_and_boot(&self, dir: &DomainDir, name: &str) -> Result<(RunState, Option<u64>)> {
        Ok(match self.guest_status(dir, name)? {
            None => (RunState::Shutoff, None),
            Some(r) => (r.state.unwrap_or(RunState::Paused), r.boot),
        })
    }

    fn require_shutoff(&self, dir: &DomainDir, name: &str, operation: &'static str) -> Result<()> {
        let state = self.state(dir, name)?;
        if state.is_active() {
            return Err(Error::WrongState {
                domain: name.to_owned(),
                state,
                operation,
                needs: "shut off",
            });
        }
        process::remove_stale_files(dir)
    }

    /// Sends `request` to the guest of an active domain; WrongState if shut off.
    fn call_active(
        &self,
        dir: &DomainDir,
        name: &str,
        request: &Request,
        operation: &'static str,
    ) -> Result<Response> {
        if process::live_guest(dir)?.is_none() {
            return Err(Error::WrongState {
                domain: name.to_owned(),
                state: RunState::Shutoff,
                operation,
                needs: "running or paused",
            });
        }
        // A guest still booting answers within BOOT_GRACE.
        self.guest_status(dir, name)?;
        control::call(&dir.socket(), request).map_err(|e| device_model(name, e))
    }

    /// Starts the guest of a shut-off domain; the caller holds its [`HostLock`].
    fn start_locked(&self, dir: &DomainDir, name: &str, paused: bool) -> Result<()> {
        self.require_shutoff(dir, name, "start")?;
        let exe = self.guest_exe()?;
        let mut child = process::spawn_guest(&exe, &self.state_dir, name, dir)?;
        let socket = dir.socket();
        let ready = process::wait_ready(&mut child, name, dir, self.start_timeout, || {
            control::call(&socket, &Request::Status).ok()
        })
        .and_then(|_| {
            if paused {
                Ok(())
            } else {
                control::call(&socket, &Request::Unpause)
                    .map(|_| ())
                    .map_err(|e| device_model(name, e))
            }
        });
        if let Err(e) = ready {
            process::kill_failed_start(&mut child);
            let _ = process::remove_stale_files(dir);
            return Err(e);
        }
        process::detach(child);
        Ok(())
    }

    /// The current image file of disk `target` (NoSuchDisk if the domain has none).
    fn disk_path(&self, dir: &DomainDir, name: &str, target: &str) -> Result<PathBuf> {
        let config = load_config(dir, name)?;
        let disk = config.disk(target)?;
        Ok(dir.path.join(disk.file_name()))
    }
}

/// `domain.json` of domain `name`, checked to name it.
fn load_config(dir: &DomainDir, name: &str) -> Result<DomainConfig> {
    let config = DomainConfig::load(dir)?;
    if config.name != name {
        return Err(Error::Invalid(format!(
            "{} names domain {:?}, not {name:?}",
            dir.config().display(),
            config.name
        )));
    }
    Ok(config)
}

/// A unique name for a work directory beside the domains: `.<what>-<name>-<pid>-<n>`. The
/// leading dot keeps it out of [`Host::domains`] (domain names never start with one).
fn hidden_name(what: &str, name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(".{what}-{name}-{}-{n}", std::process::id())
}

fn device_model(name: &str, e: CallError) -> Error {
    Error::DeviceModel {
        domain: name.to_owned(),
        message: e.to_string(),
    }
}

fn disk_error(path: &Path) -> impl FnOnce(disk::Error) -> Error + '_ {
    move |source| Error::Disk {
        path: path.to_owned(),
        source,
    }
}

/// fsync of a directory, so that renames and creations in it are durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("sync", dir))
}

/// Writes `domain.json` durably: temp file, sync, rename, sync the directory.
fn write_config(dir: &DomainDir, config: &DomainConfig) -> Result<()> {
    let path = dir.config();
    let tmp = dir.path.join("domain.json.tmp");
    let json = serde_json::to_vec_pretty(config).map_err(|e| Error::Io {
        op: "encode",
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(Error::io("create", &tmp))?;
    file.write_all(&json).map_err(Error::io("write", &tmp))?;
    file.sync_all().map_err(Error::io("sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(Error::io("rename", &tmp))?;
    sync_dir(&dir.path)
}

/// Creates every file of a new domain in `dir` (which must not exist).
fn build_domain_dir(dir: &DomainDir, config: &DomainConfig) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir.path)
        .map_err(Error::io("create", &dir.path))?;
    let memory = dir.memory();
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&memory)
        .map_err(Error::io("create", &memory))?;
    file.set_len(config.memory_bytes)
        .map_err(Error::io("resize", &memory))?;
    file.sync_all().map_err(Error::io("sync", &memory))?;
    for disk in &config.disks {
        let path = dir.path.join(disk.file_name());
        disk::create_image(&path, disk.size, None).map_err(disk_error(&path))?;
    }
    write_config(dir, config)
}

impl Host for SimHost {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn domains(&self) -> Result<Vec<DomainInfo>> {
        let entries = match std::fs::read_dir(&self.domains_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", &self.domains_dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Error::io("list", &self.domains_dir))?;
            if let Some(name) = entry.file_name().to_str() {
                if validate_name(name).is_ok() {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        let mut infos = Vec::with_capacity(names.len());
        for name in names {
            match self.domain(&name) {
                Ok(info) => infos.push(info),
                // Not a domain (no domain.json), or undefined meanwhile.
                Err(Error::NoSuchDomain(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(infos)
    }

    fn domain(&self, name: &str) -> Result<DomainInfo> {
        let dir = self.dir(name)?;
        let config = DomainConfig::load(&dir)?;
        let (state, instance) = self.state_and_boot(&dir, name)?;
        Ok(DomainInfo {
            name: name.to_owned(),
            state,
            instance,
            memory_bytes: config.memory_bytes,
            memory_path: Some(dir.memory()),
            disks: config.disk_infos(&dir),
        })
    }

    fn pause(&self, name: &str) -> Result<()> {
        let dir = self.dir(name)?;
        self.call_active(&dir, name, &Request::Pause, "pause")
            .map(|_| ())
    }

    fn unpause(&self, name: &str) -> Result<()> {
        let dir = self.dir(name)?;
        self.call_active(&dir, name, &Request::Unpause, "unpause")
            .map(|_| ())
    }

    fn save_memory(&self, name: &str, sink: &mut dyn Write) -> Result<u64> {
        let dir = self.dir(name)?;
        let config = DomainConfig::load(&dir)?;
        self.call_active(&dir, name, &Request::Pause, "save memory")?;
        let path = dir.memory();
        let mut file = File::open(&path).map_err(Error::io("open", &path))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("read", &path)(e)),
            };
            sink.write_all(&buf[..n]).map_err(|source| Error::Stream {
                domain: name.to_owned(),
                source,
            })?;
            written += n as u64;
        }
        sink.flush().map_err(|source| Error::Stream {
            domain: name.to_owned(),
            source,
        })?;
        if written != config.memory_bytes {
            return Err(Error::Io {
                op: "read",
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "memory file holds {written} bytes, domain has {}",
                        config.memory_bytes
                    ),
                ),
            });
        }
        Ok(written)
    }

    fn dirty_pages(&self, name: &str) -> Result<Option<crate::DirtyPages>> {
        let dir = self.dir(name)?;
        if process::live_guest(&dir)?.is_none() {
            return Ok(None);
        }
        let path = dir.dirty_log();
        Ok(dirty::read(&path)
            .map_err(Error::io("read", &path))?
            .map(|(base, pages)| crate::DirtyPages { base, pages }))
    }

    fn reset_dirty_pages(&self, name: &str, base: u64) -> Result<()> {
        let dir = self.dir(name)?;
        self.call_active(
            &dir,
            name,
            &Request::ResetDirty { base },
            "reset the dirty log",
        )
        .map(|_| ())
    }

    fn read_memory_pages(
        &self,
        name: &str,
        pages: &[u64],
        sink: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        let dir = self.dir(name)?;
        self.call_active(&dir, name, &Request::Pause, "save memory")?;
        let path = dir.memory();
        let file = File::open(&path).map_err(Error::io("open", &path))?;
        let len = file.metadata().map_err(Error::io("stat", &path))?.len();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for &page in pages {
            let at = page.saturating_mul(PAGE_SIZE);
            if at >= len {
                return Err(Error::Invalid(format!(
                    "page {page} is past the end of the memory of domain {name}"
                )));
            }
            let n = (len - at).min(PAGE_SIZE) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .map_err(Error::io("read", &path))?;
            sink(page, &buf[..n]).map_err(|source| Error::Stream {
                domain: name.to_owned(),
                source,
            })?;
        }
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<()> {
        let dir = self.dir(name)?;
        // Stop the vCPU first, so that no write (and no cluster allocation) is in flight
        // when the device model is killed: the images keep nothing worse than leaked
        // clusters, which are given back below. A guest that does not answer is killed all
        // the same.
        let _ = self.call_active(&dir, name, &Request::Pause, "destroy");
        let _lock = HostLock::acquire(&dir, name)?;
        let deadline = Instant::now() + BOOT_GRACE;
        loop {
            match process::live_guest(&dir)? {
                None => break,
                // Locked but the pid is not written yet: the guest is booting.
                Some(0) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Some(pid) => {
                    process::kill(pid).map_err(Error::io("kill guest of", &dir.path))?;
                    process::wait_gone(&dir, name, pid)?;
                    // A killed device model loses the qcow2 metadata it had not flushed,
                    // as a killed QEMU does: the clusters it allocated leak. Give them back
                    // now that nothing has the images open. Worse damage (left by a guest
                    // process that crashed on its own earlier) is not destroy's to mend:
                    // repair_leaks refuses it untouched, and `verify --disks` reports it.
                    let config = DomainConfig::load(&dir)?;
                    for disk in &config.disks {
                        let path = dir.path.join(disk.file_name());
                        match disk::repair_leaks(&path) {
                            Ok(_) | Err(disk::Error::Corruption { .. }) => {}
                            Err(e) => return Err(disk_error(&path)(e)),
                        }
                    }
                    break;
                }
            }
        }
        process::remove_stale_files(&dir)
    }

    fn restore_memory(&self, name: &str, source: &mut dyn Read) -> Result<()> {
        let dir = self.dir(name)?;
        let _lock = HostLock::acquire(&dir, name)?;
        self.require_shutoff(&dir, name, "restore memory")?;
        let config = DomainConfig::load(&dir)?;
        let tmp = dir.path.join("memory.restore");
        let written = write_memory_file(&tmp, name, source, config.memory_bytes);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let memory = dir.memory();
        std::fs::rename(&tmp, &memory).map_err(Error::io("rename", &tmp))?;
        sync_dir(&dir.path)?;
        self.start_locked(&dir, name, true)
    }

    fn start(&self, name: &str, paused: bool) -> Result<()> {
        let dir = self.dir(name)?;
        let _lock = HostLock::acquire(&dir, name)?;
        self.start_locked(&dir, name, paused)
    }

    fn supports(&self, feature: crate::Feature) -> bool {
        match feature {
            crate::Feature::Definitions | crate::Feature::Shutdown | crate::Feature::Workloads => {
                true
            }
        }
    }

    fn define_domain(&self, name: &str, spec: &crate::DomainSpec) -> Result<DomainInfo> {
        let workload = match &spec.workload {
            Some(w) => w.parse()?,
            None => Workload::Counter,
        };
        self.define_with_workload(name, spec.memory_bytes, &spec.disk_sizes, workload)
    }

    fn undefine_domain(&self, name: &str) -> Result<()> {
        self.undefine(name)
    }

    fn shutdown_domain(&self, name: &str) -> Result<()> {
        self.shutdown(name)
    }

    fn set_domain_workload(&self, name: &str, workload: &str) -> Result<()> {
        self.set_workload(name, workload.parse()?)
    }

    fn disk_snapshots(&self, name: &str, target: &str) -> Result<Vec<String>> {
        let dir = self.dir(name)?;
        let path = self.disk_path(&dir, name, target)?;
        let snapshots = disk::list_snapshots(&path).map_err(disk_error(&path))?;
        Ok(snapshots.into_iter().map(|s| s.name).collect())
    }

    fn create_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        let dir = self.dir(name)?;
        let path = self.disk_path(&dir, name, target)?;
        let _lock = HostLock::acquire(&dir, name)?;
        if process::live_guest(&dir)?.is_some() {
            let request = Request::SnapshotCreate {
                disk: target.to_owned(),
                tag: tag.to_owned(),
            };
            return self
                .call_active(&dir, name, &request, "create a disk snapshot")
                .map(|_| ());
        }
        match disk::create_snapshot(&path, tag) {
            Ok(_) | Err(disk::Error::SnapshotExists { .. }) => Ok(()),
            Err(e) => Err(disk_error(&path)(e)),
        }
    }

    fn delete_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        let dir = self.dir(name)?;
        let path = self.disk_path(&dir, name, target)?;
        let _lock = HostLock::acquire(&dir, name)?;
        if process::live_guest(&dir)?.is_some() {
            let request = Request::SnapshotDelete {
                disk: target.to_owned(),
                tag: tag.to_owned(),
            };
            return self
                .call_active(&dir, name, &request, "delete a disk snapshot")
                .map(|_| ());
        }
        match disk::delete_snapshot(&path, tag) {
            Ok(_) | Err(disk::Error::NoSuchSnapshot { .. }) => Ok(()),
            Err(e) => Err(disk_error(&path)(e)),
        }
    }

    fn apply_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        let dir = self.dir(name)?;
        let path = self.disk_path(&dir, name, target)?;
        let _lock = HostLock::acquire(&dir, name)?;
        self.require_shutoff(&dir, name, "apply a disk snapshot")?;
        match disk::apply_snapshot(&path, tag) {
            Ok(_) => Ok(()),
            Err(disk::Error::NoSuchSnapshot { .. }) => Err(Error::NoSuchDiskSnapshot {
                domain: name.to_owned(),
                target: target.to_owned(),
                tag: tag.to_owned(),
            }),
            Err(e) => Err(disk_error(&path)(e)),
        }
    }

    fn create_external_snapshot(&self, name: &str, target: &str, overlay: &Path) -> Result<()> {
        self.external_create(name, target, overlay)
    }

    fn revert_external_snapshot(
        &self,
        name: &str,
        target: &str,
        base: &Path,
        overlay: &Path,
    ) -> Result<()> {
        self.external_revert(name, target, base, overlay)
    }

    fn remove_image(&self, name: &str, target: &str, image: &Path) -> Result<()> {
        self.external_remove(name, target, image)
    }
}

/// Writes exactly `memory_bytes` from `source` into a new file at `path` (mode 0600) and
/// syncs it. A shorter or longer stream is refused.
fn write_memory_file(
    path: &Path,
    name: &str,
    source: &mut dyn Read,
    memory_bytes: u64,
) -> Result<()> {
    let stream_error = |source| Error::Stream {
        domain: name.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("create", path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(stream_error(e)),
        };
        total += n as u64;
        if total > memory_bytes {
            return Err(stream_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stream is longer than the domain's {memory_bytes} bytes of memory"),
            )));
        }
        // Start writing back what came so far: the sync at the end then waits for little.
        if total % (16 << 20) < n as u64 {
            start_writeback(&file);
        }
        // Zero pages stay holes, as in a freshly defined domain.
        if buf[..n].iter().all(|&b| b == 0) {
            file.seek(SeekFrom::Current(n as i64))
                .map_err(Error::io("seek", path))?;
        } else {
            file.write_all(&buf[..n])
                .map_err(Error::io("write", path))?;
        }
    }
    file.set_len(total).map_err(Error::io("resize", path))?;
    if total != memory_bytes {
        return Err(stream_error(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("stream holds {total} bytes, the domain has {memory_bytes} of memory"),
        )));
    }
    file.sync_all().map_err(Error::io("sync", path))
}

/// Asks the kernel to start writing `file`'s dirty pages, without waiting.
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads the descriptor, which `file` keeps open for the
    // call. A failure is harmless: the caller syncs the file anyway.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}
