//! Shared helpers of the end-to-end tests: they drive the real `domsnap` binary on a
//! simulated host in a temporary state directory, and check the qcow2 images with the
//! real `qemu-img` and `qemu-io`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const EXE: &str = env!("CARGO_BIN_EXE_domsnap");

/// A state directory with helpers; destroys its domains when dropped.
pub struct Env {
    pub dir: tempfile::TempDir,
    domains: std::cell::RefCell<Vec<String>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for d in self.domains.borrow().iter() {
            let _ = self.cmd(&["domain", "destroy", d]).output();
        }
    }
}

impl Env {
    pub fn new() -> Env {
        Env::new_in(Path::new("/tmp"))
    }

    /// A state directory inside `parent` (for example a test file system's mount).
    pub fn new_in(parent: &Path) -> Env {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("ds-")
            .tempdir_in(parent)
            .unwrap();
        // As an operator would make it (`verify` reports a state directory others can read).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        Env {
            dir,
            domains: Default::default(),
        }
    }

    pub fn state(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        // `DOMSNAP_EXE` runs the tests against another build (a long run keeps its own copy
        // while the tree is rebuilt).
        let exe = std::env::var_os("DOMSNAP_EXE").unwrap_or_else(|| EXE.into());
        let mut c = Command::new(exe);
        c.arg("--state").arg(self.state()).args(args);
        c.env_remove("FAILPOINTS");
        c
    }

    /// Runs a command; returns its output whatever the status.
    pub fn try_run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.try_run(args);
        assert!(
            out.status.success(),
            "domsnap {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command with `--json` that must succeed; returns the parsed output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{out}"))
    }

    /// Defines and starts a domain with the counter workload, and waits until it counts.
    pub fn running_domain(&self, name: &str, memory: &str, disks: &[&str]) {
        self.define(name, memory, disks);
        self.run(&["domain", "start", name, "--workload", "counter"]);
        self.wait_counter(name, 10);
    }

    pub fn define(&self, name: &str, memory: &str, disks: &[&str]) {
        let mut args = vec!["domain", "define", name, "--memory", memory];
        for d in disks {
            args.push("--disk");
            args.push(d);
        }
        self.run(&args);
        self.domains.borrow_mut().push(name.to_string());
    }

    pub fn domain_info(&self, name: &str) -> Value {
        self.json(&["domain", "info", name])
    }

    pub fn domain_state(&self, name: &str) -> String {
        self.domain_info(name)["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn memory_path(&self, name: &str) -> PathBuf {
        PathBuf::from(self.domain_info(name)["memory"]["path"].as_str().unwrap())
    }

    pub fn disk_paths(&self, name: &str) -> Vec<(String, PathBuf)> {
        self.domain_info(name)["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["target"].as_str().unwrap().to_string(),
                    PathBuf::from(d["path"].as_str().unwrap()),
                )
            })
            .collect()
    }

    /// The guest's counter in memory.
    pub fn memory_counter(&self, name: &str) -> u64 {
        let mut buf = [0u8; 8];
        std::fs::File::open(self.memory_path(name))
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
        u64::from_le_bytes(buf)
    }

    /// The guest's counter on xvda (read with qemu-io, sharing the image).
    pub fn disk_counter(&self, name: &str) -> u64 {
        let path = self.disk_paths(name)[0].1.clone();
        disk_u64(&path)
    }

    /// Waits until the memory counter has advanced by `by`.
    pub fn wait_counter(&self, name: &str, by: u64) -> u64 {
        let start = self.memory_counter(name);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = self.memory_counter(name);
            if n >= start + by {
                return n;
            }
            assert!(Instant::now() < deadline, "counter of {name} stuck at {n}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Tags of every disk's qcow2 snapshot table, by target (read by qemu-img).
    pub fn qemu_tags(&self, name: &str) -> Vec<(String, BTreeSet<String>)> {
        self.disk_paths(name)
            .into_iter()
            .map(|(t, p)| (t, qemu_snapshot_names(&p)))
            .collect()
    }

    /// Checks, with the domain paused or shut off: `qemu-img check` is clean on every disk,
    /// each disk's snapshot table lists exactly the catalog's tags, and `verify` passes.
    pub fn assert_consistent(&self, name: &str) {
        let list = self.json(&["list", name]);
        for (target, path) in self.disk_paths(name) {
            qemu_img_check(&path);
            let expected: BTreeSet<String> = list
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| s["disks"].as_array().unwrap().clone())
                .filter(|d| d["target"] == target.as_str() && d["external"] == false)
                .map(|d| d["tag"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(
                qemu_snapshot_names(&path),
                expected,
                "qemu-img snapshot -l of {target} vs the catalog"
            );
        }
        let out = self.try_run(&["verify", "--deep"]);
        assert!(
            out.status.success(),
            "verify failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn snapshot_names(&self, name: &str) -> BTreeSet<String> {
        self.json(&["list", name])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Whether this is a CI run (`CI` set to anything but empty, `0` or `false`): there a test
/// that cannot reach its real component (FUSE, a tmpfs mount) fails instead of skipping.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"))
}

/// Names in an image's snapshot table, from `qemu-img info`.
pub fn qemu_snapshot_names(path: &Path) -> BTreeSet<String> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `qemu-img check` must report no errors and no leaks.
pub fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {} failed:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The little-endian u64 at offset 0 of a qcow2 image's guest content.
pub fn disk_u64(path: &Path) -> u64 {
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c", "read -v 0 8"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("00000000:"))
        .unwrap_or_else(|| panic!("unexpected qemu-io output: {text}"));
    let bytes: Vec<u8> = line["00000000:".len()..]
        .split_whitespace()
        .take(8)
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    u64::from_le_bytes(bytes.try_into().unwrap())
}
