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
mod fifo;
mod offline;
mod qmp;
mod xc;
mod xl;

#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::{DiskInfo, DomainInfo, Error, Host, Result, RunState};
use config::{Saved, Store};
use fifo::StreamError;
use qmp::SnapshotOp;
use xc::{Xc, XcDomain};
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
}

/// An active domain.
#[derive(Debug, Clone)]
struct Active {
    domid: u32,
    info: XcDomain,
    config: Value,
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
            tools,
            store,
            tmp,
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

    /// Every active domain (not Domain-0) with its configuration.
    fn listed(&self) -> Result<Vec<config::Listed>> {
        // `xl list -l` exits 1 when one domain's configuration cannot be read (e.g. one being
        // built or torn down right now) but still prints the others.
        let (status, out, stderr) = self.tools.run_status(&["list", "-l"], XL_SHORT)?;
        if out.trim().is_empty() {
            return match status.success() {
                true => Ok(Vec::new()),
                false => Err(xl::toolstack(&["list", "-l"], status, &stderr)),
            };
        }
        config::parse_list(&out)
    }

    /// The active domain `name`, if it is, with its configuration recorded in the store.
    fn active(&self, name: &str) -> Result<Option<Active>> {
        config::check_name(name)?;
        let Some(listed) = self.listed()?.into_iter().find(|l| l.name == name) else {
            return Ok(None);
        };
        let Some(info) = self
            .xc
            .domain(listed.domid)
            .map_err(xc_err(name, "getinfolist"))?
        else {
            return Ok(None);
        };
        if info.run_state() == RunState::Shutoff {
            return Ok(None);
        }
        self.store
            .save(&Saved::new(name, listed.domid, listed.config.clone()))?;
        Ok(Some(Active {
            domid: listed.domid,
            info,
            config: listed.config,
        }))
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

    /// The stored record of `name`; [`Error::NoSuchDomain`] if there is none.
    fn saved(&self, name: &str) -> Result<Saved> {
        self.store
            .load(name)?
            .ok_or_else(|| Error::NoSuchDomain(name.into()))
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

    fn info(name: &str, state: RunState, domid: Option<u32>, config: &Value) -> DomainInfo {
        DomainInfo {
            name: name.into(),
            state,
            instance: domid.map(u64::from),
            memory_bytes: config::memory_bytes(config),
            memory_path: None,
            disks: config::disks(config),
        }
    }

    fn disk_of(name: &str, config: &Value, target: &str) -> Result<DiskInfo> {
        let disk = config::disks(config)
            .into_iter()
            .find(|d| d.target == target)
            .ok_or_else(|| Error::NoSuchDisk {
                domain: name.into(),
                target: target.into(),
            })?;
        if disk.format != "qcow2" {
            return Err(Error::Invalid(format!(
                "disk {target} of domain {name:?} is {}; snapshots need qcow2",
                disk.format
            )));
        }
        Ok(disk)
    }

    /// Internal snapshots of `disk` through the device model (one QMP session), creating or
    /// deleting `tag` on the way; the names as they were before.
    fn live_snapshots(
        &self,
        name: &str,
        active: &Active,
        disk: &DiskInfo,
        tag: &str,
        op: SnapshotOp,
    ) -> Result<Vec<String>> {
        let node = format!("{}-qcow2", disk.target);
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
        let mut out = Vec::new();
        let listed = self.listed()?;
        for l in &listed {
            if config::check_name(&l.name).is_err() {
                continue;
            }
            let state = match self
                .xc
                .domain(l.domid)
                .map_err(xc_err(&l.name, "getinfolist"))?
            {
                Some(d) => d.run_state(),
                None => continue,
            };
            if state.is_active() {
                self.store
                    .save(&Saved::new(&l.name, l.domid, l.config.clone()))?;
            }
            out.push(Self::info(&l.name, state, Some(l.domid), &l.config));
        }
        for name in self.store.names()? {
            if out.iter().any(|d| d.name == name) {
                continue;
            }
            if let Some(saved) = self.store.load(&name)? {
                out.push(Self::info(&name, RunState::Shutoff, None, &saved.config));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn domain(&self, name: &str) -> Result<DomainInfo> {
        match self.active(name)? {
            Some(a) => Ok(Self::info(
                name,
                a.info.run_state(),
                Some(a.domid),
                &a.config,
            )),
            None => Ok(Self::info(
                name,
                RunState::Shutoff,
                None,
                &self.saved(name)?.config,
            )),
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
        self.require_shutoff(name, "restore memory")?;
        let scratch = ScratchFiles::new_in(&self.tmp)?;
        let pipe = scratch.dir.join("memory");
        fifo::make(&pipe).map_err(Error::io("mkfifo", &pipe))?;
        let pipe_arg = pipe.to_string_lossy().into_owned();
        let args = ["restore", "-p", pipe_arg.as_str()];
        let mut child = self.tools.spawn(&args, &scratch)?;
        let fed = fifo::feed(&pipe, &mut child, source);
        let status = xl::wait_bounded(&mut child, XL_LONG, "xl restore")?;
        let (_, stderr) = scratch.read();
        let result = match fed {
            Ok(_) if status.success() => match self.active(name)? {
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
        self.require_active(name, "start").map(|_| ())
    }

    fn disk_snapshots(&self, name: &str, target: &str) -> Result<Vec<String>> {
        match self.active(name)? {
            Some(a) => {
                let disk = Self::disk_of(name, &a.config, target)?;
                self.live_snapshots(name, &a, &disk, "", SnapshotOp::List)
            }
            None => {
                let saved = self.saved(name)?;
                let disk = Self::disk_of(name, &saved.config, target)?;
                offline::list(&disk.path)
            }
        }
    }

    fn create_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        match self.active(name)? {
            Some(a) => {
                let disk = Self::disk_of(name, &a.config, target)?;
                self.live_snapshots(name, &a, &disk, tag, SnapshotOp::Create)?;
                Ok(())
            }
            None => {
                let saved = self.require_shutoff(name, "snapshot a disk")?;
                let disk = Self::disk_of(name, &saved.config, target)?;
                if offline::list(&disk.path)?.iter().any(|t| t == tag) {
                    return Ok(());
                }
                offline::create(&disk.path, tag)
            }
        }
    }

    fn delete_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        match self.active(name)? {
            Some(a) => {
                let disk = Self::disk_of(name, &a.config, target)?;
                self.live_snapshots(name, &a, &disk, tag, SnapshotOp::Delete)?;
                Ok(())
            }
            None => {
                let saved = self.require_shutoff(name, "delete a disk snapshot")?;
                let disk = Self::disk_of(name, &saved.config, target)?;
                if !offline::list(&disk.path)?.iter().any(|t| t == tag) {
                    return Ok(());
                }
                offline::delete(&disk.path, tag)
            }
        }
    }

    /// Also waits for the device model of the domain's last incarnation to exit.
    fn shut_off_disk(&self, name: &str, target: &str, operation: &'static str) -> Result<PathBuf> {
        let saved = self.require_shutoff(name, operation)?;
        Ok(Self::disk_of(name, &saved.config, target)?.path)
    }

    fn apply_disk_snapshot(&self, name: &str, target: &str, tag: &str) -> Result<()> {
        let saved = self.require_shutoff(name, "apply a disk snapshot")?;
        let disk = Self::disk_of(name, &saved.config, target)?;
        if !offline::list(&disk.path)?.iter().any(|t| t == tag) {
            return Err(Error::NoSuchDiskSnapshot {
                domain: name.into(),
                target: target.into(),
                tag: tag.into(),
            });
        }
        offline::apply(&disk.path, tag)
    }
}
