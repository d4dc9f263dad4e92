//! The guest process: what a running simulated domain is.
//!
//! One process per active domain, started by [`SimHost`](super::SimHost) as
//! `<exe> __sim-guest <state_dir> <name>` and entered through [`guest_main`]. It holds:
//!
//! - a **vCPU thread** running the domain's [`Workload`], which touches memory (`pwrite` on
//!   the `memory` file) and disks (through the device model);
//! - a **device model** that owns the qcow2 images (`disk::DataImage`), one mutex per disk,
//!   so a snapshot request waits for the write in flight and no write starts during it;
//! - a **control server** on `control.sock` (see [`control`](super::control)), one thread per
//!   connection.
//!
//! SIGTERM and SIGINT shut the guest down gracefully (as `quit`); SIGHUP is ignored.
//!
//! The guest always boots paused; the host unpauses it when asked to start it running. It
//! holds an exclusive `flock` on `guest.pid` for its whole life: that lock, not the pid, is
//! what says the domain is active. If the vCPU's I/O fails the guest logs it and exits with
//! status 2 (a crashed domain is destroyed, as with Xen's default `on_crash`).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::RunState;

use super::config::{validate_image_name, validate_name, DomainConfig, DomainDir, Workload};
use super::control::{Request, Response};
use super::dirty::DirtyLog;
use super::process::flock;

/// Pause between two iterations of the `counter` vCPU loop. Each iteration is one 8-byte
/// qcow2 write and one 8-byte memory `pwrite` (a few µs); the sleep keeps a running domain at
/// a few percent of one core, on a machine of two cores shared with builds and other guests.
pub const VCPU_PERIOD: Duration = Duration::from_micros(500);

/// How often an `idle` vCPU wakes up.
const IDLE_PERIOD: Duration = Duration::from_millis(20);

type GuestResult<T> = std::result::Result<T, String>;

/// Runs the simulated guest of domain `name` in the state directory `state_dir` and exits
/// the process: 0 after a `quit` request, 1 if it could not start, 2 if its vCPU crashed.
///
/// The domsnap binary calls this when its first argument is `__sim-guest`
/// ([`GUEST_ARG`](super::GUEST_ARG)): `domsnap __sim-guest <state_dir> <name>`.
pub fn guest_main(state_dir: &Path, name: &str) -> ! {
    // Everything a guest creates (its socket, logs, memory) is private to its owner.
    // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    match run(state_dir, name) {
        Ok(never) => match never {},
        Err(e) => {
            log(&format!("cannot start: {e}"));
            std::process::exit(1)
        }
    }
}

/// Runs [`guest_main`] from the process arguments that follow `__sim-guest`:
/// `<state_dir> <name>`. Exits with status 64 on bad arguments.
pub fn guest_main_from_args(mut args: impl Iterator<Item = std::ffi::OsString>) -> ! {
    match (args.next(), args.next(), args.next()) {
        (Some(state_dir), Some(name), None) => match name.to_str() {
            Some(name) => guest_main(Path::new(&state_dir), name),
            None => {
                log("domain name is not UTF-8");
                std::process::exit(64)
            }
        },
        _ => {
            log("usage: __sim-guest <state_dir> <name>");
            std::process::exit(64)
        }
    }
}

fn log(message: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!(
        "[{}.{:03} guest {}] {message}",
        now.as_secs(),
        now.subsec_millis(),
        std::process::id()
    );
}

enum Never {}

/// This boot's token: random, so a domain started again answers with another one.
fn boot_token() -> u64 {
    let mut bytes = [0u8; 8];
    let read = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(bytes)
}

