//! Which domains exist and which of them run, with as few toolstack calls as possible.
//!
//! `xl list -l` (every active domain with its libxl configuration) costs from 0.2 s to
//! several seconds under load: XenHost runs it once per process, and again only when the
//! hypervisor shows an active domain that neither that listing nor this process created
//! (someone ran `xl create` meanwhile). Everything else comes from libxenctrl, which lists
//! every domain with its handle (the UUID of its configuration) in one hypercall: a domain's
//! current domain id is found by its UUID, so a domain that domsnap restored or started keeps
//! being found without listing again.
//!
//! The configuration kept in the store (see [`super::config`]) is the truth for a domain that
//! domsnap has seen: the listing replaces it only for an incarnation domsnap did not know (a
//! different domain id than the one recorded), so paths that domsnap changed while the domain
//! ran (external snapshots) are not undone by libxl's older view.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use super::config::{self, Saved};
use super::xc::XcDomain;
use super::{xc_err, xl, XenHost, XL_SHORT};
use crate::{DiskInfo, DiskKind, DomainInfo, Error, Result, RunState};

/// What this process knows about the hypervisor's domains.
#[derive(Debug, Default)]
pub(crate) struct Known {
    /// The domain ids of the last `xl list -l`; None before the first.
    listed: Option<BTreeSet<u32>>,
    /// Domain ids of the domains this process created (start, restore).
    ours: BTreeSet<u32>,
    /// How many times `xl list -l` ran (tests count them).
    pub listings: u32,
}

/// An active domain.
#[derive(Debug, Clone)]
pub(crate) struct Active {
    pub domid: u32,
    pub info: XcDomain,
    pub config: Value,
}

impl XenHost {
    /// Every domain of the hypervisor, after bringing the store up to date with a listing
    /// when one is due (see the module documentation).
    pub(crate) fn sync(&self) -> Result<Vec<XcDomain>> {
        let hv = self.xc.domains().map_err(|e| Error::DeviceModel {
            domain: "*".into(),
            message: format!("libxenctrl getinfolist: {e}"),
        })?;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let stale = match &known.listed {
            None => true,
            Some(listed) => hv.iter().any(|d| {
                d.domid != 0
                    && d.run_state().is_active()
                    && !listed.contains(&d.domid)
                    && !known.ours.contains(&d.domid)
            }),
        };
        if stale {
            let listed = self.list_xl()?;
            known.listings += 1;
            for l in &listed {
                if config::check_name(&l.name).is_err() {
                    continue;
                }
                match self.store.load(&l.name)? {
                    Some(saved) if saved.last_domid == Some(l.domid) => {}
                    _ => self
                        .store
                        .save(&Saved::new(&l.name, l.domid, l.config.clone()))?,
                }
            }
            known.listed = Some(listed.iter().map(|l| l.domid).collect());
        }
        Ok(hv)
    }

