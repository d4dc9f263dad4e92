//! End-to-end scenarios: the real `domsnap` binary, a simulated host with real guest
//! processes and real qcow2 images, checked with `qemu-img` / `qemu-io`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;

use common::*;
use serde_json::Value;

#[test]
fn checkpoints_while_running_and_paused_revert_to_their_instant() {
    let env = Env::new();
    env.running_domain("web01", "64M", &["128M", "64M"]);

    let before = env.memory_counter("web01");
    env.run(&[
        "create",
        "web01",
        "running-cp",
        "--description",
        "while running",
    ]);
    let after = env.memory_counter("web01");
    assert_eq!(
        env.domain_state("web01"),
        "running",
        "create resumes a running domain"
    );
    env.wait_counter("web01", 20);

    env.run(&["domain", "pause", "web01"]);
    let (m, d) = (env.memory_counter("web01"), env.disk_counter("web01"));
    assert!(d == m || d == m + 1, "paused: memory {m}, xvda {d}");
    env.run(&["create", "web01", "paused-cp"]);
    assert_eq!(
        env.domain_state("web01"),
        "paused",
        "create leaves a paused domain paused"
    );
    env.assert_consistent("web01");
    env.run(&["domain", "unpause", "web01"]);
    env.wait_counter("web01", 50);

    // Revert to the paused checkpoint: exactly the values at its instant, paused as it was.
    env.run(&["revert", "web01", "paused-cp"]);
    assert_eq!(env.domain_state("web01"), "paused");
    assert_eq!(env.memory_counter("web01"), m);
    assert_eq!(env.disk_counter("web01"), d);
    env.assert_consistent("web01");

    // Revert to the running checkpoint, paused: memory and disk of one instant between
    // `before` and `after`.
    env.run(&["revert", "web01", "running-cp", "--paused"]);
    let (m2, d2) = (env.memory_counter("web01"), env.disk_counter("web01"));
    assert!(before <= m2 && m2 <= after, "{before} <= {m2} <= {after}");
    assert!(d2 == m2 || d2 == m2 + 1, "reverted: memory {m2}, xvda {d2}");
    env.assert_consistent("web01");
    // Reverting again gives the very same instant.
    env.run(&["domain", "unpause", "web01"]);
    env.wait_counter("web01", 20);
    env.run(&["revert", "web01", "running-cp", "--paused"]);
    assert_eq!(
        (env.memory_counter("web01"), env.disk_counter("web01")),
        (m2, d2)
    );
    // Without --paused, a checkpoint of a running domain comes back running and counts on
    // from its instant.
    env.run(&["revert", "web01", "running-cp"]);
    assert_eq!(env.domain_state("web01"), "running");
    assert!(env.wait_counter("web01", 10) > m2);

    let list = env.json(&["list", "web01"]);
    let snaps = list.as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    let running = snaps.iter().find(|s| s["name"] == "running-cp").unwrap();
    assert_eq!(running["kind"], "checkpoint");
    assert_eq!(running["domain_state"], "running");
    assert_eq!(running["current"], true);
    assert_eq!(running["disks"].as_array().unwrap().len(), 2);
    assert!(running["memory_image"].as_str().unwrap().len() == 64);
    let paused = snaps.iter().find(|s| s["name"] == "paused-cp").unwrap();
    assert_eq!(paused["parent"], "running-cp");
    assert_eq!(paused["domain_state"], "paused");
    assert_eq!(paused["current"], false);
    for key in [
        "created",
        "memory_image",
        "disks",
        "kind",
        "parent",
        "current",
        "domain_state",
    ] {
        assert!(running.get(key).is_some(), "list --json lacks {key}");
    }
}

#[test]
fn disk_only_snapshots_need_a_stopped_domain_or_explicit_consent() {
    let env = Env::new();
    env.running_domain("db", "16M", &["64M"]);
    let out = env.try_run(&["create", "db", "d1", "--disk-only"]);
    assert_eq!(out.status.code(), Some(2), "refused as bad input");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--crash-consistent"), "{err}");
    assert!(env.snapshot_names("db").is_empty());
    assert_eq!(env.domain_state("db"), "running");
    env.run(&["domain", "pause", "db"]);
    assert!(
        env.qemu_tags("db")[0].1.is_empty(),
        "nothing reached the disk"
    );
    env.run(&["domain", "unpause", "db"]);

    env.run(&["create", "db", "crash", "--disk-only", "--crash-consistent"]);
    let info = env.json(&["info", "db", "crash"]);
    assert_eq!(info["crash_consistent"], true);
    assert_eq!(info["kind"], "disk-only");
    assert_eq!(info["memory_image"], Value::Null);
    assert_eq!(env.domain_state("db"), "running");

    env.run(&["domain", "shutdown", "db"]);
    let at_shutdown = env.disk_counter("db");
    env.run(&["create", "db", "offline", "--disk-only"]);
    env.assert_consistent("db");
    let info = env.json(&["info", "db", "offline"]);
    assert_eq!(info["kind"], "disk-only");
    assert_eq!(info["domain_state"], "shutoff");
    assert_eq!(info["crash_consistent"], false);

    // Change the disk, then revert: the domain ends shut off with the disk as it was.
    env.run(&["domain", "start", "db"]);
    env.wait_counter("db", 20);
    env.run(&["revert", "db", "offline"]);
    assert_eq!(env.domain_state("db"), "shutoff");
    assert_eq!(env.disk_counter("db"), at_shutdown);
    env.assert_consistent("db");

    // A shut-off domain without --disk-only still gets a disk-only snapshot: it has no memory.
    env.run(&["create", "db", "auto"]);
    assert_eq!(env.json(&["info", "db", "auto"])["kind"], "disk-only");
    env.assert_consistent("db");
}

