//! The state directory as an operator's bad day finds it: a journal lost, replaced by an
//! older copy or by another state directory's; a read-only mount; readers beside a running
//! operation; a umask that would share everything. The real `domsnap` binary on a
//! simulated host, checked with `qemu-img`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Exit status of a command refused because the journal does not belong with the stores.
const EXIT_IDENTITY: i32 = 7;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every file under `dir` (recursively, symbolic links not followed): size, mode, mtime.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u64, u32, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        out.insert(p.clone(), (m.len(), m.mode(), m.mtime(), m.mtime_nsec()));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

/// Pack files of the memory store, with their sizes.
fn pack_files(env: &Env) -> BTreeMap<PathBuf, u64> {
    tree(&env.state().join("memory"))
        .into_iter()
        .filter(|(p, _)| p.components().any(|c| c.as_os_str() == "packs") && p.is_file())
        .map(|(p, (len, ..))| (p, len))
        .collect()
}

fn assert_identity_refusal(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(EXIT_IDENTITY),
        "{what}: {}",
        stderr(out)
    );
    let err = stderr(out);
    assert!(err.contains("recover --adopt"), "{what}: {err}");
    assert!(err.contains("nothing was changed"), "{what}: {err}");
}

/// A domain with two checkpoints, shut off so nothing changes on its own.
fn two_checkpoints(env: &Env) {
    env.running_domain("d", "16M", &["32M", "32M"]);
    env.run(&["create", "d", "s1"]);
    env.wait_counter("d", 10);
    env.run(&["create", "d", "s2"]);
    env.run(&["domain", "destroy", "d"]);
}

#[test]
fn a_lost_journal_stops_every_writer_and_gc_deletes_nothing() {
    let env = Env::new();
    two_checkpoints(&env);
    let packs = pack_files(&env);
    assert!(!packs.is_empty());
    let tags = env.qemu_tags("d");
    std::fs::remove_dir_all(env.state().join("journal")).unwrap();

    for args in [
        &["create", "d", "s3"][..],
        &["gc"],
        &["delete", "d", "s1"],
        &["revert", "d", "s1"],
        &["domain", "start", "d"],
        &["recover"],
    ] {
        let out = env.try_run(args);
        assert_identity_refusal(&out, &args.join(" "));
        assert!(stderr(&out).contains("missing"), "{}", stderr(&out));
    }
    // Readers say so too, instead of showing an empty catalog.
    for args in [&["list", "d"][..], &["info", "d", "s1"], &["history"]] {
        assert_identity_refusal(&env.try_run(args), &args.join(" "));
    }
    let out = env.try_run(&["--json", "verify"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["identity"][0].as_str().unwrap().contains("missing"),
        "{report}"
    );

    assert_eq!(pack_files(&env), packs, "no pack file was touched");
    assert_eq!(env.qemu_tags("d"), tags, "no disk snapshot was touched");
    assert!(
        !env.state().join("journal").join("CURRENT").exists(),
        "no journal was created"
    );
    assert_eq!(env.domain_state("d"), "shutoff");
}

#[test]
fn an_older_copy_of_the_journal_is_refused() {
    let env = Env::new();
    env.running_domain("d", "16M", &["32M"]);
    env.run(&["create", "d", "s1"]);
    let journal = env.state().join("journal");
    let old = env.state().join("journal-copy");
    copy_dir(&journal, &old);
    env.run(&["create", "d", "s2"]);
    std::fs::remove_dir_all(&journal).unwrap();
    std::fs::rename(&old, &journal).unwrap();

    let out = env.try_run(&["create", "d", "s3"]);
    assert_identity_refusal(&out, "create with an older journal");
    assert!(stderr(&out).contains("older copy"), "{}", stderr(&out));
    assert_identity_refusal(&env.try_run(&["gc"]), "gc");
    assert_identity_refusal(&env.try_run(&["list", "d"]), "list");
    let (_, tags) = &env.qemu_tags("d")[0];
    assert_eq!(tags.len(), 2, "both snapshots stay on the disk: {tags:?}");
}

#[test]
fn a_journal_from_another_state_directory_is_refused() {
    let (a, b) = (Env::new(), Env::new());
    a.running_domain("d", "16M", &["32M"]);
    a.run(&["create", "d", "s1"]);
    b.define("e", "16M", &["32M"]);
    b.run(&["create", "e", "x"]);
    let journal = a.state().join("journal");
    std::fs::remove_dir_all(&journal).unwrap();
    copy_dir(&b.state().join("journal"), &journal);

    let out = a.try_run(&["create", "d", "s2"]);
    assert_identity_refusal(&out, "create with another state's journal");
    assert!(
        stderr(&out).contains("belongs to state"),
        "{}",
        stderr(&out)
    );
    assert_identity_refusal(&a.try_run(&["list", "e"]), "list");
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A tmpfs mounted on a directory, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path) -> Mount {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256m,mode=0700", "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a tmpfs (as root): {}",
            stderr(&out)
        );
        Mount(dir.to_path_buf())
    }

    fn remount(&self, how: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{how}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "remount {how}: {}", stderr(&out));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn readers_write_nothing_and_work_on_a_read_only_mount() {
    let env = Env::new();
    let mount = Mount::tmpfs(env.state());
    two_checkpoints(&env);
    let readers: &[&[&str]] = &[
        &["list", "d"],
        &["list", "d", "--tree"],
        &["info", "d", "s1"],
        &["history"],
        &["history", "d"],
        &["verify"],
        &["verify", "--deep"],
        &["domain", "list"],
        &["domain", "info", "d"],
    ];
    // RocksDB rotates its info log at every open that is not read-only; mtimes have
    // nanoseconds, but give them a tick.
    std::thread::sleep(Duration::from_millis(20));
    let before = tree(env.state());
    for args in readers {
        env.run(args);
    }
    let after = tree(env.state());
    assert_eq!(before, after, "a reader changed the state directory");

    mount.remount("ro");
    for args in readers {
        let out = env.try_run(args);
        assert!(
            out.status.success(),
            "{} on a read-only mount: {}",
            args.join(" "),
            stderr(&out)
        );
    }
    let names = env.snapshot_names("d");
    assert_eq!(names.len(), 2, "{names:?}");
    let out = env.try_run(&["create", "d", "s3"]);
    assert!(
        !out.status.success(),
        "a writer cannot work on a read-only mount"
    );
    mount.remount("rw");
}

