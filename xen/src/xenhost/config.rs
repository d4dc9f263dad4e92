//! What XenHost remembers about a domain: the libxl configuration that `xl list -l` prints,
//! kept in `<state_dir>/xen/domains/<name>.json` so that a shut-off or destroyed domain's
//! disks, memory size and boot configuration stay known.
//!
//! File layout (JSON, written to a temporary file, synced, renamed, directory synced):
//! `{"magic": "domsnap-xen-domain", "version": 1, "name": .., "last_domid": .., "config": <libxl
//! domain config as `xl list -l` prints it, with the disk images domsnap moved them to>,
//! "switch": <a disk switch to an overlay in progress, if any>}`. The xl configuration file that `start` boots
//! from is generated from `config` ([`render_xl_cfg`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{DiskInfo, DiskKind, Error, Result};

const MAGIC: &str = "domsnap-xen-domain";
const VERSION: u32 = 1;

/// One domain as `xl list -l` describes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Listed {
    pub domid: u32,
    pub name: String,
    pub config: Value,
}

/// Parses the output of `xl list -l` (a JSON array of `{"domid": N, "config": {...}}`).
/// Domain-0 and entries without a name are left out.
pub(crate) fn parse_list(json: &str) -> Result<Vec<Listed>> {
    let v: Value = serde_json::from_str(json)
        .map_err(|e| Error::Invalid(format!("cannot parse `xl list -l` output: {e}")))?;
    let items = v
        .as_array()
        .ok_or_else(|| Error::Invalid("`xl list -l` did not print a JSON array".into()))?;
    let mut out = Vec::new();
    for item in items {
        let Some(domid) = item.get("domid").and_then(Value::as_u64) else {
            continue;
        };
        let config = item.get("config").cloned().unwrap_or(Value::Null);
        let Some(name) = config.pointer("/c_info/name").and_then(Value::as_str) else {
            continue;
        };
        if domid == 0 {
            continue;
        }
        let domid = u32::try_from(domid)
            .map_err(|_| Error::Invalid(format!("domain id {domid} out of range")))?;
        out.push(Listed {
            domid,
            name: name.to_string(),
            config,
        });
    }
    Ok(out)
}

/// The domain's memory size in bytes (target memory).
pub(crate) fn memory_bytes(config: &Value) -> u64 {
    let b = |k: &str| {
        config
            .pointer(&format!("/b_info/{k}"))
            .and_then(Value::as_u64)
    };
    b("target_memkb").or_else(|| b("max_memkb")).unwrap_or(0) * 1024
}

/// One disk of a libxl configuration, with what decides how it is stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConfigDisk {
    /// Target, path and format (its `kind` still to be decided by the host).
    pub info: DiskInfo,
    /// `backend`: `qdisk`, `phy`, `tap`, … (`unknown` when libxl chose none yet).
    pub backend: String,
    /// A hotplug script reaching the storage (iSCSI, DRBD, …), if any.
    pub script: Option<String>,
}

/// The domain's disks (cdroms left out), in configuration order.
pub(crate) fn disks(config: &Value) -> Vec<ConfigDisk> {
    let Some(list) = config.get("disks").and_then(Value::as_array) else {
        return Vec::new();
    };
    list.iter()
        .filter(|d| d.get("is_cdrom").and_then(Value::as_u64).unwrap_or(0) == 0)
        .filter_map(|d| {
            let s = |k: &str| d.get(k).and_then(Value::as_str);
            let vdev = s("vdev")?;
            let path = s("pdev_path")?;
            Some(ConfigDisk {
                info: DiskInfo {
                    target: vdev.to_string(),
                    path: PathBuf::from(path),
                    format: s("format").unwrap_or("raw").to_string(),
                    kind: DiskKind::default(),
                },
                backend: s("backend").unwrap_or("unknown").to_string(),
                script: s("script").filter(|x| !x.is_empty()).map(str::to_string),
            })
        })
        .collect()
}

