//! The real Xen host: libxenctrl for run state, pause and unpause; the `xl` toolstack for
//! names, configurations, save, restore, create and destroy; the device model's QMP socket for
//! internal snapshots of the disks of an active domain; the `disk` crate for the disks of a
//! shut-off one.
//!
//! What is true after a crash of domsnap at any point:
//! - during [`Host::save_memory`]: `xl save -p` sees a broken pipe, gives up and resumes the
//!   domain (it runs again, despite `-p`); if `xl` had finished, the domain is paused;
//! - during [`Host::restore_memory`]: `xl restore` reads a truncated stream, fails and leaves
//!   no domain behind;
//! - during [`Host::destroy`]: the domain is gone or going; its device model exits on its own.
//!
//! Files under `<state_dir>/xen/`: `domains/<name>.json` (last known configuration, see
//! [`config`]), `domains/<name>.cfg` (the xl configuration `start` boots from), `tmp/` (private
//! directories for the memory FIFOs, removed after each operation).

mod config;
mod disks;
mod domains;
mod external;
mod fifo;
mod qmp;
mod stream;
mod xc;
mod xl;

#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::{DomainInfo, Error, Host, Result, RunState};
use config::{Saved, Store};
use disks::Storage;
use domains::{Active, Known};
use fifo::StreamError;
use qmp::SnapshotOp;
use xc::Xc;
use xl::{ScratchFiles, Tools};

/// How long `xl` commands that do not move memory may take.
const XL_SHORT: Duration = Duration::from_secs(60);
/// How long `xl save`, `xl restore` and `xl create` may take.
const XL_LONG: Duration = Duration::from_secs(900);
/// How long one QMP step (connect, greeting, one command) may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a destroyed domain may take to leave the hypervisor.
const DOMAIN_GONE: Duration = Duration::from_secs(30);

/// A Xen host seen from dom0: see the module documentation.
#[derive(Debug)]
pub struct XenHost {
    xc: Xc,
    tools: Tools,
    store: Store,
    tmp: PathBuf,
    lvm: disk::lvm::Lvm,
    /// Domains seen by this process (see [`domains`]).
    known: Mutex<Known>,
    /// The last `lvm` report, until a volume changes.
    lvs: Mutex<Option<Vec<disk::lvm::Volume>>>,
}

impl XenHost {
    /// Opens the Xen host this process runs in (dom0, as root), keeping its files under
    /// `<state_dir>/xen/`.
    #[cfg(not(test))]
    pub fn open(state_dir: &Path) -> Result<XenHost> {
        Self::open_with(state_dir, Tools::system())
    }

    fn open_with(state_dir: &Path, tools: Tools) -> Result<XenHost> {
        let xc = Xc::open().map_err(|source| Error::Io {
            op: "open libxenctrl (needs dom0 and root)",
            path: PathBuf::from("/dev/xen/privcmd"),
            source,
        })?;
        let base = state_dir.join("xen");
        let store = Store::open(base.join("domains"))?;
        let tmp = base.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(Error::io("create directory", &tmp))?;
        let host = XenHost {
            xc,
            lvm: disk::lvm::Lvm::new(&tools.lvm),
            tools,
            store,
            tmp,
            known: Mutex::new(Known::default()),
            lvs: Mutex::new(None),
        };
        host.remove_stale_scratch();
        Ok(host)
    }

