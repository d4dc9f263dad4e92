//! One gate, from the CLI: the `domain` commands are journaled operations under the
//! domain's lock (a domain command never slips past a running create), a domain whose
//! operation needs recovery accepts nothing but `domsnap recover`, and errors map to exit
//! codes by kind.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Waits until `domain` has an operation in progress (seen by a reader; a reader that
/// fails beside the writer is asked again).
fn wait_open(env: &Env, domain: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = env.try_run(&["--json", "history", domain]);
        let open = out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|h| h.as_array().cloned())
                .is_some_and(|ops| ops.iter().any(|o| o["outcome"] == "open"));
        if open {
            return;
        }
        assert!(Instant::now() < deadline, "the slow operation never began");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn outcomes(env: &Env, domain: &str) -> Vec<(String, String)> {
    env.json(&["history", domain])
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap().to_string(),
                o["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_domain_command_during_a_create_is_refused_as_busy() {
    let env = Env::new();
    env.running_domain("d", "16M", &["32M"]);
    // The create stops between saving memory and snapshotting the disk, domain paused.
    let mut slow = env
        .cmd(&["create", "d", "s1"])
        .env(
            "FAILPOINTS",
            "engine::create::before-snapshot-disk=sleep(12000)",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_open(&env, "d");
    for cmd in [
        "unpause", "pause", "destroy", "shutdown", "start", "undefine",
    ] {
        let out = env.try_run(&["domain", cmd, "d"]);
        assert_eq!(out.status.code(), Some(3), "domain {cmd}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("busy") && err.contains("nothing was changed"),
            "{err}"
        );
    }
    let out = env.try_run(&["--json", "domain", "unpause", "d"]);
    let v: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["exit_code"].as_u64()),
        (Some("busy"), Some(3))
    );
    assert_eq!(
        slow.try_wait().unwrap(),
        None,
        "the create ended before the domain commands were tried: the test proved nothing"
    );
    assert!(slow.wait().unwrap().success());
    assert_eq!(env.domain_state("d"), "running");
    // The checkpoint is of one instant: memory and disk counters agree.
    env.run(&["revert", "d", "s1", "--paused"]);
    let (m, disk) = (env.memory_counter("d"), env.disk_counter("d"));
    assert!(disk == m || disk == m + 1, "memory {m}, xvda {disk}");
    env.assert_consistent("d");
}

#[test]
fn a_revert_that_fails_past_its_point_of_no_return_blocks_the_domain_until_recover() {
    let env = Env::new();
    env.running_domain("r", "16M", &["32M"]);
    env.run(&["domain", "pause", "r"]);
    let (m, d) = (env.memory_counter("r"), env.disk_counter("r"));
    env.run(&["create", "r", "cp"]);
    env.run(&["domain", "unpause", "r"]);
    env.wait_counter("r", 20);

    // The memory restore fails after the domain was destroyed and its disk reverted.
    let out = env
        .cmd(&["revert", "r", "cp"])
        .env(
            "FAILPOINTS",
            "engine::revert::before-restore-memory=return(error)",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("domsnap recover"), "{err}");
    assert!(!err.contains("nothing was changed"), "{err}");

    // Nothing else runs on it, and no command's automatic recovery retries it.
    for args in [
        vec!["create", "r", "other"],
        vec!["revert", "r", "cp"],
        vec!["delete", "r", "cp"],
        vec!["domain", "start", "r"],
        vec!["domain", "destroy", "r"],
    ] {
        let out = env.try_run(&args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("domsnap recover") && err.contains("nothing was changed"),
            "{err}"
        );
    }
    assert_eq!(env.domain_state("r"), "shutoff");
    let info = env.domain_info("r");
    assert_eq!(info["unfinished"]["needs_recovery"], true, "{info}");
    assert_eq!(info["unfinished"]["kind"], "revert", "{info}");
    let list = env.try_run(&["list", "r"]);
    assert!(list.status.success());
    assert!(
        String::from_utf8_lossy(&list.stderr).contains("needs recovery"),
        "{list:?}"
    );
    let verify = env.try_run(&["verify"]);
    assert_eq!(verify.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("needs recovery"));
    assert_eq!(
        outcomes(&env, "r").last().unwrap(),
        &("revert".to_string(), "needs-recovery".to_string())
    );

    // `recover` finishes it: the domain is the checkpoint, paused as it was taken.
    env.run(&["recover"]);
    assert_eq!(
        outcomes(&env, "r").last().unwrap(),
        &("revert".to_string(), "rolled-forward".to_string())
    );
    assert_eq!(env.domain_state("r"), "paused");
    assert_eq!((env.memory_counter("r"), env.disk_counter("r")), (m, d));
    env.assert_consistent("r");
    env.run(&["domain", "unpause", "r"]);
}

#[test]
fn domain_commands_show_in_history_and_undefine_keeps_snapshots_safe() {
    let env = Env::new();
    env.define("u", "8M", &["16M"]);
    env.run(&["domain", "start", "u", "--paused"]);
    env.run(&["domain", "unpause", "u"]);
    env.run(&["create", "u", "one"]);
    env.run(&["domain", "pause", "u"]);
    env.run(&["domain", "shutdown", "u"]);
    let out = env.try_run(&["domain", "undefine", "u"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("one") && err.contains("--snapshots") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(env.snapshot_names("u").len(), 1);
    env.run(&["domain", "undefine", "u", "--snapshots"]);
    // Gone, snapshots and all: nothing is listed for a domain nobody knows.
    assert_eq!(env.try_run(&["list", "u"]).status.code(), Some(2));
    let domains = env.json(&["domain", "list"]);
    assert!(domains.as_array().unwrap().iter().all(|d| d["name"] != "u"));
    let kinds: Vec<(String, String)> = outcomes(&env, "u");
    let expected = [
        "define", "start", "unpause", "create", "pause", "shutdown", "undefine",
    ];
    assert_eq!(
        kinds.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        expected
    );
    assert!(kinds.iter().all(|(_, o)| o == "committed"), "{kinds:?}");
    let out = env.try_run(&["domain", "info", "u"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    env.run(&["gc"]);
    let out = env.try_run(&["verify", "--deep"]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_domain_command_killed_at_any_step_is_finished_by_the_next_command_that_writes() {
    for (cmd, fp, state) in [
        ("pause", "engine::pause::after-begin", "paused"),
        ("pause", "engine::pause::before-pause", "paused"),
        ("pause", "engine::pause::after-pause", "paused"),
        ("destroy", "engine::destroy::before-destroy", "shutoff"),
        ("destroy", "engine::destroy::before-commit", "shutoff"),
    ] {
        let env = Env::new();
        env.running_domain("k", "8M", &["16M"]);
        let out = env
            .cmd(&["domain", cmd, "k"])
            .env("FAILPOINTS", format!("{fp}=return"))
            .output()
            .unwrap();
        assert!(out.status.code().is_none(), "{fp} did not crash: {out:?}");
        // Readers recover nothing: the next command that writes finishes it.
        env.run(&["gc"]);
        assert_eq!(env.domain_state("k"), state, "{fp}");
        let last = outcomes(&env, "k").last().unwrap().clone();
        assert_eq!(
            last,
            (cmd.to_string(), "rolled-forward".to_string()),
            "{fp}"
        );
    }
}
