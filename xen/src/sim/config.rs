//! A simulated domain's configuration (`domain.json`) and the files of its directory.
//!
//! Layout of `<state_dir>/sim/domains/<name>/`:
//!
//! | file            | what                                                              |
//! |-----------------|-------------------------------------------------------------------|
//! | `domain.json`   | [`DomainConfig`] (temp file + fsync + rename + directory fsync)   |
//! | `memory`        | the guest's raw memory, `memory_bytes` long, sparse, mode 0600    |
//! | `xvda.qcow2`, … | the disks' first images, qcow2, in target order                   |
//! | `*.qcow2`       | external snapshot overlays; each disk's current image is named in |
//! |                 | `domain.json` (`image`), the others are its backing chain         |
//! | `guest.pid`     | pid of the live guest process; the guest holds an `flock` on it   |
//! | `control.sock`  | the guest's control socket (line-delimited JSON)                  |
//! | `guest.log`     | stdout and stderr of guest processes, appended                    |
//! | `host.lock`     | `flock`ed by host-side commands that change the run state         |

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{DiskInfo, Error, Result};

/// Format version of `domain.json`.
pub(crate) const CONFIG_VERSION: u32 = 1;

/// Longest domain name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Smallest memory size accepted (1 MiB).
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;

/// Page size: memory sizes are a multiple of it.
pub const PAGE_SIZE: u64 = 4096;

/// Most disks a simulated domain can have (`xvda` … `xvdz`).
pub const MAX_DISKS: usize = 26;

/// What the vCPU of a simulated domain does while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Loops forever: `n += 1`, writes `n` (u64 LE) at offset 0 of `xvda` through the device
    /// model and waits for the write, then stores `n` at offset 0 of memory. At start `n` is
    /// read from memory offset 0, so a restored memory image counts on from its value.
    /// While paused, memory holds `m` and `xvda` holds `m` or `m + 1`.
    #[default]
    Counter,
    /// Does nothing (the vCPU sleeps); memory and disks never change.
    Idle,
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::Counter => "counter",
            Workload::Idle => "idle",
        })
    }
}

impl FromStr for Workload {
    type Err = Error;

    fn from_str(s: &str) -> Result<Workload> {
        match s {
            "counter" => Ok(Workload::Counter),
            "idle" => Ok(Workload::Idle),
            _ => Err(Error::Invalid(format!(
                "unknown workload {s:?} (known: counter, idle)"
            ))),
        }
    }
}

/// One disk of a simulated domain, as stored in `domain.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DiskConfig {
    /// Guest device name: `xvda`, …
    pub target: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// File name (inside the domain directory) of the disk's current image: the one the
    /// guest reads and writes. Absent in configurations written before external snapshots:
    /// then `<target>.qcow2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl DiskConfig {
    /// File name of the disk's current image inside the domain directory.
    pub fn file_name(&self) -> String {
        match &self.image {
            Some(image) => image.clone(),
            None => format!("{}.qcow2", self.target),
        }
    }
}

/// Longest image file name accepted.
pub const MAX_IMAGE_NAME_LEN: usize = 128;

/// Checks the file name of a disk image inside a domain directory: 7–128 characters of
/// `[A-Za-z0-9._-]`, not starting with `.`, ending in `.qcow2`. Only names that pass become
/// path components.
pub fn validate_image_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.len() <= ".qcow2".len()
        || name.len() > MAX_IMAGE_NAME_LEN
        || !ok_chars
        || name.starts_with('.')
        || !name.ends_with(".qcow2")
    {
        return Err(Error::Invalid(format!(
            "bad image file name {name:?}: up to {MAX_IMAGE_NAME_LEN} characters of \
             A-Z a-z 0-9 . _ -, not starting with '.', ending in .qcow2"
        )));
    }
    Ok(())
}

/// `domain.json`: what `define` decided about a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DomainConfig {
    /// [`CONFIG_VERSION`].
    pub version: u32,
    /// Domain name (equal to the directory name).
    pub name: String,
    /// Memory size in bytes (length of the `memory` file).
    pub memory_bytes: u64,
    /// Disks in target order.
    pub disks: Vec<DiskConfig>,
    /// What the vCPU does.
    pub workload: Workload,
}

impl DomainConfig {
    /// Reads and checks `domain.json` of the domain in `dir`.
    pub fn load(dir: &DomainDir) -> Result<DomainConfig> {
        let path = dir.config();
        let bytes = std::fs::read(&path).map_err(Error::io("read", &path))?;
        let config: DomainConfig = serde_json::from_slice(&bytes).map_err(|e| Error::Io {
            op: "parse",
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        if config.version != CONFIG_VERSION {
            return Err(Error::Io {
                op: "parse",
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown domain.json version {}", config.version),
                ),
            });
        }
        for disk in &config.disks {
            if let Some(image) = &disk.image {
                validate_image_name(image).map_err(|e| Error::Io {
                    op: "parse",
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
                })?;
            }
        }
        Ok(config)
    }

    /// The disks as [`DiskInfo`], with their paths inside `dir`.
    pub fn disk_infos(&self, dir: &DomainDir) -> Vec<DiskInfo> {
        self.disks
            .iter()
            .map(|d| DiskInfo {
                target: d.target.clone(),
                path: dir.path.join(d.file_name()),
                format: "qcow2".to_owned(),
                kind: crate::DiskKind::Qcow2,
            })
            .collect()
    }

    /// The disk with guest device name `target`.
    pub fn disk(&self, target: &str) -> Result<&DiskConfig> {
        self.disks
            .iter()
            .find(|d| d.target == target)
            .ok_or_else(|| Error::NoSuchDisk {
                domain: self.name.clone(),
                target: target.to_owned(),
            })
    }
}

/// Checks a user-given domain name: 1–64 characters of `[A-Za-z0-9._-]`, not starting with
/// `.`. Only names that pass become path components.
pub fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || name.starts_with('.') {
        return Err(Error::Invalid(format!(
            "bad domain name {name:?}: 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ -, \
             not starting with '.'"
        )));
    }
    Ok(())
}

