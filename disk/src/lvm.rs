//! LVM thin volumes as snapshot storage, through the `lvm` command (LVM2 ≥ 2.02.158 for its
//! JSON reports).
//!
//! A snapshot of thin volume `vg/web1` with tag `t` is the thin snapshot LV `vg/web1.<t>`
//! (`@` in a tag is spelled `+`, since LV names cannot hold `@`), carrying the LV tag
//! `domsnap-of=web1`: listing the snapshots of a volume is one report of the volume group,
//! filtered by that tag. A thin snapshot is instant and shares every block with its origin
//! until one of them is written; taking one suspends the origin's device for a moment, so
//! every write the guest issued before is in the snapshot. Snapshots are created with LVM's
//! default activation skip (`k` flag): they take no device node until someone activates them.
//!
//! Applying snapshot `t` (the domain shut off) replaces the origin by a new thin snapshot of
//! `vg/web1.<t>`, with renames that a crash can interrupt anywhere:
//!
//! 1. converge what an interrupted apply left (below);
//! 2. `lvcreate -s -n web1.revert-new vg/web1.<t>` (activated);
//! 3. `lvrename vg/web1 web1.revert-old`;
//! 4. `lvrename vg/web1.revert-new web1`;
//! 5. `lvremove vg/web1.revert-old`.
//!
//! Converging: if `web1` is missing, step 3 ran and step 4 did not: `web1.revert-new` (made
//! in step 2, before step 3) is renamed to `web1`. Then any `web1.revert-old` and
//! `web1.revert-new` are removed. After that the origin exists and no scratch volume does,
//! whatever the interrupted apply's snapshot was, and the apply runs from step 2. The names
//! `revert-new` and `revert-old` are therefore reserved: no snapshot tag may use them.
//!
//! Thick (linear) volumes are refused: their snapshots are copy-on-write areas of fixed size
//! that become invalid when full, and slow every write of the origin. A thin pool whose data
//! or metadata is at least [`Lvm::pool_full_percent`] used is refused a new snapshot: every
//! block the guest writes afterwards needs a free one, and a full pool stops every volume in it.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::meta::failpoint;

/// The LV tag that marks a thin snapshot taken by domsnap, followed by its origin's name.
const SNAPSHOT_MARK: &str = "domsnap-of=";
/// Scratch volume names of an apply: `<origin>.<suffix>`.
const NEW: &str = "revert-new";
const OLD: &str = "revert-old";
/// The longest LV name LVM accepts (its NAME_LEN is 128, with the terminating NUL).
const MAX_LV_NAME: usize = 127;

/// The `lvm` program and the policy applied to thin pools.
#[derive(Debug, Clone)]
pub struct Lvm {
    program: PathBuf,
    /// A thin pool at or above this data or metadata usage (percent) gets no new snapshot.
    pub pool_full_percent: f64,
}

impl Default for Lvm {
    fn default() -> Lvm {
        Lvm::new("lvm")
    }
}

/// One logical volume, as `lvs` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    /// Volume group.
    pub vg: String,
    /// LV name.
    pub name: String,
    /// `lv_attr`: the first letter is the volume type (`V` thin, `t` thin pool, `-` linear…).
    pub attr: String,
    /// The thin pool of a thin volume.
    pub pool: Option<String>,
    /// LV tags.
    pub tags: Vec<String>,
    /// Device number while active.
    pub device: Option<(u32, u32)>,
    /// Data usage of a thin pool, percent.
    pub data_percent: Option<f64>,
    /// Metadata usage of a thin pool, percent.
    pub metadata_percent: Option<f64>,
}

impl Volume {
    /// Whether it is a thin volume (thin snapshots included).
    pub fn is_thin(&self) -> bool {
        self.attr.starts_with('V')
    }

    /// `vg/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.vg, self.name)
    }
}

impl Lvm {
    /// Runs `program` (normally `lvm`, found on `PATH`) for every LVM command.
    pub fn new(program: impl Into<PathBuf>) -> Lvm {
        Lvm {
            program: program.into(),
            pool_full_percent: 95.0,
        }
    }