#[test]
fn delete_reparents_children_and_children_flag_deletes_a_subtree() {
    let env = Env::new();
    env.define("app", "8M", &["32M", "32M"]);
    for name in ["a", "b", "c"] {
        env.run(&["create", "app", name]);
    }
    env.run(&["revert", "app", "a"]);
    env.run(&["create", "app", "d"]);
    // a ─┬─ b ── c
    //    └─ d (current)
    env.run(&["delete", "app", "b"]);
    let c = env.json(&["info", "app", "c"]);
    assert_eq!(c["parent"], "a", "c moves to b's parent");
    env.assert_consistent("app");
    let tree = env.run(&["list", "app", "--tree"]);
    assert!(tree.contains("└── d (disk-only)  <- current"), "{tree}");

    // The catalog is a projection of the journal: rebuilt from the events, it is the same.
    let list = env.json(&["list", "app"]);
    env.run(&["verify", "--rebuild"]);
    assert_eq!(env.json(&["list", "app"]), list);

    env.run(&["delete", "app", "a", "--children"]);
    assert!(env.snapshot_names("app").is_empty());
    for (_, tags) in env.qemu_tags("app") {
        assert!(tags.is_empty(), "{tags:?}");
    }
    env.assert_consistent("app");
}

#[test]
fn second_checkpoint_of_an_unchanged_domain_stores_almost_nothing() {
    let env = Env::new();
    env.define("mem", "64M", &["16M"]);
    // Give the domain 64 MiB of incompressible memory (its counter starts at 0).
    let path = env.memory_path("mem");
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..64 {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&0u64.to_le_bytes()).unwrap();
    drop(f);
    env.run(&["domain", "start", "mem", "--paused"]);
    env.run(&["create", "mem", "first"]);
    env.run(&["create", "mem", "second"]);
    let history = env.json(&["history", "mem"]);
    let creates: Vec<&Value> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "create")
        .collect();
    let save = |i: usize| -> (u64, u64) {
        let op = creates[i];
        assert_eq!(op["outcome"], "committed");
        let step = op["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "save-memory")
            .unwrap();
        (
            step["bytes_read"].as_u64().unwrap(),
            step["bytes_new"].as_u64().unwrap(),
        )
    };
    let (read1, new1) = save(0);
    let (read2, new2) = save(1);
    assert_eq!(read1, 64 << 20);
    assert_eq!(read2, 64 << 20);
    assert!(
        new1 > 60 << 20,
        "first checkpoint stores the memory: {new1}"
    );
    assert!(
        new2 < 1 << 20,
        "second checkpoint stores almost nothing: {new2}"
    );
    env.assert_consistent("mem");
    // Both snapshots share chunks; deleting one keeps the other restorable.
    env.run(&["delete", "mem", "first"]);
    env.run(&["gc"]);
    env.run(&["revert", "mem", "second"]);
    env.assert_consistent("mem");
}