fn run(state_dir: &Path, name: &str) -> GuestResult<Never> {
    validate_name(name).map_err(|e| e.to_string())?;
    let dir = DomainDir::new(&super::domains_dir(state_dir), name);
    let config = DomainConfig::load(&dir).map_err(|e| e.to_string())?;
    std::env::set_current_dir(&dir.path)
        .map_err(|e| format!("chdir {}: {e}", dir.path.display()))?;

    let pid_lock = lock_pid_file(&dir)?;
    match std::fs::remove_file("control.sock") {
        Ok(()) => log("removed a stale control.sock"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("remove stale control.sock: {e}")),
    }

    let memory = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.memory())
        .map_err(|e| format!("open memory: {e}"))?;
    let mut first = [0u8; 8];
    memory
        .read_exact_at(&mut first, 0)
        .map_err(|e| format!("read memory: {e}"))?;
    let n = u64::from_le_bytes(first);

    let dirty = DirtyLog::create(&dir.dirty_log(), config.memory_bytes / super::PAGE_SIZE)
        .map_err(|e| format!("create dirty.log: {e}"))?;

    // Before any thread exists, so that every thread inherits the mask.
    let signals = block_signals()?;
    let dm = DeviceModel::open(&config, &dir)?;
    let guest = Arc::new(Guest {
        vcpu: Vcpu::new(n),
        dm,
        memory,
        dirty,
        workload: config.workload,
        dir,
        boot: boot_token(),
        _pid_lock: pid_lock,
    });

    // Bound relative to the domain directory (our cwd): sun_path is only 108 bytes.
    let listener =
        UnixListener::bind("control.sock").map_err(|e| format!("bind control.sock: {e}"))?;
    {
        let guest = Arc::clone(&guest);
        std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || guest.vcpu_loop())
            .map_err(|e| format!("spawn vCPU thread: {e}"))?;
    }
    {
        let guest = Arc::clone(&guest);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || guest.wait_signals(signals))
            .map_err(|e| format!("spawn signal thread: {e}"))?;
    }
    log(&format!(
        "domain {name} booted paused, workload {}, n = {n}",
        config.workload
    ));

    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let guest = Arc::clone(&guest);
                if let Err(e) = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || guest.serve(stream))
                {
                    log(&format!("cannot serve a control connection: {e}"));
                }
            }
            Err(e) => log(&format!("accept on control.sock: {e}")),
        }
    }
    Err("control socket closed".into())
}

/// The signals the guest handles in its `signals` thread: SIGTERM and SIGINT shut it down
/// gracefully (as `quit`), SIGHUP is ignored (the guest outlives a closed terminal).
#[derive(Debug, Clone, Copy)]
struct Signals(libc::sigset_t);

fn block_signals() -> GuestResult<Signals> {
    // SAFETY: sigemptyset/sigaddset initialise the set we own; pthread_sigmask changes only
    // the calling thread's mask (no other thread exists yet).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(format!(
                "block signals: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        Ok(Signals(set))
    }
}

