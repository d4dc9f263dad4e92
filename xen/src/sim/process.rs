//! Guest processes seen from the host: liveness, spawning, killing, and the host-side lock.
//!
//! Guests are detached: own process group, no inherited descriptors, never waited for by
//! the command that started them (a background thread collects their exit status).
//!
//! A guest is alive exactly while it holds an exclusive `flock` on its `guest.pid` (the
//! kernel drops the lock when the process dies, even by `kill -9`, and a reused pid holds no
//! lock), so a stale pid file or socket never passes for a live domain.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

use super::config::DomainDir;

/// Hidden first argument that makes a domsnap executable run as a simulated guest.
pub const GUEST_ARG: &str = "__sim-guest";

/// How long `start` waits for a new guest to answer on its control socket, by default.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long `destroy` and `shutdown` wait for a guest process to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// `flock` operation `op` on `file`, retried on EINTR. Ok(false) if it would block.
pub(crate) fn flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on a file descriptor owned by `file`, alive for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// An exclusive `flock` on a domain's `host.lock`, held by a host-side command while it
/// changes the domain's run state (start, destroy, restore, undefine, offline disk work).
#[derive(Debug)]
pub(crate) struct HostLock {
    _file: File,
}

impl HostLock {
    /// Waits for and takes the lock of `dir`; [`Error::NoSuchDomain`] if the domain is gone
    /// (undefined meanwhile).
    pub fn acquire(dir: &DomainDir, name: &str) -> Result<HostLock> {
        if !dir.exists() {
            return Err(Error::NoSuchDomain(name.to_owned()));
        }
        let path = dir.host_lock();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(Error::io("open", &path))?;
        flock(&file, libc::LOCK_EX).map_err(Error::io("lock", &path))?;
        if !dir.exists() {
            return Err(Error::NoSuchDomain(name.to_owned()));
        }
        Ok(HostLock { _file: file })
    }
}

/// The pid of the live guest of `dir`, or None if no guest process holds the domain.
pub(crate) fn live_guest(dir: &DomainDir) -> Result<Option<u32>> {
    let path = dir.pid_file();
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", &path)(e)),
    };
    if flock(&file, libc::LOCK_SH | libc::LOCK_NB).map_err(Error::io("lock", &path))? {
        // Nobody holds it: stale. Our shared lock goes with `file`.
        return Ok(None);
    }
    let mut text = String::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_string(&mut text))
        .map_err(Error::io("read", &path))?;
    // A guest that has just locked the file may not have written its pid yet: 0 = unknown.
    Ok(Some(text.trim().parse().unwrap_or(0)))
}

/// Removes a dead guest's pid file and socket. Call with the [`HostLock`] held and only after
/// [`live_guest`] said None.
pub(crate) fn remove_stale_files(dir: &DomainDir) -> Result<()> {
    for path in [dir.socket(), dir.pid_file()] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &path)(e)),
        }
    }
    Ok(())
}

/// Waits until no guest holds `dir` (bounded).
pub(crate) fn wait_gone(dir: &DomainDir, name: &str, pid: u32) -> Result<()> {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while live_guest(dir)?.is_some() {
        if Instant::now() > deadline {
            return Err(Error::DeviceModel {
                domain: name.to_owned(),
                message: format!("guest process {pid} did not exit within {EXIT_TIMEOUT:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Lets a started guest go: nobody waits for it, except a background thread that collects
/// its exit status whenever it exits, so that a long-lived process (a test, `domsnap demo`)
/// does not accumulate zombies. The thread never delays this process's exit.
pub(crate) fn detach(mut child: Child) {
    let reaper = std::thread::Builder::new()
        .name(format!("reap-guest-{}", child.id()))
        .stack_size(64 * 1024)
        .spawn(move || {
            let _ = child.wait();
        });
    // Without the thread the child is a zombie once it exits, until this process exits.
    drop(reaper);
}

/// Kills a guest that failed to start, with anything it started (its process group), and
/// collects it.
pub(crate) fn kill_failed_start(child: &mut Child) {
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory-safety preconditions; the child leads its own group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends SIGKILL to `pid`. Ok if it is already gone.
pub(crate) fn kill(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad pid"))?;
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        return Ok(());
    }
    Err(err)
}

/// Spawns `exe __sim-guest <state_dir> <name>` detached from the calling process: its own
/// process group, stdin from /dev/null, stdout and stderr appended to `guest.log`, never
/// waited for by the caller (so killing the caller never kills the domain).
pub(crate) fn spawn_guest(
    exe: &Path,
    state_dir: &Path,
    name: &str,
    dir: &DomainDir,
) -> Result<Child> {
    let log_path = dir.log();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(Error::io("open", &log_path))?;
    let log2 = log.try_clone().map_err(Error::io("dup", &log_path))?;
    let mut command = Command::new(exe);
    command
        .arg(GUEST_ARG)
        .arg(state_dir)
        .arg(name)
        .current_dir(&dir.path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    // SAFETY: the closure runs in the forked child, after its stdio is set up and before
    // exec; it makes one async-signal-safe system call and touches no memory of the parent.
    // Closing every other descriptor keeps the guest from holding the caller's pipes,
    // sockets or locks that were not opened close-on-exec (ENOSYS on old kernels: ignored).
    unsafe {
        command.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                0 as libc::c_uint,
            );
            Ok(())
        });
    }
    command.spawn().map_err(Error::io("spawn guest", exe))
}

/// Polls `ready` until it gives Some, the child exits, or `timeout` passes.
pub(crate) fn wait_ready<T>(
    child: &mut Child,
    name: &str,
    dir: &DomainDir,
    timeout: Duration,
    mut ready: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = ready() {
            return Ok(t);
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                return Err(Error::DeviceModel {
                    domain: name.to_owned(),
                    message: format!(
                        "guest process exited at start ({status}); {}",
                        log_tail(&dir.log())
                    ),
                });
            }
            Ok(None) => {}
            Err(e) => return Err(Error::io("wait for guest", &dir.path)(e)),
        }
        if Instant::now() > deadline {
            return Err(Error::DeviceModel {
                domain: name.to_owned(),
                message: format!(
                    "guest process {} did not answer within {timeout:?}; {}",
                    child.id(),
                    log_tail(&dir.log())
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last lines of a guest log, for error messages.
fn log_tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return format!("{} is empty", path.display());
    }
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("last lines of {}: {}", path.display(), tail.join(" | "))
}