    /// Runs `lvm ARGS`; its stdout on success.
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.program)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| Error::Io {
                op: "run",
                path: self.program.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Lvm {
                command: format!("{} {}", self.program.display(), args.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every logical volume (of volume group `vg`, or of all).
    pub fn volumes(&self, vg: Option<&str>) -> Result<Vec<Volume>> {
        let mut args = vec![
            "lvs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-a",
            "-o",
            "vg_name,lv_name,lv_attr,pool_lv,lv_tags,lv_kernel_major,lv_kernel_minor,\
             data_percent,metadata_percent",
        ];
        args.extend(vg);
        parse_report(&self.run(&args)?)
    }

    /// The logical volume that block device `path` is (see [`find_device`]).
    pub fn volume_of_device(&self, path: &Path) -> Result<Option<Volume>> {
        find_device(&self.volumes(None)?, path)
    }

    /// The thin volume `vg/name`, ready for snapshots; [`Error::NotThin`] for any other kind
    /// of volume.
    pub fn thin_volume(&self, vg: &str, name: &str) -> Result<ThinVolume> {
        let volumes = self.volumes(Some(vg))?;
        let v = volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::NoSuchVolume {
                volume: format!("{vg}/{name}"),
            })?;
        if !v.is_thin() {
            return Err(Error::NotThin {
                volume: v.full_name(),
                attr: v.attr.clone(),
            });
        }
        Ok(ThinVolume {
            lvm: self.clone(),
            vg: vg.to_string(),
            name: name.to_string(),
        })
    }
}

/// The volume among `volumes` that block device `path` is (followed through symbolic links,
/// as `/dev/vg/lv` and `/dev/mapper/vg-lv` are), by device number; `None` if `path` is no
/// block device or no active LV.
pub fn find_device(volumes: &[Volume], path: &Path) -> Result<Option<Volume>> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        op: "stat",
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Ok(None);
    }
    let rdev = meta.rdev();
    let dev = (
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    );
    Ok(volumes.iter().find(|v| v.device == Some(dev)).cloned())
}

/// Parses `lvs --reportformat json` output.
fn parse_report(json: &str) -> Result<Vec<Volume>> {
    let bad = |what: String| Error::Lvm {
        command: "lvs --reportformat json".into(),
        status: "0".into(),
        stderr: what,
    };
    let v: Value =
        serde_json::from_str(json).map_err(|e| bad(format!("unreadable report: {e}")))?;
    let mut out = Vec::new();
    for report in v
        .get("report")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no \"report\" array".into()))?
    {
        for lv in report
            .get("lv")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let s = |k: &str| lv.get(k).and_then(Value::as_str).unwrap_or("").trim();
            let num = |k: &str| s(k).parse::<f64>().ok();
            let dev = match (s("lv_kernel_major").parse(), s("lv_kernel_minor").parse()) {
                (Ok(ma), Ok(mi)) => Some((ma, mi)),
                _ => None, // "-1" or "" while inactive
            };
            // Hidden volumes are listed as "[name]".
            let name = s("lv_name").trim_start_matches('[').trim_end_matches(']');
            out.push(Volume {
                vg: s("vg_name").to_string(),
                name: name.to_string(),
                attr: s("lv_attr").to_string(),
                pool: Some(s("pool_lv"))
                    .filter(|p| !p.is_empty())
                    .map(|p| p.trim_start_matches('[').trim_end_matches(']').to_string()),
                tags: s("lv_tags")
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect(),
                device: dev,
                data_percent: num("data_percent"),
                metadata_percent: num("metadata_percent"),
            });
        }
    }
    Ok(out)
}

/// A thin volume whose snapshots domsnap manages (see the module documentation).
#[derive(Debug, Clone)]
pub struct ThinVolume {
    lvm: Lvm,
    vg: String,
    name: String,
}

impl fmt::Display for ThinVolume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LVM thin volume {}/{}", self.vg, self.name)
    }
}

