//! Running the `xl` toolstack command, and finding device model processes.
//!
//! Where the toolstack lives is a [`Tools`] value: the real one in production, a fake `xl`
//! script and scratch directories in unit tests.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Where XenHost finds the toolstack and the device models.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    /// The `xl` program.
    pub xl: PathBuf,
    /// Directory of the device models' QMP sockets (`qmp-libxl-DOMID`).
    pub qmp_dir: PathBuf,
    /// procfs, to find device model processes.
    pub proc_dir: PathBuf,
    /// How long a device model may take to exit after its domain is destroyed.
    pub dm_exit: Duration,
    /// The `xenstore-read` program.
    pub xenstore_read: PathBuf,
    /// How long to wait for a guest to announce it can suspend (see
    /// [`Tools::wait_guest_can_suspend`]).
    pub guest_ready: Duration,
    /// The `lvm` program (LVM thin volumes).
    pub lvm: PathBuf,
}

impl Tools {
    /// The toolstack of this host.
    #[cfg(not(test))]
    pub fn system() -> Tools {
        Tools {
            xl: PathBuf::from("xl"),
            qmp_dir: PathBuf::from("/run/xen"),
            proc_dir: PathBuf::from("/proc"),
            dm_exit: Duration::from_secs(30),
            xenstore_read: PathBuf::from("xenstore-read"),
            guest_ready: Duration::from_secs(60),
            lvm: PathBuf::from("lvm"),
        }
    }

    /// The QMP socket of domain `domid`'s device model.
    pub fn qmp_socket(&self, domid: u32) -> PathBuf {
        self.qmp_dir.join(format!("qmp-libxl-{domid}"))
    }

    /// A command line for `xl ARGS`, for error messages.
    fn line(args: &[&str]) -> String {
        format!("xl {}", args.join(" "))
    }

    /// Runs `xl ARGS` to completion (at most `limit`) and returns its stdout.
    pub fn run(&self, args: &[&str], limit: Duration) -> Result<String> {
        let (status, stdout, stderr) = self.run_status(args, limit)?;
        if !status.success() {
            return Err(toolstack(args, status, &stderr));
        }
        Ok(stdout)
    }

    /// Runs `xl ARGS` to completion (at most `limit`): exit status, stdout, stderr.
    pub fn run_status(
        &self,
        args: &[&str],
        limit: Duration,
    ) -> Result<(ExitStatus, String, String)> {
        let out_dir = ScratchFiles::new()?;
        let mut child = self.spawn(args, &out_dir)?;
        let status = wait_bounded(&mut child, limit, &Self::line(args))?;
        let (stdout, stderr) = out_dir.read();
        Ok((status, stdout, stderr))
    }

    /// Starts `xl ARGS` with stdout and stderr going to files (xl's background monitor
    /// process keeps inherited descriptors; files, unlike pipes, do not make us wait for it).
    pub fn spawn(&self, args: &[&str], out: &ScratchFiles) -> Result<Child> {
        let stdout = File::create(&out.stdout).map_err(Error::io("create", &out.stdout))?;
        let stderr = File::create(&out.stderr).map_err(Error::io("create", &out.stderr))?;
        Command::new(&self.xl)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(Error::io("run", &self.xl))
    }

    /// Waits (at most `guest_ready`) until the guest of `domid` has written "1" into
    /// `control/feature-suspend` (libxl creates the node empty; Linux fills it once its Xen
    /// drivers are up). A guest saved before that cannot answer the suspend request (`xl save`
    /// fails with "Bad mfn 0 for p2m frame list" right after boot). Returns whether it did;
    /// guests that never fill the node cost one wait.
    pub fn wait_guest_can_suspend(&self, domid: u32) -> bool {
        let key = format!("/local/domain/{domid}/control/feature-suspend");
        let start = Instant::now();
        loop {
            let read = Command::new(&self.xenstore_read)
                .arg(&key)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            match read {
                Ok(out) if out.status.success() && out.stdout.trim_ascii() == b"1" => return true,
                Err(_) => return false, // no xenstore-read here: let xl try
                Ok(_) if start.elapsed() > self.guest_ready => return false,
                Ok(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// Pids of the device model processes (`... -xen-domid DOMID ...`) of domain `domid`.
    pub fn device_models(&self, domid: u32) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(&self.proc_dir) else {
            return Vec::new();
        };
        let id = domid.to_string();
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmdline = fs::read(e.path().join("cmdline")).ok()?;
                let mut args = cmdline.split(|&b| b == 0);
                let found = args.any(|a| a == b"-xen-domid") && args.next() == Some(id.as_bytes());
                found.then_some(pid)
            })
            .collect()
    }

    /// Waits (at most `dm_exit`) until no device model of domain `domid` runs.
    pub fn wait_device_models_gone(&self, domain: &str, domid: u32) -> Result<()> {
        let limit = self.dm_exit;
        let start = Instant::now();
        loop {
            let pids = self.device_models(domid);
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(Error::DeviceModel {
                    domain: domain.into(),
                    message: format!(
                        "device model (pid {pids:?}) of domain id {domid} still running {limit:?} after destroy"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The failure of `xl ARGS`.
pub(crate) fn toolstack(args: &[&str], status: ExitStatus, stderr: &str) -> Error {
    Error::Toolstack {
        command: Tools::line(args),
        status: status.to_string(),
        stderr: stderr.trim().to_string(),
    }
}

/// Waits for `child` at most `limit`; kills it after that.
pub(crate) fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> Result<ExitStatus> {
    let start = Instant::now();
    let mut nap = Duration::from_millis(5);
    loop {
        if let Some(status) = child.try_wait().map_err(Error::io("wait for", what))? {
            return Ok(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Toolstack {
                command: what.into(),
                status: format!("killed after {limit:?}"),
                stderr: String::new(),
            });
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(100));
    }
}

/// A private directory (mode 0700) for the FIFO and output files of one `xl` run, removed when
/// dropped.
#[derive(Debug)]
pub(crate) struct ScratchFiles {
    pub dir: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl ScratchFiles {
    /// A fresh directory under the system temporary directory.
    pub fn new() -> Result<ScratchFiles> {
        Self::new_in(&std::env::temp_dir())
    }

    /// A fresh directory under `base`.
    pub fn new_in(base: &Path) -> Result<ScratchFiles> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(base).map_err(Error::io("create directory", base))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for _ in 0..100 {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("domsnap-xl-{}-{n}-{nanos}", std::process::id()));
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    return Ok(ScratchFiles {
                        stdout: dir.join("stdout"),
                        stderr: dir.join("stderr"),
                        dir,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("create directory", &dir)(e)),
            }
        }
        Err(Error::Invalid(format!(
            "cannot make a scratch directory in {}",
            base.display()
        )))
    }

    /// What the command wrote (lossy UTF-8; empty if unreadable).
    pub fn read(&self) -> (String, String) {
        let r = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
        (r(&self.stdout), r(&self.stderr))
    }
}

impl Drop for ScratchFiles {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