    /// Removes scratch directories left by processes that no longer run.
    fn remove_stale_scratch(&self) {
        let Ok(entries) = std::fs::read_dir(&self.tmp) else {
            return;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("domsnap-xl-"))
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !self.tools.proc_dir.join(pid.to_string()).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    fn require_active(&self, name: &str, operation: &'static str) -> Result<Active> {
        match self.active(name)? {
            Some(a) => Ok(a),
            None => {
                self.saved(name)?;
                Err(Error::WrongState {
                    domain: name.into(),
                    state: RunState::Shutoff,
                    operation,
                    needs: "running or paused",
                })
            }
        }
    }

    /// The state and configuration of `name` when it is shut off; waits for the device model of
    /// its last incarnation to be gone, so that its images may be opened.
    fn require_shutoff(&self, name: &str, operation: &'static str) -> Result<Saved> {
        if let Some(a) = self.active(name)? {
            return Err(Error::WrongState {
                domain: name.into(),
                state: a.info.run_state(),
                operation,
                needs: "shut off",
            });
        }
        let saved = self.saved(name)?;
        if let Some(domid) = saved.last_domid {
            self.tools.wait_device_models_gone(name, domid)?;
        }
        Ok(saved)
    }

    /// Internal snapshots of `disk` through the device model (one QMP session), creating or
    /// deleting `tag` on the way; the names as they were before.
    fn live_snapshots(
        &self,
        name: &str,
        active: &Active,
        target: &str,
        tag: &str,
        op: SnapshotOp,
    ) -> Result<Vec<String>> {
        let node = format!("{target}-qcow2");
        let socket = self.tools.qmp_socket(active.domid);
        let dm_err = |message: String| Error::DeviceModel {
            domain: name.into(),
            message,
        };
        qmp::node_snapshots(&socket, QMP_TIMEOUT, &node, tag, op)
            .map_err(|e| dm_err(e.to_string()))?
            .ok_or_else(|| dm_err(format!("no block node {node:?} in the device model")))
    }

    /// Unpauses `domid` until Xen no longer counts it paused (at most a few rounds).
    fn unpause_fully(&self, name: &str, domid: u32) -> Result<()> {
        for _ in 0..16 {
            match self.xc.domain(domid).map_err(xc_err(name, "getinfolist"))? {
                Some(d) if d.paused() => self.xc.unpause(domid).map_err(xc_err(name, "unpause"))?,
                _ => return Ok(()),
            }
        }
        Err(Error::DeviceModel {
            domain: name.into(),
            message: "still paused after 16 unpause calls".into(),
        })
    }

    /// After a failed save: the domain must still exist (paused or running).
    fn check_survived_save(&self, domid: u32) -> String {
        match self.xc.domain(domid) {
            Ok(Some(d)) => format!("domain left {}", d.run_state()),
            Ok(None) => "domain is gone".into(),
            Err(e) => format!("domain state unknown: {e}"),
        }
    }

    /// After a failed restore: no half-built domain may stay.
    fn remove_partial(&self, name: &str) {
        if let Ok(Some(a)) = self.active(name) {
            let _ = self.tools.run(&["destroy", &a.domid.to_string()], XL_SHORT);
            let _ = self.tools.wait_device_models_gone(name, a.domid);
        }
    }
}

/// Runs one QMP command on the device model of domain `domid` and returns its answer (for
/// diagnosing a host by hand: `xenhost-smoke`).
#[doc(hidden)]
pub fn qmp_command(
    domid: u32,
    command: &str,
    arguments: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    #[cfg(not(test))]
    let socket = Tools::system().qmp_socket(domid);
    #[cfg(test)]
    let socket = PathBuf::from(format!("/run/xen/qmp-libxl-{domid}"));
    qmp::run(&socket, QMP_TIMEOUT, &[(command, arguments)])
        .map(|mut v| v.pop().unwrap_or_default())
        .map_err(|e| Error::DeviceModel {
            domain: format!("domain id {domid}"),
            message: e.to_string(),
        })
}

fn xc_err(name: &str, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let message = format!("libxenctrl {what}");
    let domain = name.to_string();
    move |e| Error::DeviceModel {
        domain,
        message: format!("{message}: {e}"),
    }
}

impl Host for XenHost {
    fn kind(&self) -> &'static str {
        "xen"
    }

    fn domains(&self) -> Result<Vec<DomainInfo>> {
        self.all_domains()
    }

    fn domain(&self, name: &str) -> Result<DomainInfo> {
        match self.active(name)? {
            Some(a) => Ok(self.info(name, a.info.run_state(), Some(a.domid), &a.config)),
            None => Ok(self.info(name, RunState::Shutoff, None, &self.saved(name)?.config)),
        }
    }

    fn pause(&self, name: &str) -> Result<()> {
        let a = self.require_active(name, "pause")?;
        if a.info.paused() {
            return Ok(()); // Xen counts pauses: pausing twice would need two unpauses
        }
        self.xc.pause(a.domid).map_err(xc_err(name, "pause"))
    }

    fn unpause(&self, name: &str) -> Result<()> {
        let a = self.require_active(name, "unpause")?;
        self.unpause_fully(name, a.domid)
    }

