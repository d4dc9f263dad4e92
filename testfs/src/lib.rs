//! A FUSE file system for domsnap's power-cut and I/O-error tests.
//!
//! Mounted over an empty directory, it keeps everything in memory, in two trees (see
//! [`model`]): what processes see, and what a disk would still hold after a power cut — a
//! file's data only once it was `fsync`ed, a directory's entries only once the directory
//! was. [`TestFs::power_cut`] freezes the file system, kills every process that uses it,
//! unmounts it, makes current what was durable and mounts it again: for everything under the
//! mount (a journal, pack files, disk images, a guest's memory), the writes that were not
//! synced are gone, exactly as after a real power cut on a disk that honours `fsync`.
//!
//! [`TestFs::inject`] makes chosen calls on chosen paths fail (`ENOSPC`, `EIO`, …) and
//! [`TestFs::set_capacity`] makes the file system fill up like a small disk.
//!
//! It needs `/dev/fuse` and root (it mounts with mount(2), no helper). [`available`] says
//! whether this machine can run it.
#![warn(missing_docs)]

mod fuse;
pub mod model;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use model::{Fault, FaultOn, Model};

/// Whether FUSE file systems can be mounted here: `Err` says why not.
pub fn available() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("mounting without the fusermount helper needs root".into());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(|e| format!("/dev/fuse cannot be opened: {e}"))
}

/// A mounted test file system.
pub struct TestFs {
    model: Arc<Mutex<Model>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    cuts: u64,
}

impl std::fmt::Debug for TestFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestFs")
            .field("mountpoint", &self.mountpoint)
            .field("cuts", &self.cuts)
            .finish()
    }
}

/// What a power cut did.
#[derive(Debug, Clone, Default)]
pub struct Cut {
    /// Processes killed (they had a file or directory of the mount open).
    pub killed: Vec<u32>,
}

impl TestFs {
    /// Mounts an empty file system on `mountpoint` (an existing empty directory).
    pub fn mount(mountpoint: &Path) -> std::io::Result<TestFs> {
        let mut fs = TestFs {
            model: Arc::new(Mutex::new(Model::new())),
            mountpoint: mountpoint.canonicalize()?,
            session: None,
            cuts: 0,
        };
        fs.attach()?;
        Ok(fs)
    }

    fn attach(&mut self) -> std::io::Result<()> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("domsnap-testfs".into()),
            fuser::MountOption::Subtype("testfs".into()),
        ];
        let session =
            fuser::spawn_mount(fuse::Fs(Arc::clone(&self.model)), &self.mountpoint, &config)?;
        self.session = Some(session);
        Ok(())
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The file system's state (faults, capacity, what fired).
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms a fault.
    pub fn inject(&self, fault: Fault) {
        self.model().inject(fault);
    }

    /// Disarms every fault and forgets what fired.
    pub fn clear_faults(&self) {
        let mut m = self.model();
        m.clear_faults();
        m.fired.clear();
    }

    /// Limits the file data the file system holds (`None`: no limit).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.model().capacity = bytes;
    }

    /// Power cuts so far.
    pub fn cuts(&self) -> u64 {
        self.cuts
    }

    /// Processes with a file, directory, working directory or mapping under the mount.
    pub fn users(&self) -> Vec<u32> {
        let me = std::process::id();
        let mut out = Vec::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return out;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me || is_zombie(pid) {
                continue;
            }
            if self.used_by(pid) {
                out.push(pid);
            }
        }
        out
    }

    fn used_by(&self, pid: u32) -> bool {
        let base = PathBuf::from(format!("/proc/{pid}"));
        let under = |p: &Path| p.starts_with(&self.mountpoint);
        if std::fs::read_link(base.join("cwd")).is_ok_and(|p| under(&p)) {
            return true;
        }
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            for fd in fds.flatten() {
                if std::fs::read_link(fd.path()).is_ok_and(|p| under(&p)) {
                    return true;
                }
            }
        }
        let mount = self.mountpoint.to_string_lossy().to_string();
        std::fs::read_to_string(base.join("maps")).is_ok_and(|m| m.contains(&mount))
    }

    /// The power cut: from this instant nothing more becomes durable and no call returns
    /// (callers wait); every process using the file system, and every process of `also`, is
    /// killed with SIGKILL; the file system is unmounted, becomes what was durable, and is
    /// mounted again.
    pub fn power_cut(&mut self, also: &[u32]) -> std::io::Result<Cut> {
        self.model().frozen = true;
        let mut cut = Cut::default();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut victims = self.users();
            victims.extend(also.iter().copied().filter(|p| !is_zombie(*p) && alive(*p)));
            victims.sort_unstable();
            victims.dedup();
            if victims.is_empty() {
                break;
            }
            for pid in &victims {
                // SAFETY: kill(2) with a pid and a signal number has no memory effects.
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                }
                if !cut.killed.contains(pid) {
                    cut.killed.push(*pid);
                }
            }
            // A call the file system had already taken holds its process until answered:
            // answer the waiting calls now (EIO). Their processes have SIGKILL pending and
            // die on the way back, without seeing it.
            self.model().draining = true;
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "processes {victims:?} survive SIGKILL"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // The unmount's own calls (and a release the kernel sends for a file closed just
        // before the cut) must be answered too, also when nobody was using the mount.
        self.model().draining = true;
        self.detach()?;
        self.model().reboot();
        self.cuts += 1;
        self.attach()?;
        Ok(cut)
    }

    fn detach(&mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // Unmounted here, retrying while a dying process still holds it (busy); then the
        // session ends by itself.
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // SAFETY: a valid NUL-terminated path; umount2 only reads it.
            if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) || Instant::now() > deadline {
                return Err(e);
            }
            for pid in self.users() {
                // SAFETY: kill(2) with a pid and a signal number has no memory effects.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        session.join()
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if session.umount_and_join().is_err() {
                // Still busy: detach it, so the directory can go.
                if let Ok(c) =
                    std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
                {
                    // SAFETY: a valid NUL-terminated path; umount2 only reads it.
                    unsafe {
                        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                    }
                }
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn is_zombie(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}