#[test]
fn readers_work_beside_a_running_operation_and_show_it_open() {
    let env = Env::new();
    env.running_domain("b", "16M", &["32M"]);
    env.run(&["create", "b", "first"]);
    let mut slow = env
        .cmd(&["create", "b", "slow"])
        .env(
            "FAILPOINTS",
            "engine::create::before-snapshot-disk=sleep(5000)",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = env.json(&["history", "b"]);
        if h.as_array().unwrap().iter().any(|o| o["outcome"] == "open") {
            break;
        }
        assert!(Instant::now() < deadline, "slow create never showed up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = env.try_run(&["list", "b"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("is open"), "{}", stderr(&out));
    let mut rounds = 0;
    while slow.try_wait().unwrap().is_none() {
        for args in [
            &["list", "b"][..],
            &["info", "b", "first"],
            &["history"],
            &["domain", "info", "b"],
        ] {
            let out = env.try_run(args);
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        }
        let out = env.try_run(&["verify"]);
        assert!(
            matches!(out.status.code(), Some(0) | Some(4)),
            "verify beside a writer: {}",
            stderr(&out)
        );
        rounds += 1;
    }
    assert!(rounds > 0);
    assert!(slow.wait().unwrap().success());
    assert!(env.snapshot_names("b").contains("slow"));
}

/// Runs domsnap with umask 022, as a login shell would have it.
fn run_umask_022(env: &Env, args: &[&str]) {
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$@\"")
        .arg("sh")
        .arg(EXE)
        .arg("--state")
        .arg(env.state())
        .args(args)
        .env_remove("FAILPOINTS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
}

#[test]
fn everything_domsnap_creates_is_private_whatever_the_umask() {
    let env = Env::new();
    // The state directory does not exist yet: domsnap creates it.
    std::fs::remove_dir(env.state()).unwrap();
    run_umask_022(
        &env,
        &["domain", "define", "d", "--memory", "16M", "--disk", "32M"],
    );
    run_umask_022(
        &env,
        &["domain", "define", "x", "--memory", "8M", "--disk", "32M"],
    );
    run_umask_022(&env, &["domain", "start", "d"]);
    run_umask_022(&env, &["domain", "start", "x"]);
    env.wait_counter("d", 5);
    run_umask_022(&env, &["create", "d", "cp"]);
    run_umask_022(&env, &["create", "x", "ext", "--external"]);
    run_umask_022(&env, &["create", "d", "cp2"]);
    run_umask_022(&env, &["delete", "d", "cp"]);
    run_umask_022(&env, &["gc"]);
    run_umask_022(&env, &["domain", "destroy", "d"]);
    run_umask_022(&env, &["domain", "destroy", "x"]);

    let mut wide = Vec::new();
    for (path, (_, mode, ..)) in tree(env.state()) {
        if mode & 0o170000 != 0o120000 && mode & 0o077 != 0 {
            wide.push(format!("{:o} {}", mode & 0o7777, path.display()));
        }
    }
    assert!(wide.is_empty(), "readable by others:\n{}", wide.join("\n"));
    let out = env.try_run(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn verify_reports_files_others_may_read() {
    let env = Env::new();
    env.define("d", "8M", &["32M"]);
    env.run(&["create", "d", "s"]);
    env.run(&["verify"]);
    let image = &env.disk_paths("d")[0].1;
    std::fs::set_permissions(image, std::fs::Permissions::from_mode(0o644)).unwrap();
    let memory = env.state().join("memory");
    std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = env.try_run(&["--json", "verify"]);
    assert_eq!(out.status.code(), Some(4));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files: Vec<&str> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files
        .iter()
        .any(|f| f.contains(&*image.to_string_lossy()) && f.contains("0644")));
    assert!(files
        .iter()
        .any(|f| f.contains(&*memory.to_string_lossy()) && f.contains("0755")));
}

#[test]
fn gc_never_deletes_a_pack_the_journal_does_not_know() {
    let env = Env::new();
    two_checkpoints(&env);
    // A pack of an operation this journal never had (copied in from elsewhere, or left
    // by a journal that was replaced).
    let (pack, _) = pack_files(&env).into_iter().next().unwrap();
    let stranger = pack.with_file_name("op-999999.pack");
    std::fs::copy(&pack, &stranger).unwrap();
    let before = pack_files(&env);
    env.run(&["gc"]);
    assert_eq!(pack_files(&env), before, "gc deleted a pack");
    let out = env.try_run(&["verify"]);
    assert_eq!(out.status.code(), Some(4));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&*stranger.to_string_lossy()),
        "verify names the stray pack: {report}"
    );
    // Deleting the snapshots releases their packs; the stranger stays.
    env.run(&["delete", "d", "s1", "--children"]);
    env.run(&["gc"]);
    assert_eq!(
        pack_files(&env).into_keys().collect::<Vec<_>>(),
        vec![stranger]
    );
}

/// The highest operation id in the history.
fn last_op_id(env: &Env) -> u64 {
    env.json(&["history"])
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_u64().unwrap())
        .max()
        .unwrap()
}