    fn save_memory(&self, name: &str, sink: &mut dyn Write) -> Result<u64> {
        let a = self.require_active(name, "save memory")?;
        // A paused PV guest cannot answer the suspend request that `xl save` sends it (libxl
        // gives up after 60 s: "guest didn't acknowledge suspend"): let it run; `xl save -p`
        // suspends it and leaves it paused.
        if a.info.paused() {
            self.unpause_fully(name, a.domid)?;
        }
        self.tools.wait_guest_can_suspend(a.domid);
        let scratch = ScratchFiles::new_in(&self.tmp)?;
        let pipe = scratch.dir.join("memory");
        fifo::make(&pipe).map_err(Error::io("mkfifo", &pipe))?;
        let domid = a.domid.to_string();
        let pipe_arg = pipe.to_string_lossy().into_owned();
        let args = ["save", "-p", domid.as_str(), pipe_arg.as_str()];
        let mut child = self.tools.spawn(&args, &scratch)?;
        let streamed = fifo::drain(&pipe, &mut child, sink);
        // The pipe is closed now: on a failed sink `xl` sees a broken pipe and resumes the domain.
        let status = xl::wait_bounded(&mut child, XL_LONG, "xl save")?;
        let (_, stderr) = scratch.read();
        match streamed {
            Ok(n) if status.success() => Ok(n),
            Ok(_) | Err(StreamError::NotOpened) => Err(xl::toolstack(
                &args,
                status,
                &format!("{}\n({})", stderr.trim(), self.check_survived_save(a.domid)),
            )),
            Err(StreamError::Caller(source)) => {
                let _ = self.check_survived_save(a.domid);
                Err(Error::Stream {
                    domain: name.into(),
                    source,
                })
            }
            Err(StreamError::Pipe(source)) => Err(Error::Io {
                op: "read memory stream from",
                path: pipe,
                source,
            }),
        }
    }

