//! A full disk and failing I/O under domsnap: `ENOSPC` and `EIO` while the memory image is
//! saved, while its pack is synced, while the journal is appended to and while a qcow2
//! image's snapshot table is written. Each time the operation fails with an error that names
//! the step and the file, nothing of it remains (rolled back at once, or by the next
//! command), the domain runs on, and everything is consistent.
//!
//! The state directory lives on the test file system (`testfs`), which fails the chosen
//! calls on demand; one more test fills a real, small tmpfs. Both need root (and /dev/fuse):
//! elsewhere they skip, except with `CI=true`, where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use testfs::{Fault, FaultOn, TestFs};

/// A running domain `d` with a first checkpoint, its state on a test file system.
struct Fixture {
    env: Env,
    fs: TestFs,
    _mount: tempfile::TempDir,
}

fn fixture() -> Option<Fixture> {
    if let Err(why) = testfs::available() {
        assert!(!ci(), "CI=true: the I/O error tests cannot run here: {why}");
        eprintln!("skipped: {why}");
        return None;
    }
    let mount = tempfile::Builder::new()
        .prefix("ds-fs-")
        .tempdir_in("/tmp")
        .unwrap();
    let fs = TestFs::mount(mount.path()).unwrap();
    let env = Env::new_in(fs.path());
    env.running_domain("d", "8M", &["16M"]);
    env.run(&["create", "d", "s0"]);
    Some(Fixture {
        env,
        fs,
        _mount: mount,
    })
}

/// Everything agrees (paused for the image checks if it runs).
fn consistent(env: &Env) {
    let running = env.domain_state("d") == "running";
    if running {
        env.run(&["domain", "pause", "d"]);
    }
    env.assert_consistent("d");
    if running {
        env.run(&["domain", "unpause", "d"]);
    }
}

fn last_op(env: &Env) -> serde_json::Value {
    env.json(&["history", "d"])
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone()
}

/// Runs `args` under `fault`: it must fail (exit 1) naming every string of `mentions`; once
/// the fault is gone the next command finds the operation undone, the domain running, and
/// everything consistent; the same request then succeeds.
fn fails_cleanly(f: &Fixture, fault: Fault, args: &[&str], mentions: &[&str]) {
    let env = &f.env;
    let snapshots = env.snapshot_names("d");
    let before = last_op(env)["id"].as_u64().unwrap();
    f.fs.inject(fault.clone());
    let out = env.try_run(args);
    let fired = f.fs.model().fired.clone();
    f.fs.clear_faults();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !fired.is_empty(),
        "{fault:?} never fired during {args:?}:\n{err}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} under {fault:?}:\n{err}"
    );
    for m in mentions {
        assert!(
            err.contains(m),
            "{args:?} under {fault:?}: no {m:?} in:\n{err}"
        );
    }
    // The next command that writes finishes what the failure left (readers recover
    // nothing).
    env.run(&["gc"]);
    assert_eq!(
        env.domain_state("d"),
        "running",
        "the domain does not run on:\n{err}"
    );
    assert_eq!(
        env.snapshot_names("d"),
        snapshots,
        "something of the failed create remains"
    );
    let op = last_op(env);
    assert!(
        op["id"].as_u64().unwrap() == before || op["outcome"] == "rolled-back",
        "the failed operation ended {}: {op}",
        op["outcome"]
    );
    consistent(env);
    env.run(args);
    consistent(env);
}

fn fault(on: FaultOn, path: &str, errno: i32, skip: u32) -> Fault {
    Fault {
        on,
        path: path.into(),
        errno,
        skip,
        times: 0,
    }
}

#[test]
fn enospc_while_the_memory_image_is_saved() {
    let Some(f) = fixture() else { return };
    fails_cleanly(
        &f,
        fault(FaultOn::Write, "memory/packs/", libc::ENOSPC, 0),
        &["create", "d", "s1"],
        &["save-memory", "No space left on device", "packs/"],
    );
}