impl ThinVolume {
    /// `vg/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.vg, self.name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{}", self.vg, self.name))
    }

    fn invalid(&self, what: String) -> Error {
        Error::InvalidArgument {
            path: self.path(),
            what,
        }
    }

    /// The LV name of snapshot `tag`.
    fn snapshot_lv(&self, tag: &str) -> Result<String> {
        let ok = !tag.is_empty()
            && !tag.starts_with('.')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
        if !ok {
            return Err(self.invalid(format!(
                "snapshot tag {tag:?}: only A-Z a-z 0-9 . _ - @ are possible in LV names"
            )));
        }
        if tag == NEW || tag == OLD {
            return Err(self.invalid(format!("snapshot tag {tag:?} is reserved")));
        }
        let lv = format!("{}.{}", self.name, tag.replace('@', "+"));
        if lv.len() > MAX_LV_NAME {
            return Err(self.invalid(format!(
                "snapshot LV name {lv:?} is longer than LVM's {MAX_LV_NAME} characters"
            )));
        }
        Ok(lv)
    }

    fn scratch(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.name)
    }

    fn volumes(&self) -> Result<Vec<Volume>> {
        self.lvm.volumes(Some(&self.vg))
    }

    fn exists(volumes: &[Volume], name: &str) -> bool {
        volumes.iter().any(|v| v.name == name)
    }

    fn lv(&self, name: &str) -> String {
        format!("{}/{name}", self.vg)
    }

    /// Refuses a snapshot when the thin pool is (nearly) full.
    fn check_pool(&self, volumes: &[Volume]) -> Result<()> {
        let Some(origin) = volumes.iter().find(|v| v.name == self.name) else {
            return Err(Error::NoSuchVolume {
                volume: self.full_name(),
            });
        };
        let Some(pool) = origin
            .pool
            .as_deref()
            .and_then(|p| volumes.iter().find(|v| v.name == p))
        else {
            return Ok(()); // no pool reported: let LVM decide
        };
        let limit = self.lvm.pool_full_percent;
        let data = pool.data_percent.unwrap_or(0.0);
        let metadata = pool.metadata_percent.unwrap_or(0.0);
        if data >= limit || metadata >= limit {
            return Err(Error::ThinPoolFull {
                volume: self.full_name(),
                pool: pool.full_name(),
                data_percent: data,
                metadata_percent: metadata,
                limit_percent: limit,
            });
        }
        Ok(())
    }
}

impl Backend for ThinVolume {
    fn describe(&self) -> String {
        self.to_string()
    }

    fn snapshots(&self) -> Result<Vec<String>> {
        let mark = format!("{SNAPSHOT_MARK}{}", self.name);
        let prefix = format!("{}.", self.name);
        let mut tags: Vec<String> = self
            .volumes()?
            .into_iter()
            .filter(|v| v.tags.contains(&mark))
            .filter_map(|v| v.name.strip_prefix(&prefix).map(|t| t.replace('+', "@")))
            .collect();
        tags.sort();
        Ok(tags)
    }

    fn create_snapshot(&self, tag: &str) -> Result<()> {
        let lv = self.snapshot_lv(tag)?;
        let volumes = self.volumes()?;
        if Self::exists(&volumes, &lv) {
            return Ok(());
        }
        self.check_pool(&volumes)?;
        let mark = format!("{SNAPSHOT_MARK}{}", self.name);
        self.lvm.run(&[
            "lvcreate",
            "-q",
            "-s",
            "-n",
            &lv,
            "--addtag",
            &mark,
            &self.full_name(),
        ])?;
        Ok(())
    }

    fn delete_snapshot(&self, tag: &str) -> Result<()> {
        let lv = self.snapshot_lv(tag)?;
        if !Self::exists(&self.volumes()?, &lv) {
            return Ok(());
        }
        self.lvm.run(&["lvremove", "-q", "-f", &self.lv(&lv)])?;
        Ok(())
    }

    fn apply_snapshot(&self, tag: &str) -> Result<()> {
        let lv = self.snapshot_lv(tag)?;
        let (new, old) = (self.scratch(NEW), self.scratch(OLD));
        let mut volumes = self.volumes()?;
        if !Self::exists(&volumes, &lv) {
            return Err(Error::NoSuchSnapshot {
                path: self.path(),
                name: tag.to_string(),
            });
        }
        // 1. converge what an interrupted apply left
        if !Self::exists(&volumes, &self.name) {
            if !Self::exists(&volumes, &new) {
                return Err(Error::NoSuchVolume {
                    volume: self.full_name(),
                });
            }
            self.lvm
                .run(&["lvrename", "-q", &self.vg, &new, &self.name])?;
            volumes = self.volumes()?;
        }
        for scratch in [&old, &new] {
            if Self::exists(&volumes, scratch) {
                self.lvm.run(&["lvremove", "-q", "-f", &self.lv(scratch)])?;
            }
        }
        // 2. the new origin: a thin snapshot of the snapshot, active, without the mark
        self.lvm.run(&[
            "lvcreate",
            "-q",
            "-s",
            "-kn",
            "-ay",
            "-n",
            &new,
            &self.lv(&lv),
        ])?;
        failpoint("disk::lvm::apply::after-create")?;
        // 3., 4. swap
        self.lvm
            .run(&["lvrename", "-q", &self.vg, &self.name, &old])?;
        failpoint("disk::lvm::apply::after-rename-origin")?;
        self.lvm
            .run(&["lvrename", "-q", &self.vg, &new, &self.name])?;
        failpoint("disk::lvm::apply::after-rename-new")?;
        // 5. the old content
        self.lvm.run(&["lvremove", "-q", "-f", &self.lv(&old)])?;
        Ok(())
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod fake;
#[cfg(test)]
mod tests;