/// Makes `path` the image of disk `target` in `config`; false if it has no such disk.
pub(crate) fn set_disk_path(config: &mut Value, target: &str, path: &Path) -> bool {
    let Some(list) = config.get_mut("disks").and_then(Value::as_array_mut) else {
        return false;
    };
    for d in list {
        if d.get("vdev").and_then(Value::as_str) == Some(target) {
            d["pdev_path"] = Value::String(path.to_string_lossy().into_owned());
            return true;
        }
    }
    false
}

/// The domain's UUID (`c_info.uuid`), the handle Xen knows it by.
pub(crate) fn uuid(config: &Value) -> Option<[u8; 16]> {
    parse_uuid(config.pointer("/c_info/uuid")?.as_str()?)
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` as 16 bytes.
pub(crate) fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 || text.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// What is kept on disk for one domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Saved {
    pub magic: String,
    pub version: u32,
    pub name: String,
    /// The id it had when last seen active (to wait for its device model).
    pub last_domid: Option<u32>,
    pub config: Value,
    /// A disk of the active domain being switched to an overlay (external snapshot), until
    /// the switch is known to be done or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<Switch>,
}

/// Disk `target` of an active domain goes from image `from` to overlay `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Switch {
    pub target: String,
    pub from: PathBuf,
    pub to: PathBuf,
}

impl Saved {
    pub fn new(name: &str, domid: u32, config: Value) -> Saved {
        Saved {
            magic: MAGIC.into(),
            version: VERSION,
            name: name.into(),
            last_domid: Some(domid),
            config,
            switch: None,
        }
    }
}

/// The per-domain files under `<state_dir>/xen/domains/`.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    dir: PathBuf,
}

/// Rejects names that cannot be a file name.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains(['/', '\0', '\n'])
        || name.len() > 200
    {
        return Err(Error::Invalid(format!("bad domain name {name:?}")));
    }
    Ok(())
}

impl Store {
    pub fn open(dir: PathBuf) -> Result<Store> {
        fs::create_dir_all(&dir).map_err(Error::io("create directory", &dir))?;
        Ok(Store { dir })
    }

    fn path(&self, name: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{name}.{ext}"))
    }