#[test]
fn a_lost_journal_is_adopted_from_the_disks_and_ids_never_repeat() {
    let env = Env::new();
    env.running_domain("d", "16M", &["32M", "32M"]);
    env.run(&["create", "d", "s1"]);
    env.run(&["create", "d", "s2"]);
    env.define("e", "8M", &["32M"]);
    env.run(&["create", "e", "x"]);
    env.run(&["delete", "d", "s1"]);
    env.run(&["create", "d", "s1"]);
    let used = last_op_id(&env);
    std::fs::remove_dir_all(env.state().join("journal")).unwrap();

    let report = env.json(&["recover", "--adopt"]);
    let first = report["first_op"].as_u64().unwrap();
    assert!(
        first > used,
        "first id {first} must be above {used}: {report}"
    );
    assert!(report["replaced"].is_null());
    let names = |d: &str| -> Vec<String> {
        let found = report["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["domain"] == d)
            .unwrap_or_else(|| panic!("{d} not adopted: {report}"));
        found["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("d"), ["s1", "s2"]);
    assert_eq!(names("e"), ["x"]);

    assert_eq!(
        env.snapshot_names("d").into_iter().collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    let history = env.json(&["history"]);
    let adopts: Vec<&serde_json::Value> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "adopt")
        .collect();
    assert_eq!(adopts.len(), 2, "{history}");
    assert!(adopts.iter().all(|o| o["outcome"] == "committed"));

    // New operations continue above every id the disks carry.
    env.run(&["create", "d", "s3"]);
    let s3 = env.json(&["info", "d", "s3"]);
    assert!(s3["op"].as_u64().unwrap() > used);
    env.run(&["revert", "e", "x"]);
    env.run(&["delete", "d", "s2"]);
    for (target, tags) in env.qemu_tags("d") {
        assert!(
            !tags.iter().any(|t| t.starts_with("s2@")),
            "{target}: {tags:?}"
        );
    }
    // Packs of the lost journal are reported, never deleted.
    env.run(&["gc"]);
    let out = env.try_run(&["--json", "verify"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["identity", "journal", "disks", "files"] {
        assert_eq!(report[key], serde_json::json!([]), "{key}: {report}");
    }
    // Once adopted, there is nothing to adopt.
    let out = env.try_run(&["recover", "--adopt"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("nothing to adopt"));
}

#[test]
fn an_older_journal_is_moved_aside_by_adopt() {
    let env = Env::new();
    env.define("d", "8M", &["32M"]);
    env.run(&["create", "d", "a"]);
    let journal = env.state().join("journal");
    let old = env.state().join("journal-copy");
    copy_dir(&journal, &old);
    env.run(&["create", "d", "b"]);
    let used = last_op_id(&env);
    std::fs::remove_dir_all(&journal).unwrap();
    std::fs::rename(&old, &journal).unwrap();
    assert_identity_refusal(&env.try_run(&["create", "d", "c"]), "older journal");

    let report = env.json(&["recover", "--adopt"]);
    assert!(report["first_op"].as_u64().unwrap() > used, "{report}");
    let aside = std::path::PathBuf::from(report["replaced"].as_str().unwrap());
    assert!(aside.join("CURRENT").exists(), "the old journal is kept");
    assert_eq!(
        env.snapshot_names("d").into_iter().collect::<Vec<_>>(),
        ["a", "b"]
    );
    env.run(&["create", "d", "c"]);
    env.assert_consistent("d");
}

#[test]
fn verify_names_missing_and_short_packs() {
    let env = Env::new();
    env.running_domain("d", "16M", &["32M"]);
    env.run(&["create", "d", "s1"]);
    env.wait_counter("d", 10);
    env.run(&["create", "d", "s2"]);
    env.run(&["domain", "destroy", "d"]);
    env.run(&["verify", "--deep"]);
    let packs: Vec<PathBuf> = pack_files(&env).into_keys().collect();
    assert!(packs.len() >= 2, "{packs:?}");
    std::fs::remove_file(&packs[0]).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&packs[1])
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
    let out = env.try_run(&["verify"]);
    assert_eq!(out.status.code(), Some(4));
    let text = String::from_utf8_lossy(&out.stdout);
    for p in &packs[..2] {
        let name = p.file_name().unwrap().to_string_lossy();
        assert!(text.contains(&*name), "verify names {name}: {text}");
    }
}

#[test]
fn an_adopted_checkpoint_reverts_to_exactly_its_instant() {
    let env = Env::new();
    env.running_domain("d", "16M", &["32M", "32M"]);
    env.run(&["create", "d", "first"]);
    env.wait_counter("d", 20);
    env.run(&["domain", "pause", "d"]);
    let (m, d) = (env.memory_counter("d"), env.disk_counter("d"));
    env.run(&["create", "d", "cp"]);
    env.run(&["domain", "unpause", "d"]);
    env.wait_counter("d", 50);
    let used = last_op_id(&env);
    std::fs::remove_dir_all(env.state().join("journal")).unwrap();

    let report = env.json(&["recover", "--adopt"]);
    assert!(report["first_op"].as_u64().unwrap() > used, "{report}");
    let cp = env.json(&["info", "d", "cp"]);
    assert_eq!(cp["kind"], "checkpoint", "{cp}");
    assert_eq!(
        cp["parent"], "first",
        "the manifest's parent names it: {cp}"
    );
    assert!(cp["memory_image"].as_str().is_some(), "{cp}");

    env.run(&["revert", "d", "cp", "--paused"]);
    assert_eq!(env.domain_state("d"), "paused");
    assert_eq!(
        (env.memory_counter("d"), env.disk_counter("d")),
        (m, d),
        "memory and disk exactly as at the checkpoint's instant"
    );
    env.assert_consistent("d");
    env.run(&["domain", "unpause", "d"]);
    env.wait_counter("d", 10);
}