/// Takes the exclusive lock on `guest.pid` (retrying briefly: a host-side liveness check
/// holds a shared lock for a moment) and writes our pid into it.
fn lock_pid_file(dir: &DomainDir) -> GuestResult<File> {
    let path = dir.pid_file();
    for _ in 0..200 {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(|e| format!("lock pid: {e}"))? {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        // The file may have been removed as stale between open and lock: lock the one at
        // the path.
        let same = match (file.metadata(), std::fs::metadata(&path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if !same {
            continue;
        }
        file.set_len(0)
            .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        return Ok(file);
    }
    Err(format!(
        "another guest process holds {} (domain already active)",
        path.display()
    ))
}

/// Run control of the vCPU thread.
#[derive(Debug)]
struct VcpuCtl {
    /// Asked to run (running) or not (paused).
    run: bool,
    /// Inside an iteration of the workload.
    busy: bool,
    /// The last counter value stored in memory.
    n: u64,
    /// Iterations of the workload run so far (idle ones included).
    steps: u64,
    /// The vCPU thread is waiting to be let run (it has stopped).
    parked: bool,
}

#[derive(Debug)]
struct Vcpu {
    ctl: Mutex<VcpuCtl>,
    changed: Condvar,
}

impl Vcpu {
    fn new(n: u64) -> Vcpu {
        Vcpu {
            ctl: Mutex::new(VcpuCtl {
                run: false,
                busy: false,
                n,
                steps: 0,
                parked: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VcpuCtl> {
        // A poisoned lock means a thread panicked mid-update; the state is still plain data.
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the vCPU and waits until its current iteration is over.
    fn stop(&self) {
        let mut ctl = self.lock();
        ctl.run = false;
        while ctl.busy {
            ctl = self.changed.wait(ctl).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn resume(&self) {
        self.lock().run = true;
        self.changed.notify_all();
    }
}

/// The image a disk of the device model is on, and the image opened (None while an image
/// operation has it closed).
#[derive(Debug)]
struct Slot {
    /// The disk's current image (changes with external snapshots).
    path: PathBuf,
    image: Option<disk::DataImage>,
}

impl Slot {
    /// Flushes and closes the image; on a failed flush it stays open.
    fn close(&mut self, target: &str) -> GuestResult<()> {
        if let Some(mut image) = self.image.take() {
            if let Err(e) = image.flush() {
                self.image = Some(image);
                return Err(format!("flush {target}: {}", chain(&e)));
            }
        }
        Ok(())
    }

    /// Opens the current image again if it is closed.
    fn reopen(&mut self) -> GuestResult<()> {
        if self.image.is_none() {
            let image = disk::DataImage::open(&self.path).map_err(|e| {
                format!(
                    "reopen {} after an image operation: {}",
                    self.path.display(),
                    chain(&e)
                )
            })?;
            self.image = Some(image);
        }
        Ok(())
    }
}

/// One disk as the device model holds it.
#[derive(Debug)]
struct Disk {
    target: String,
    slot: Mutex<Slot>,
}

impl Disk {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The device model: the domain's disks, shared by the vCPU and the control server.
#[derive(Debug)]
struct DeviceModel {
    disks: Vec<Disk>,
    dir: DomainDir,
}

impl DeviceModel {
    /// Opens the current image of every disk, as `domain.json` names it.
    fn open(config: &DomainConfig, dir: &DomainDir) -> GuestResult<DeviceModel> {
        let disks = config
            .disk_infos(dir)
            .into_iter()
            .map(|info| {
                let image = disk::DataImage::open(&info.path)
                    .map_err(|e| format!("open {}: {}", info.path.display(), chain(&e)))?;
                Ok(Disk {
                    target: info.target,
                    slot: Mutex::new(Slot {
                        path: info.path,
                        image: Some(image),
                    }),
                })
            })
            .collect::<GuestResult<Vec<Disk>>>()?;
        Ok(DeviceModel {
            disks,
            dir: dir.clone(),
        })
    }

    fn disk(&self, target: &str) -> GuestResult<&Disk> {
        self.disks
            .iter()
            .find(|d| d.target == target)
            .ok_or_else(|| format!("no disk {target:?}"))
    }

    /// Writes `buf` at `offset` of disk `target` and returns once the write is complete.
    fn write(&self, target: &str, buf: &[u8], offset: u64) -> GuestResult<()> {
        let disk = self.disk(target)?;
        let mut slot = disk.lock();
        let image = slot
            .image
            .as_mut()
            .ok_or_else(|| format!("{target} is closed after a failed image operation"))?;
        image
            .write_at(buf, offset)
            .map(|_| ())
            .map_err(|e| format!("write {target}: {}", chain(&e)))
    }

    /// Flushes every open disk to its image file.
    fn flush_all(&self) -> GuestResult<()> {
        for disk in &self.disks {
            if let Some(image) = disk.lock().image.as_mut() {
                image
                    .flush()
                    .map_err(|e| format!("flush {}: {}", disk.target, chain(&e)))?;
            }
        }
        Ok(())
    }

    /// Runs `op` on the current image file of `target` with the disk quiesced: no write in
    /// flight, flushed and closed; reopens it afterwards.
    fn with_image_closed(
        &self,
        target: &str,
        op: impl FnOnce(&Path) -> GuestResult<()>,
    ) -> GuestResult<()> {
        let disk = self.disk(target)?;
        let mut slot = disk.lock();
        slot.close(target)?;
        let result = op(&slot.path);
        slot.reopen()?;
        result
    }

    fn snapshot_create(&self, target: &str, tag: &str) -> GuestResult<()> {
        self.with_image_closed(target, |path| match disk::create_snapshot(path, tag) {
            Ok(_) | Err(disk::Error::SnapshotExists { .. }) => Ok(()),
            Err(e) => Err(format!("snapshot {tag:?} of {target}: {}", chain(&e))),
        })
    }

    fn snapshot_delete(&self, target: &str, tag: &str) -> GuestResult<()> {
        self.with_image_closed(target, |path| match disk::delete_snapshot(path, tag) {
            Ok(_) | Err(disk::Error::NoSuchSnapshot { .. }) => Ok(()),
            Err(e) => Err(format!(
                "delete snapshot {tag:?} of {target}: {}",
                chain(&e)
            )),
        })
    }

    /// External snapshot of `target`: with the disk quiesced and closed, creates `overlay`
    /// on the current image (or takes an existing one that backs onto it: an earlier attempt
    /// that did not get to switch), opens it, records it in `domain.json` and keeps it as the
    /// disk's image. On error the disk stays on its old image. Idempotent.
    fn external_snapshot(&self, target: &str, overlay: &str) -> GuestResult<()> {
        validate_image_name(overlay).map_err(|e| e.to_string())?;
        let disk = self.disk(target)?;
        let mut slot = disk.lock();
        let new_path = self.dir.path.join(overlay);
        if slot.path == new_path {
            return Ok(());
        }
        slot.close(target)?;
        let switched = (|| -> GuestResult<disk::DataImage> {
            super::images::prepare_overlay(&self.dir, &slot.path, overlay)
                .map_err(|e| chain(&e))?;
            let image = disk::DataImage::open(&new_path)
                .map_err(|e| format!("open {}: {}", new_path.display(), chain(&e)))?;
            // The switch is durable before the guest writes to the overlay.
            super::images::set_disk_image(&self.dir, target, overlay).map_err(|e| chain(&e))?;
            Ok(image)
        })();
        match switched {
            Ok(image) => {
                slot.path = new_path;
                slot.image = Some(image);
                log(&format!("{target} switched to {overlay}"));
                Ok(())
            }
            Err(e) => {
                slot.reopen()?;
                Err(format!("external snapshot {overlay} of {target}: {e}"))
            }
        }
    }

    /// Rebases `image` (the current image of `target` or one of its backing chain) onto
    /// `backing` (or none) with `target` quiesced and closed; reopens it afterwards.
    fn rebase_image(&self, target: &str, image: &str, backing: Option<&str>) -> GuestResult<()> {
        validate_image_name(image).map_err(|e| e.to_string())?;
        if let Some(b) = backing {
            validate_image_name(b).map_err(|e| e.to_string())?;
        }
        let image_path = self.dir.path.join(image);
        let backing_path = backing.map(|b| self.dir.path.join(b));
        self.with_image_closed(target, |_| {
            disk::rebase(&image_path, backing_path.as_deref())
                .map_err(|e| format!("rebase {image} of {target}: {}", chain(&e)))
        })
    }

    /// Flushes and closes every disk (at quit).
    fn close_all(&self) -> GuestResult<()> {
        for disk in &self.disks {
            disk.lock().close(&disk.target)?;
        }
        Ok(())
    }
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[derive(Debug)]
struct Guest {
    vcpu: Vcpu,
    dm: DeviceModel,
    memory: File,
    /// Pages the vCPU wrote since the host last reset the log.
    dirty: DirtyLog,
    workload: Workload,
    dir: DomainDir,
    /// This boot's token ([`crate::DomainInfo::instance`]).
    boot: u64,
    /// Held for the life of the process: while it is, the domain is active.
    _pid_lock: File,
}

impl Guest {
    fn vcpu_loop(&self) {
        loop {
            let n = {
                let mut ctl = self.vcpu.lock();
                while !ctl.run {
                    if !ctl.parked {
                        ctl.parked = true;
                        self.vcpu.changed.notify_all();
                    }
                    ctl = self
                        .vcpu
                        .changed
                        .wait(ctl)
                        .unwrap_or_else(|p| p.into_inner());
                }
                ctl.parked = false;
                ctl.busy = true;
                ctl.n
            };
            let step = self.step(n);
            {
                let mut ctl = self.vcpu.lock();
                ctl.busy = false;
                ctl.steps += 1;
                if let Ok(Some(next)) = step {
                    ctl.n = next;
                }
            }
            self.vcpu.changed.notify_all();
            match step {
                Ok(Some(_)) => std::thread::sleep(VCPU_PERIOD),
                Ok(None) => std::thread::sleep(IDLE_PERIOD),
                Err(e) => {
                    log(&format!("vCPU crashed: {e}"));
                    std::process::exit(2);
                }
            }
        }
    }

    /// One iteration of the workload; the new counter, if it has one.
    fn step(&self, n: u64) -> GuestResult<Option<u64>> {
        match self.workload {
            Workload::Idle => Ok(None),
            Workload::Counter => {
                let next = n.wrapping_add(1);
                let bytes = next.to_le_bytes();
                if !self.dm.disks.is_empty() {
                    self.dm.write("xvda", &bytes, 0)?;
                }
                self.dirty
                    .mark(0)
                    .map_err(|e| format!("write dirty.log: {e}"))?;
                self.memory
                    .write_all_at(&bytes, 0)
                    .map_err(|e| format!("write memory: {e}"))?;
                Ok(Some(next))
            }
        }
    }

    /// Writes the file at `path` (as long as memory) into memory page by page, marking the
    /// pages that change, as the vCPU's own writes are.
    fn load_memory(&self, path: &Path) -> GuestResult<()> {
        let err = |what: &str, e: std::io::Error| {
            format!("load memory from {}: {what}: {e}", path.display())
        };
        let source = File::open(path).map_err(|e| err("open", e))?;
        let len = self
            .memory
            .metadata()
            .map_err(|e| err("stat memory", e))?
            .len();
        if source.metadata().map_err(|e| err("stat", e))?.len() != len {
            return Err(format!(
                "load memory from {}: not {len} bytes long",
                path.display()
            ));
        }
        let page = super::PAGE_SIZE as usize;
        let mut new = vec![0u8; 1 << 20];
        let mut old = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < len {
            let n = ((len - at) as usize).min(new.len());
            source
                .read_exact_at(&mut new[..n], at)
                .map_err(|e| err("read", e))?;
            self.memory
                .read_exact_at(&mut old[..n], at)
                .map_err(|e| err("read memory", e))?;
            for p in (0..n).step_by(page) {
                let end = (p + page).min(n);
                if new[p..end] != old[p..end] {
                    self.dirty
                        .mark((at + p as u64) / super::PAGE_SIZE)
                        .map_err(|e| err("write dirty.log", e))?;
                    self.memory
                        .write_all_at(&new[p..end], at + p as u64)
                        .map_err(|e| err("write memory", e))?;
                }
            }
            at += n as u64;
        }
        Ok(())
    }

    /// Stops the vCPU, flushes the disks and syncs the memory file.
    fn pause(&self) -> GuestResult<()> {
        self.vcpu.stop();
        self.dm.flush_all()?;
        self.memory
            .sync_data()
            .map_err(|e| format!("sync memory: {e}"))
    }

    fn handle(&self, request: &Request) -> GuestResult<Response> {
        match request {
            Request::Status => {
                let ctl = self.vcpu.lock();
                Ok(Response {
                    ok: true,
                    state: Some(if ctl.run {
                        RunState::Running
                    } else {
                        RunState::Paused
                    }),
                    n: Some(ctl.n),
                    pid: Some(std::process::id()),
                    steps: Some(ctl.steps),
                    parked: Some(ctl.parked),
                    boot: Some(self.boot),
                    ..Response::default()
                })
            }
            Request::Pause => {
                self.pause()?;
                Ok(Response::ok())
            }
            Request::Unpause => {
                self.vcpu.resume();
                Ok(Response::ok())
            }
            Request::ResetDirty { base } => {
                self.dirty
                    .reset(*base)
                    .map_err(|e| format!("reset dirty.log: {e}"))?;
                Ok(Response::ok())
            }
            Request::LoadMemory { path } => {
                self.load_memory(Path::new(path))?;
                Ok(Response::ok())
            }
            Request::SnapshotCreate { disk, tag } => {
                self.dm.snapshot_create(disk, tag)?;
                Ok(Response::ok())
            }
            Request::SnapshotDelete { disk, tag } => {
                self.dm.snapshot_delete(disk, tag)?;
                Ok(Response::ok())
            }
            Request::ExternalSnapshot { disk, overlay } => {
                self.dm.external_snapshot(disk, overlay)?;
                Ok(Response::ok())
            }
            Request::RebaseImage {
                disk,
                image,
                backing,
            } => {
                self.dm.rebase_image(disk, image, backing.as_deref())?;
                Ok(Response::ok())
            }
            Request::Quit => {
                self.pause()?;
                self.dm.close_all()?;
                Ok(Response::ok())
            }
        }
    }

    /// Waits for the blocked signals: SIGTERM and SIGINT shut the domain down as `quit`
    /// does; SIGHUP is logged and ignored.
    fn wait_signals(&self, signals: Signals) {
        loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: sigwait reads the initialised set and writes one int we own.
            let rc = unsafe { libc::sigwait(&signals.0, &mut signal) };
            if rc != 0 {
                log(&format!(
                    "sigwait: {}",
                    std::io::Error::from_raw_os_error(rc)
                ));
                return;
            }
            if signal == libc::SIGHUP {
                log("SIGHUP ignored");
                continue;
            }
            log(&format!("signal {signal}: shutting down"));
            match self.handle(&Request::Quit) {
                Ok(_) => {
                    self.remove_control_files();
                    log("shut down");
                    std::process::exit(0);
                }
                Err(e) => log(&format!("graceful shutdown failed: {e}")),
            }
        }
    }

    /// Makes the domain shut off in the host's eyes: no socket, no pid file.
    fn remove_control_files(&self) {
        let _ = std::fs::remove_file(self.dir.socket());
        let _ = std::fs::remove_file(self.dir.pid_file());
    }

    fn serve(&self, stream: UnixStream) {
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => {
                    log(&format!("read control request: {e}"));
                    return;
                }
            }
            let request = serde_json::from_str::<Request>(&line);
            let response = match &request {
                Ok(request) => self.handle(request).unwrap_or_else(|e| {
                    log(&format!("{request:?} failed: {e}"));
                    Response::error(e)
                }),
                Err(e) => Response::error(format!("bad request {:?}: {e}", line.trim_end())),
            };
            let quit = matches!(request, Ok(Request::Quit)) && response.ok;
            if quit {
                // Gone from the host's view before we answer: no new connection, no pid.
                self.remove_control_files();
            }
            let mut text = serde_json::to_string(&response)
                .unwrap_or_else(|_| r#"{"ok":false,"error":"unencodable answer"}"#.to_owned());
            text.push('\n');
            if let Err(e) = (&stream).write_all(text.as_bytes()) {
                log(&format!("write control answer: {e}"));
            }
            if quit {
                log("shut down");
                std::process::exit(0);
            }
        }
    }
}