    /// The saved record of `name`, if any.
    pub fn load(&self, name: &str) -> Result<Option<Saved>> {
        check_name(name)?;
        let path = self.path(name, "json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &path)(e)),
        };
        let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| {
            Error::io("parse", &path)(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })?;
        if saved.magic != MAGIC || saved.version != VERSION {
            return Err(Error::io("parse", &path)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a version {VERSION} {MAGIC} file"),
            )));
        }
        Ok(Some(saved))
    }

    /// Every saved domain name.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(Error::io("read directory", &self.dir))? {
            let entry = entry.map_err(Error::io("read directory", &self.dir))?;
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if let Some(name) = file.strip_suffix(".json") {
                if check_name(name).is_ok() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Stores `saved` unless the same record is there already.
    pub fn save(&self, saved: &Saved) -> Result<()> {
        check_name(&saved.name)?;
        if self.load(&saved.name)?.as_ref() == Some(saved) {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(saved)
            .map_err(|e| Error::Invalid(format!("cannot encode domain record: {e}")))?;
        write_durably(&self.path(&saved.name, "json"), &bytes)
    }

    /// Writes the xl configuration file of `saved` and returns its path.
    pub fn write_xl_cfg(&self, saved: &Saved) -> Result<PathBuf> {
        let path = self.path(&saved.name, "cfg");
        write_durably(&path, render_xl_cfg(&saved.config)?.as_bytes())?;
        Ok(path)
    }
}

/// temp file, write_all, sync_all, rename, sync the directory.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(Error::io("create", &tmp))?;
    f.write_all(bytes).map_err(Error::io("write", &tmp))?;
    f.sync_all().map_err(Error::io("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(Error::io("rename", path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("sync directory", dir))
}

fn quote(s: &str) -> Result<String> {
    if s.contains(['"', '\n', '\\']) {
        return Err(Error::Invalid(format!(
            "cannot write {s:?} into an xl configuration file"
        )));
    }
    Ok(format!("\"{s}\""))
}

/// The xl spelling of a libxl lifecycle action (`restart_rename` -> `rename-restart`,
/// `coredump_destroy` -> `coredump-destroy`).
fn xl_action(libxl: &str) -> String {
    match libxl {
        "restart_rename" => "rename-restart".into(),
        other => other.replace('_', "-"),
    }
}

/// An xl configuration file for the libxl configuration `config`, covering what `xl create`
/// needs to boot the same domain again: name, type, memory, vCPUs, direct kernel boot or
/// bootloader, disks, network interfaces and the lifecycle actions.
pub(crate) fn render_xl_cfg(config: &Value) -> Result<String> {
    let s = |p: &str| config.pointer(p).and_then(Value::as_str);
    let n = |p: &str| config.pointer(p).and_then(Value::as_u64);
    let mut out = String::from("# written by domsnap from the domain's libxl configuration\n");
    let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
    let name =
        s("/c_info/name").ok_or_else(|| Error::Invalid("configuration has no name".into()))?;
    line("name", quote(name)?);
    line("type", quote(s("/c_info/type").unwrap_or("pv"))?);
    if let Some(uuid) = s("/c_info/uuid") {
        line("uuid", quote(uuid)?);
    }
    if let Some(kb) = n("/b_info/target_memkb") {
        line("memory", (kb / 1024).to_string());
    }
    if let Some(kb) = n("/b_info/max_memkb") {
        line("maxmem", (kb / 1024).to_string());
    }
    line("vcpus", n("/b_info/max_vcpus").unwrap_or(1).to_string());
    let kernel = s("/b_info/kernel").or(s("/b_info/type.pv/kernel"));
    let ramdisk = s("/b_info/ramdisk").or(s("/b_info/type.pv/ramdisk"));
    let cmdline = s("/b_info/cmdline").or(s("/b_info/type.pv/cmdline"));
    for (k, v) in [("kernel", kernel), ("ramdisk", ramdisk), ("extra", cmdline)] {
        if let Some(v) = v {
            line(k, quote(v)?);
        }
    }
    if let Some(b) = s("/b_info/type.pv/bootloader") {
        line("bootloader", quote(b)?);
    }
    for k in ["on_poweroff", "on_reboot", "on_watchdog", "on_crash"] {
        if let Some(v) = config.get(k).and_then(Value::as_str) {
            line(k, quote(&xl_action(v))?);
        }
    }
    let mut disks = Vec::new();
    for d in config
        .get("disks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ds = |k: &str| d.get(k).and_then(Value::as_str);
        let mut spec = Vec::new();
        if let Some(f) = ds("format") {
            spec.push(format!("format={f}"));
        }
        if let Some(v) = ds("vdev") {
            spec.push(format!("vdev={v}"));
        }
        let rw = d.get("readwrite").and_then(Value::as_u64).unwrap_or(1) != 0;
        spec.push(format!("access={}", if rw { "rw" } else { "ro" }));
        if d.get("is_cdrom").and_then(Value::as_u64).unwrap_or(0) != 0 {
            spec.push("devtype=cdrom".into());
        }
        if let Some(b) = ds("backend") {
            spec.push(format!("backendtype={b}"));
        }
        if let Some(p) = ds("pdev_path") {
            spec.push(format!("target={p}"));
        }
        let spec = spec.join(", ");
        if spec.contains('\'') {
            return Err(Error::Invalid(format!("cannot write disk spec {spec:?}")));
        }
        disks.push(format!("'{spec}'"));
    }
    if !disks.is_empty() {
        line("disk", format!("[ {} ]", disks.join(", ")));
    }
    let mut vifs = Vec::new();
    for v in config
        .get("nics")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let mut spec = Vec::new();
        for (k, key) in [("mac", "mac"), ("bridge", "bridge"), ("script", "script")] {
            if let Some(x) = v.get(k).and_then(Value::as_str) {
                spec.push(format!("{key}={x}"));
            }
        }
        vifs.push(format!("'{}'", spec.join(", ")));
    }
    if !vifs.is_empty() {
        line("vif", format!("[ {} ]", vifs.join(", ")));
    }
    Ok(out)
}
