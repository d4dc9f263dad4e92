//! Helpers shared by the integration tests: running qemu-img/qemu-io and a raw model.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a command. A lock conflict is retried: other tests of the same binary fork
/// processes that briefly hold copies of this test's descriptors, and so its image locks.
pub fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let mut attempt = 0;
    loop {
        let out = Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let code = out.status.code().unwrap_or(-1);
        attempt += 1;
        if code != 0 && text.contains("lock") && attempt < 20 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        return (code, text);
    }
}

pub fn ok(cmd: &str, args: &[&str]) -> String {
    let (code, text) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} failed: {text}");
    text
}

pub fn qemu_img(args: &[&str]) -> String {
    ok("qemu-img", args)
}

pub fn qemu_io(img: &Path, cmd: &str) {
    let out = ok(
        "qemu-io",
        &["-f", "qcow2", "-c", cmd, img.to_str().unwrap()],
    );
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {cmd}: {out}"
    );
}

/// `qemu-img check` exit code: 0 clean, 2 corruptions, 3 leaks only.
pub fn qemu_check(img: &Path) -> (i32, String) {
    run("qemu-img", &["check", "-f", "qcow2", img.to_str().unwrap()])
}

pub fn assert_qemu_clean(img: &Path) {
    let (code, text) = qemu_check(img);
    assert_eq!(code, 0, "qemu-img check not clean: {text}");
    let ours = disk::check(img).unwrap();
    assert!(ours.is_clean(), "disk::check not clean: {ours:?}");
}

pub fn qemu_snapshots(img: &Path) -> Vec<String> {
    let out = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    out.lines()
        .skip_while(|l| !l.starts_with("ID"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

pub fn same_content(img: &Path, raw: &Path) -> bool {
    let (code, _) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    code == 0
}

/// Raw file standing for the expected guest content.
pub struct Model {
    pub path: PathBuf,
}

impl Model {
    pub fn new(path: PathBuf, size: u64) -> Model {
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        Model { path }
    }
    pub fn write(&self, offset: u64, len: u64, byte: u8) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap();
        f.write_all_at(&vec![byte; len as usize], offset).unwrap();
    }
    pub fn save(&self, to: &Path) {
        std::fs::copy(&self.path, to).unwrap();
    }
    pub fn restore(&self, from: &Path) {
        std::fs::copy(from, &self.path).unwrap();
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