    /// `xl list -l`: every active domain (not Domain-0) with its configuration.
    fn list_xl(&self) -> Result<Vec<config::Listed>> {
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

    /// The active incarnation of `saved` among `hv`, by UUID (by domain id for a
    /// configuration without one).
    fn incarnation(saved: &Saved, hv: &[XcDomain]) -> Option<XcDomain> {
        let live = |d: &&XcDomain| d.run_state().is_active();
        match config::uuid(&saved.config) {
            Some(uuid) => hv.iter().filter(live).find(|d| d.handle == uuid).copied(),
            None => saved
                .last_domid
                .and_then(|id| hv.iter().filter(live).find(|d| d.domid == id).copied()),
        }
    }

    /// The active domain `name`, if it is.
    pub(crate) fn active(&self, name: &str) -> Result<Option<Active>> {
        config::check_name(name)?;
        let hv = self.sync()?;
        let Some(mut saved) = self.store.load(name)? else {
            return Ok(None);
        };
        let Some(info) = Self::incarnation(&saved, &hv) else {
            return Ok(None);
        };
        if saved.last_domid != Some(info.domid) {
            // An incarnation this process made (listed ones are adopted by `sync`).
            saved.last_domid = Some(info.domid);
            self.store.save(&saved)?;
        }
        if saved.switch.is_some() {
            saved = self.settle(saved, info.domid)?;
        }
        Ok(Some(Active {
            domid: info.domid,
            info,
            config: saved.config,
        }))
    }

    /// After `xl create` or `xl restore` of `name`: records the new incarnation as this
    /// process's own (no listing needed to know it) and returns it.
    pub(crate) fn adopt_new(&self, name: &str) -> Result<Option<Active>> {
        let saved = self.saved(name)?;
        let hv = self.xc.domains().map_err(xc_err(name, "getinfolist"))?;
        if let Some(d) = Self::incarnation(&saved, &hv) {
            self.known
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .ours
                .insert(d.domid);
        }
        self.active(name)
    }

    /// How many times `xl list -l` ran in this process.
    #[cfg(test)]
    pub(crate) fn listings(&self) -> u32 {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .listings
    }

    /// The stored record of `name`; [`Error::NoSuchDomain`] if there is none.
    pub(crate) fn saved(&self, name: &str) -> Result<Saved> {
        self.store
            .load(name)?
            .ok_or_else(|| Error::NoSuchDomain(name.into()))
    }

    /// What a caller sees of a domain in `state` with configuration `config`; `domid`
    /// while it runs (its instance: a new boot has a new domid).
    pub(crate) fn info(
        &self,
        name: &str,
        state: RunState,
        domid: Option<u32>,
        config: &Value,
    ) -> DomainInfo {
        DomainInfo {
            name: name.into(),
            state,
            instance: domid.map(u64::from),
            memory_bytes: config::memory_bytes(config),
            memory_path: None,
            disks: config::disks(config)
                .into_iter()
                .map(|d| DiskInfo {
                    kind: self.classify(&d),
                    ..d.info
                })
                .collect(),
        }
    }

    /// Every domain: the active ones and those the store remembers.
    pub(crate) fn all_domains(&self) -> Result<Vec<DomainInfo>> {
        let hv = self.sync()?;
        let mut out = Vec::new();
        for name in self.store.names()? {
            let Some(saved) = self.store.load(&name)? else {
                continue;
            };
            let live = Self::incarnation(&saved, &hv);
            let state = live.map(|d| d.run_state()).unwrap_or(RunState::Shutoff);
            out.push(self.info(&name, state, live.map(|d| d.domid), &saved.config));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// How a disk of the configuration is stored (see [`DiskKind`]).
    pub(crate) fn classify(&self, d: &config::ConfigDisk) -> DiskKind {
        let unsupported = |reason: String| DiskKind::Unsupported { reason };
        if let Some(script) = &d.script {
            return unsupported(format!(
                "reached through the hotplug script {script:?}: storage domsnap does not know"
            ));
        }
        let path = &d.info.path;
        match d.info.format.as_str() {
            "qcow2" => match d.backend.as_str() {
                "qdisk" | "unknown" | "" => DiskKind::Qcow2,
                other => unsupported(format!(
                    "a qcow2 image on the {other} backend: domsnap snapshots qcow2 images \
                     served by QEMU's qdisk backend"
                )),
            },
            "raw" | "unknown" | "" => self.classify_raw(path),
            other => unsupported(format!(
                "a {other} image: domsnap snapshots qcow2 images and LVM thin volumes"
            )),
        }
    }

    fn classify_raw(&self, path: &Path) -> DiskKind {
        use std::os::unix::fs::FileTypeExt;
        let unsupported = |reason: String| DiskKind::Unsupported { reason };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => return unsupported(format!("not readable ({e})")),
        };
        if meta.is_file() {
            return unsupported(
                "a raw image file: raw files have no snapshots; convert it to qcow2 \
                 (qemu-img convert -O qcow2) or move it to an LVM thin volume"
                    .into(),
            );
        }
        if !meta.file_type().is_block_device() {
            return unsupported("neither an image file nor a block device".into());
        }
        match self.volume_of(path) {
            Ok(Some(v)) if v.is_thin() => DiskKind::LvmThin,
            Ok(Some(v)) => unsupported(format!(
                "the thick LVM volume {} (lv_attr {}): only thin volumes have instant \
                 snapshots that stay valid; move it to a thin pool",
                v.full_name(),
                v.attr
            )),
            Ok(None) => unsupported(
                "a block device that is not an LVM volume: domsnap snapshots LVM thin volumes"
                    .into(),
            ),
            Err(e) => unsupported(format!("a block device LVM could not describe ({e})")),
        }
    }
}