#[test]
fn eio_while_the_pack_is_synced() {
    let Some(f) = fixture() else { return };
    fails_cleanly(
        &f,
        fault(FaultOn::Fsync, "memory/packs/", libc::EIO, 0),
        &["create", "d", "s1"],
        &["save-memory", "Input/output error", "packs/"],
    );
}

#[test]
fn enospc_while_a_qcow2_snapshot_table_is_written() {
    let Some(f) = fixture() else { return };
    let xvda = "sim/domains/d/xvda.qcow2";
    // Running: the device model writes the new tables; the guest's own writes (rewrites
    // in place) go on.
    fails_cleanly(
        &f,
        fault(FaultOn::Grow, xvda, libc::ENOSPC, 0),
        &["create", "d", "s1"],
        &["snapshot-disk", "xvda"],
    );
    // Shut off: domsnap writes the image itself.
    f.env.run(&["domain", "shutdown", "d"]);
    let out = {
        f.fs.inject(fault(FaultOn::Grow, xvda, libc::ENOSPC, 0));
        let out = f.env.try_run(&["create", "d", "s2"]);
        f.fs.clear_faults();
        out
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("snapshot-disk") && err.contains("xvda.qcow2"),
        "{err}"
    );
    assert!(!f.env.snapshot_names("d").contains("s2"));
    f.env.assert_consistent("d");
}

#[test]
fn eio_while_a_qcow2_image_is_synced() {
    let Some(f) = fixture() else { return };
    // The first sync of the image is the pause's flush, before the memory is saved.
    fails_cleanly(
        &f,
        fault(FaultOn::Fsync, "sim/domains/d/xvda.qcow2", libc::EIO, 0),
        &["create", "d", "s1"],
        &["save-memory", "Input/output error", "xvda.qcow2"],
    );
}

#[test]
fn enospc_while_the_journal_is_appended_to() {
    let Some(f) = fixture() else { return };
    // The journal's first, second, … write of the operation fails: before it began, at a
    // step, at its end.
    for skip in [0, 1, 2, 4] {
        fails_cleanly(
            &f,
            fault(FaultOn::Write, "journal/", libc::ENOSPC, skip),
            &["create", "d", &format!("j{skip}")],
            &["journal", "No space left on device"],
        );
    }
}

#[test]
fn eio_while_the_journal_is_synced() {
    let Some(f) = fixture() else { return };
    for skip in [0, 2] {
        fails_cleanly(
            &f,
            fault(FaultOn::Fsync, "journal/", libc::EIO, skip),
            &["create", "d", &format!("j{skip}")],
            &["journal", "Input/output error"],
        );
    }
}

/// A real small file system, filled up: whatever fails first, the next command after space
/// is freed recovers and everything is consistent.
#[test]
fn a_full_tmpfs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!ci(), "CI=true: mounting a tmpfs needs root");
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("ds-tmpfs-")
        .tempdir_in("/tmp")
        .unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -t tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
        }
    }
    let _unmount = Unmount(dir.path());
    let env = Env::new_in(dir.path());
    env.running_domain("d", "8M", &["16M"]);
    env.run(&["create", "d", "s0"]);
    // Fill what is left, but a few KiB.
    let filler = dir.path().join("filler");
    let free = {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(dir.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let f = std::fs::File::create(&filler).unwrap();
    f.set_len(0).unwrap();
    let keep = 8 * 1024;
    let data = vec![0x5au8; free.saturating_sub(keep) as usize];
    use std::io::Write;
    let _ = (&f).write_all(&data);
    drop(data);
    drop(f);
    let mut failed = 0;
    for i in 0..6 {
        let out = env.try_run(&["create", "d", &format!("full{i}")]);
        if !out.status.success() {
            failed += 1;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("No space left on device"), "{err}");
            assert_ne!(out.status.code(), None, "killed: {err}");
        }
    }
    assert!(failed > 0, "the full file system refused nothing");
    std::fs::remove_file(&filler).unwrap();
    env.run(&["recover"]);
    assert_eq!(env.domain_state("d"), "running");
    consistent(&env);
    env.run(&["create", "d", "after"]);
    consistent(&env);
}