#[test]
fn history_records_every_step_with_outcomes() {
    let env = Env::new();
    env.running_domain("h", "16M", &["32M"]);
    env.run(&["create", "h", "one"]);
    env.run(&["revert", "h", "one"]);
    env.run(&["delete", "h", "one"]);
    let ops = env.json(&["history", "h"]);
    let ops = ops.as_array().unwrap();
    assert_eq!(ops.len(), 5);
    let kinds: Vec<&str> = ops.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    // The domain commands that set the domain up are operations too.
    assert_eq!(kinds, ["define", "start", "create", "revert", "delete"]);
    for op in ops {
        for key in [
            "id", "kind", "domain", "snapshot", "started", "ended", "outcome", "steps",
        ] {
            assert!(op.get(key).is_some(), "history lacks {key}");
        }
        assert_eq!(op["outcome"], "committed");
        let user = op["user"].as_str().unwrap();
        assert!(
            !user.is_empty() && user != "unknown",
            "who ran it: {user:?}"
        );
        for step in op["steps"].as_array().unwrap() {
            assert_eq!(step["outcome"], "done", "{step}");
            for key in ["name", "started", "ended", "outcome"] {
                assert!(step.get(key).is_some(), "step lacks {key}");
            }
        }
    }
    let steps: Vec<&str> = ops[2]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["save-memory", "snapshot-disk:xvda", "resume"]);
    let revert: Vec<&str> = ops[3]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        revert,
        [
            "verify-image",
            "stop-domain",
            "revert-disk:xvda",
            "restore-memory",
            "set-run-state"
        ]
    );
    // Filters.
    let id = ops[3]["id"].as_u64().unwrap().to_string();
    assert_eq!(
        env.json(&["history", "--op", &id])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        env.json(&["history", "nosuch"]).as_array().unwrap().len(),
        0
    );
    assert_eq!(
        env.json(&["history", "--since", "2999-01-01T00:00:00Z"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let text = env.run(&["history"]);
    assert!(text.contains("save-memory"), "{text}");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let env = Env::new();
    env.define("vm", "8M", &["16M"]);
    env.run(&["create", "vm", "ok"]);
    let before = env.json(&["history"]);
    for (args, needle) in [
        (vec!["create", "vm", "../../etc"], "snapshot name"),
        (vec!["create", "vm", ".hidden"], "starts with '.'"),
        (vec!["create", "vm", "a/b"], "contains '/'"),
        (vec!["create", "vm", "ok"], "already has a snapshot"),
        (vec!["create", "nosuch", "x"], "no domain named"),
        (vec!["create", "../vm", "x"], "domain name"),
        (vec!["revert", "vm", "missing"], "no snapshot named"),
        (vec!["delete", "vm", "missing"], "no snapshot named"),
        (
            vec!["revert", "vm", "ok", "--running", "--paused"],
            "cannot be used with",
        ),
        (vec!["domain", "define", "x/y", "--memory", "8M"], "name"),
        (
            vec!["domain", "define", "z", "--memory", "8Q"],
            "unknown unit",
        ),
        (vec!["history", "--since", "whenever"], "--since"),
    ] {
        let out = env.try_run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let long = "x".repeat(65);
    assert_eq!(env.try_run(&["create", "vm", &long]).status.code(), Some(2));
    assert_eq!(env.json(&["history"]), before, "nothing journaled");
    assert_eq!(env.snapshot_names("vm").len(), 1);
    env.assert_consistent("vm");
    assert!(!env.state().join("etc").exists());
    // Errors in --json mode are JSON too.
    let out = env.try_run(&["--json", "revert", "vm", "missing"]);
    let v: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert!(v["error"].as_str().unwrap().contains("missing"));
    assert_eq!(v["exit_code"], 2);
}

#[test]
fn domain_info_json_and_secret_memory_files() {
    let env = Env::new();
    env.running_domain("sec", "16M", &["32M", "32M"]);
    let info = env.domain_info("sec");
    assert_eq!(info["name"], "sec");
    assert_eq!(info["state"], "running");
    assert_eq!(info["memory"]["bytes"], 16 << 20);
    let disks = info["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["target"], "xvda");
    assert_eq!(disks[1]["target"], "xvdb");
    assert_eq!(disks[0]["format"], "qcow2");
    env.run(&["create", "sec", "s"]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.memory_path("sec")), 0o600);
    let mut packs = 0;
    for entry in walk(&env.state().join("memory")) {
        if entry.is_file() {
            assert_eq!(mode(&entry), 0o600, "{}", entry.display());
            packs += 1;
        }
    }
    assert!(packs > 0, "the memory image is stored");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn demo_runs_and_passes_its_checks() {
    let out = std::process::Command::new(EXE)
        .arg("demo")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("demo finished: every check passed"), "{text}");
}

#[test]
fn a_damaged_memory_image_aborts_the_revert_before_the_domain_is_touched() {
    let env = Env::new();
    env.running_domain("v", "16M", &["32M"]);
    // Incompressible memory, so the image has stored chunks to damage.
    env.run(&["domain", "pause", "v"]);
    let path = env.memory_path("v");
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    let noise: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    f.write_all(&noise).unwrap();
    drop(f);
    env.run(&["create", "v", "cp"]);
    env.run(&["domain", "unpause", "v"]);
    env.wait_counter("v", 20);
    // Flip one byte in the middle of the largest pack file.
    let pack = walk(&env.state().join("memory"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let len = std::fs::metadata(&pack).unwrap().len();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut byte = [0u8; 1];
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    std::io::Read::read_exact(&mut f, &mut byte).unwrap();
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    f.write_all(&[byte[0] ^ 0x40]).unwrap();
    drop(f);

    let before = env.memory_counter("v");
    let out = env.try_run(&["revert", "v", "cp"]);
    assert_eq!(out.status.code(), Some(6), "damaged stored state");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("verify-image") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(
        env.domain_state("v"),
        "running",
        "the domain was not touched"
    );
    assert!(
        env.wait_counter("v", 10) > before,
        "it runs on from where it was"
    );
    let op = env
        .json(&["history", "v"])
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(op["kind"], "revert");
    assert_eq!(op["outcome"], "rolled-back");
    // verify --deep names the damage.
    let out = env.try_run(&["verify", "--deep"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout).contains("memory:"));
}

/// Every qcow2 file in the directory of `path`.
fn qcow2_files(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = walk(path.parent().unwrap())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    v.sort();
    v
}

#[test]
fn external_snapshots_revert_and_delete_at_every_position_of_a_chain() {
    let env = Env::new();
    env.running_domain("ext", "16M", &["32M"]);
    let mut instants = Vec::new();
    for i in 0..5 {
        env.run(&["domain", "pause", "ext"]);
        let at = (env.memory_counter("ext"), env.disk_counter("ext"));
        env.run(&["create", "ext", &format!("s{i}"), "--external"]);
        assert_eq!(env.domain_state("ext"), "paused");
        instants.push(at);
        env.run(&["domain", "unpause", "ext"]);
        env.wait_counter("ext", 20);
    }
    // The disk now has a chain of six images; frozen images never change.
    let current = env.disk_paths("ext")[0].1.clone();
    let info = env.json(&["info", "ext", "s2"]);
    assert!(info["disks"][0]["tag"]
        .as_str()
        .unwrap()
        .ends_with(".qcow2"));
    let frozen2 = std::path::PathBuf::from(info["disks"][0]["path"].as_str().unwrap());
    assert_eq!(disk_u64(&frozen2), instants[2].1);
    assert_eq!(qcow2_files(&current).len(), 6);
    // Snapshots of one domain are all internal or all external.
    let out = env.try_run(&["create", "ext", "internal"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("external"));

    // Revert to every position.
    for (i, at) in instants.iter().enumerate().rev() {
        env.run(&["revert", "ext", &format!("s{i}")]);
        assert_eq!(env.domain_state("ext"), "paused", "s{i}");
        assert_eq!(
            (env.memory_counter("ext"), env.disk_counter("ext")),
            *at,
            "s{i}"
        );
        env.assert_consistent("ext");
        env.run(&["domain", "unpause", "ext"]);
        env.wait_counter("ext", 10);
    }
    // Discarded branches are removed: the chain plus one active overlay remain.
    assert_eq!(qcow2_files(&current).len(), 6);

    // Delete in the middle, at the bottom and at the top (the image the running domain's
    // overlay is backed by), then every remaining snapshot still reverts exactly.
    for name in ["s2", "s0", "s4"] {
        env.run(&["delete", "ext", name]);
        assert_eq!(
            env.domain_state("ext"),
            "running",
            "delete leaves the domain running"
        );
        env.run(&["domain", "pause", "ext"]);
        env.assert_consistent("ext");
        env.run(&["domain", "unpause", "ext"]);
    }
    assert!(!frozen2.exists(), "the deleted snapshot's image is gone");
    for i in [1usize, 3] {
        env.run(&["revert", "ext", &format!("s{i}"), "--paused"]);
        assert_eq!(
            (env.memory_counter("ext"), env.disk_counter("ext")),
            instants[i],
            "s{i} after deletes"
        );
        env.assert_consistent("ext");
    }
    assert_eq!(
        qcow2_files(&current).len(),
        3,
        "two snapshots and the active overlay"
    );
    for f in qcow2_files(&current) {
        qemu_img_check(&f);
    }
}

#[test]
fn verify_disks_checks_images_of_shut_off_domains_and_repairs_leaks_only() {
    let env = Env::new();
    env.running_domain("chk", "8M", &["32M", "32M"]);
    env.run(&["create", "chk", "one"]);
    let out = env.run(&["verify", "--disks"]);
    assert!(out.contains("not checked, the domain is running"), "{out}");
    env.run(&["domain", "shutdown", "chk"]);
    let out = env.run(&["verify", "--disks"]);
    assert_eq!(out.matches(": clean").count(), 2, "{out}");
    let out = env.run(&["verify", "--disks", "--repair", "chk"]);
    assert_eq!(out.matches(": no leaks").count(), 2, "{out}");
    let v = env.json(&["verify", "--disks"]);
    assert_eq!(v["ok"], true);
    // --repair without --disks is a usage error.
    assert_eq!(env.try_run(&["verify", "--repair"]).status.code(), Some(2));
}