    fn destroy(&self, name: &str) -> Result<()> {
        let Some(a) = self.active(name)? else {
            let saved = self.saved(name)?;
            if let Some(domid) = saved.last_domid {
                self.tools.wait_device_models_gone(name, domid)?;
            }
            return Ok(());
        };
        self.tools
            .run(&["destroy", &a.domid.to_string()], XL_SHORT)?;
        let start = std::time::Instant::now();
        while self
            .xc
            .domain(a.domid)
            .map_err(xc_err(name, "getinfolist"))?
            .is_some()
        {
            if start.elapsed() > DOMAIN_GONE {
                return Err(Error::DeviceModel {
                    domain: name.into(),
                    message: format!("domain id {} still exists after xl destroy", a.domid),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.tools.wait_device_models_gone(name, a.domid)
    }

    fn restore_memory(&self, name: &str, source: &mut dyn Read) -> Result<()> {
        let saved = self.require_shutoff(name, "restore memory")?;
        // The disks as they are now, not as libxl knew them when it saved (see `stream`).
        let disks = config::disks(&saved.config)
            .into_iter()
            .map(|d| (d.info.target, d.info.path))
            .collect();
        let stream_err = |source| Error::Stream {
            domain: name.into(),
            source,
        };
        let (mut source, _) = stream::with_disks(source, &disks).map_err(stream_err)?;
        let scratch = ScratchFiles::new_in(&self.tmp)?;
        let pipe = scratch.dir.join("memory");
        fifo::make(&pipe).map_err(Error::io("mkfifo", &pipe))?;
        let pipe_arg = pipe.to_string_lossy().into_owned();
        let args = ["restore", "-p", pipe_arg.as_str()];
        let mut child = self.tools.spawn(&args, &scratch)?;
        let fed = fifo::feed(&pipe, &mut child, &mut *source);
        let status = xl::wait_bounded(&mut child, XL_LONG, "xl restore")?;
        let (_, stderr) = scratch.read();
        let result = match fed {
            Ok(_) if status.success() => match self.adopt_new(name)? {
                Some(_) => return Ok(()),
                None => Err(Error::Toolstack {
                    command: args.join(" "),
                    status: status.to_string(),
                    stderr: format!("no domain {name:?} after restore; {}", stderr.trim()),
                }),
            },
            Err(StreamError::Caller(source)) => Err(Error::Stream {
                domain: name.into(),
                source,
            }),
            Ok(_) | Err(StreamError::NotOpened) | Err(StreamError::Pipe(_)) => {
                Err(xl::toolstack(&args, status, &stderr))
            }
        };
        self.remove_partial(name);
        result
    }

    fn start(&self, name: &str, paused: bool) -> Result<()> {
        let saved = self.require_shutoff(name, "start")?;
        let cfg = self.store.write_xl_cfg(&saved)?;
        let cfg = cfg.to_string_lossy().into_owned();
        let mut args = vec!["create"];
        if paused {
            args.push("-p");
        }
        args.push(&cfg);
        let scratch = ScratchFiles::new_in(&self.tmp)?;
        let mut child = self.tools.spawn(&args, &scratch)?;
        let status = xl::wait_bounded(&mut child, XL_LONG, "xl create")?;
        if !status.success() {
            self.remove_partial(name);
            return Err(xl::toolstack(&args, status, &scratch.read().1));
        }
        match self.adopt_new(name)? {
            Some(_) => Ok(()),
            None => Err(Error::Toolstack {
                command: args.join(" "),
                status: status.to_string(),
                stderr: format!("no domain {name:?} after xl create"),
            }),
        }
    }

    fn disk_snapshots(&self, name: &str, target: &str) -> Result<Vec<String>> {
        match self.active(name)? {
            Some(a) => match self.storage(name, &a.config, target)? {
                Storage::Qcow2(_) => self.live_snapshots(name, &a, target, "", SnapshotOp::List),
                s => self.offline(&s, false, |b| b.snapshots()),
            },
            None => {
                let saved = self.saved(name)?;
                let s = self.storage(name, &saved.config, target)?;
                self.offline(&s, false, |b| b.snapshots())
            }
        }
    }

    fn create_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        self.change_disk_snapshot(name, target, tag, SnapshotOp::Create)
    }

    fn delete_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        self.change_disk_snapshot(name, target, tag, SnapshotOp::Delete)
    }

    /// Also waits for the device model of the domain's last incarnation to exit.
    fn shut_off_disk(&self, name: &str, target: &str, operation: &'static str) -> Result<PathBuf> {
        let saved = self.require_shutoff(name, operation)?;
        match self.storage(name, &saved.config, target)? {
            Storage::Qcow2(path) => Ok(path),
            Storage::Thin(path, _) => Err(Error::Invalid(format!(
                "disk {target} of domain {name:?} ({}) is an LVM thin volume: there is no \
                 image to {operation}",
                path.display()
            ))),
        }
    }

    fn check_disk(&self, name: &str, target: &str) -> Result<disk::CheckReport> {
        let saved = self.require_shutoff(name, "check a disk")?;
        match self.storage(name, &saved.config, target)? {
            Storage::Qcow2(path) => disk::check(&path).map_err(disks::disk_err(&path)),
            // No image structure to check: LVM keeps the volume's metadata.
            Storage::Thin(..) => Ok(disk::CheckReport::default()),
        }
    }

    fn repair_disk(&self, name: &str, target: &str) -> Result<disk::CheckReport> {
        let saved = self.require_shutoff(name, "repair a disk")?;
        match self.storage(name, &saved.config, target)? {
            Storage::Qcow2(path) => disk::repair_leaks(&path).map_err(disks::disk_err(&path)),
            Storage::Thin(..) => Ok(disk::CheckReport::default()),
        }
    }

    fn create_external_snapshot(&self, name: &str, target: &str, overlay: &Path) -> Result<()> {
        self.external_snapshot(name, target, overlay)
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
        self.remove_image_of(name, target, image)
    }

    fn apply_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        let saved = self.require_shutoff(name, "apply a disk snapshot")?;
        let storage = self.storage(name, &saved.config, target)?;
        let has = self.offline(&storage, false, |b| b.snapshots())?;
        if !has.iter().any(|t| t == tag) {
            return Err(Error::NoSuchDiskSnapshot {
                domain: name.into(),
                target: target.into(),
                tag: tag.into(),
            });
        }
        self.offline(&storage, true, |b| b.apply_snapshot(tag))
    }
}

impl XenHost {
    /// Creates or deletes snapshot `tag` of disk `target` (idempotent): through the device
    /// model for the qcow2 image of an active domain, through the backend otherwise.
    fn change_disk_snapshot(
        &self,
        name: &str,
        target: &str,
        tag: &str,
        op: SnapshotOp,
    ) -> Result<()> {
        let storage = match self.active(name)? {
            Some(a) => match self.storage(name, &a.config, target)? {
                Storage::Qcow2(_) => {
                    self.live_snapshots(name, &a, target, tag, op)?;
                    return Ok(());
                }
                s => s,
            },
            None => {
                let operation = match op {
                    SnapshotOp::Delete => "delete a disk snapshot",
                    _ => "snapshot a disk",
                };
                let saved = self.require_shutoff(name, operation)?;
                self.storage(name, &saved.config, target)?
            }
        };
        match op {
            SnapshotOp::Create => self.offline(&storage, true, |b| b.create_snapshot(tag)),
            SnapshotOp::Delete => self.offline(&storage, true, |b| b.delete_snapshot(tag)),
            SnapshotOp::List => Ok(()),
        }
    }
}