/// Checks a memory size: a multiple of 4096, at least 1 MiB.
pub fn validate_memory(memory_bytes: u64) -> Result<()> {
    if memory_bytes < MIN_MEMORY_BYTES || memory_bytes & (PAGE_SIZE - 1) != 0 {
        return Err(Error::Invalid(format!(
            "bad memory size {memory_bytes}: a multiple of {PAGE_SIZE} bytes, at least 1 MiB"
        )));
    }
    Ok(())
}

/// Checks disk sizes and names the disks `xvda`, `xvdb`, …
pub(crate) fn disk_configs(disk_sizes: &[u64]) -> Result<Vec<DiskConfig>> {
    if disk_sizes.len() > MAX_DISKS {
        return Err(Error::Invalid(format!(
            "{} disks asked for; at most {MAX_DISKS}",
            disk_sizes.len()
        )));
    }
    disk_sizes
        .iter()
        .zip(b'a'..=b'z')
        .map(|(&size, letter)| {
            if size == 0 || size & 511 != 0 {
                return Err(Error::Invalid(format!(
                    "bad disk size {size}: a positive multiple of 512 bytes"
                )));
            }
            Ok(DiskConfig {
                target: format!("xvd{}", char::from(letter)),
                size,
                image: Some(format!("xvd{}.qcow2", char::from(letter))),
            })
        })
        .collect()
}

/// The files of one domain directory.
#[derive(Debug, Clone)]
pub(crate) struct DomainDir {
    /// `<state_dir>/sim/domains/<name>`.
    pub path: PathBuf,
}

impl DomainDir {
    pub fn new(domains_dir: &Path, name: &str) -> DomainDir {
        DomainDir {
            path: domains_dir.join(name),
        }
    }

    pub fn config(&self) -> PathBuf {
        self.path.join("domain.json")
    }

    pub fn memory(&self) -> PathBuf {
        self.path.join("memory")
    }

    pub fn dirty_log(&self) -> PathBuf {
        self.path.join("dirty.log")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.path.join("guest.pid")
    }

    pub fn socket(&self) -> PathBuf {
        self.path.join("control.sock")
    }

    pub fn log(&self) -> PathBuf {
        self.path.join("guest.log")
    }

    pub fn host_lock(&self) -> PathBuf {
        self.path.join("host.lock")
    }

    pub fn exists(&self) -> bool {
        self.config().is_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web-1", "A.b_c", "x".repeat(64).as_str(), "1"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "é",
            "x".repeat(65).as_str(),
            "a\0",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn image_names() {
        for good in ["xvda.qcow2", "a.qcow2", "xvda.snap-1_2.qcow2"] {
            assert!(validate_image_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".qcow2",
            ".x.qcow2",
            "x.qcow",
            "x.raw",
            "a/b.qcow2",
            "../b.qcow2",
            "a b.qcow2",
            "domain.json",
            "memory",
            &format!("{}.qcow2", "x".repeat(MAX_IMAGE_NAME_LEN)),
        ] {
            assert!(validate_image_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn old_configs_name_the_first_image() {
        let old = r#"{"version":1,"name":"d","memory_bytes":1048576,
            "disks":[{"target":"xvda","size":1048576}],"workload":"counter"}"#;
        let config: DomainConfig = serde_json::from_str(old).expect("parse");
        assert_eq!(config.disks[0].file_name(), "xvda.qcow2");
        let mut changed = config.clone();
        changed.disks[0].image = Some("xvda.s1.qcow2".into());
        let json = serde_json::to_string(&changed).expect("serialize");
        let back: DomainConfig = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.disks[0].file_name(), "xvda.s1.qcow2");
    }

    #[test]
    fn memory_sizes() {
        assert!(validate_memory(1 << 20).is_ok());
        assert!(validate_memory((1 << 20) + 4096).is_ok());
        assert!(validate_memory((1 << 20) - 4096).is_err());
        assert!(validate_memory((1 << 20) + 1).is_err());
        assert!(validate_memory(0).is_err());
    }

    #[test]
    fn disks_are_named_in_order() {
        let disks = disk_configs(&[1 << 20, 2 << 20]).expect("valid");
        assert_eq!(disks[0].target, "xvda");
        assert_eq!(disks[1].target, "xvdb");
        assert_eq!(disks[1].file_name(), "xvdb.qcow2");
        assert!(disk_configs(&[0]).is_err());
        assert!(disk_configs(&[1000]).is_err());
        assert!(disk_configs(&[512; 27]).is_err());
    }

    #[test]
    fn config_round_trip() {
        let config = DomainConfig {
            version: CONFIG_VERSION,
            name: "d".into(),
            memory_bytes: 1 << 20,
            disks: disk_configs(&[1 << 20]).expect("valid"),
            workload: Workload::Counter,
        };
        let json = serde_json::to_string(&config).expect("serialize");
        let back: DomainConfig = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, config);
        assert_eq!(
            "counter".parse::<Workload>().expect("known"),
            Workload::Counter
        );
        assert!("spin".parse::<Workload>().is_err());
    }
}
