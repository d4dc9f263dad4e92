//! Crash tests: the `domsnap` process is killed (a failpoint aborts it, as `kill -9` would)
//! at every step boundary of every operation. The next `domsnap` command must recover:
//! afterwards no operation is open, the catalog, the qcow2 snapshot tables and the memory
//! store agree (`verify --deep`, `qemu-img check`, `qemu-img snapshot -l`), and the domain
//! is in the run state the rules promise.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Runs `args` with failpoint `fp` set to abort; the process must die of it.
fn crash(env: &Env, args: &[&str], fp: &str) {
    let out = env
        .cmd(args)
        .env("FAILPOINTS", format!("{fp}=return"))
        .output()
        .unwrap();
    assert!(
        out.status.code().is_none(),
        "{args:?} with {fp} did not crash: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The last snapshot operation (the `domain` commands the checks run are operations too).
fn last_op(env: &Env) -> Value {
    let h = env.json(&["history"]);
    h.as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|o| ["create", "revert", "delete"].contains(&o["kind"].as_str().unwrap()))
        .unwrap()
        .clone()
}

/// After recovery: nothing open, everything consistent, state as expected.
fn check_recovered(env: &Env, domain: &str, state: &str) -> Value {
    // Readers never recover (they show the interrupted operation as open); the next command
    // that writes does, `recover` among them.
    env.json(&["recover"]);
    let history = env.json(&["history"]);
    for op in history.as_array().unwrap() {
        assert_ne!(op["outcome"], "open", "operation left open: {op}");
    }
    assert_eq!(env.domain_state(domain), state, "run state after recovery");
    let running = state == "running";
    if running {
        env.run(&["domain", "pause", domain]);
    }
    env.assert_consistent(domain);
    if running {
        env.run(&["domain", "unpause", domain]);
    }
    last_op(env)
}

#[test]
fn create_killed_at_every_step_is_rolled_back_or_forward() {
    let cases: &[(&str, &str)] = &[
        ("engine::create::after-begin", "rolled-back"),
        ("engine::create::before-save-memory", "rolled-back"),
        ("engine::create::save-memory-ingested", "rolled-back"),
        ("engine::create::after-save-memory", "rolled-back"),
        ("engine::create::before-snapshot-disk", "rolled-back"),
        ("engine::create::after-snapshot-disk", "rolled-back"),
        (
            "1*off->return|engine::create::after-snapshot-disk",
            "rolled-forward",
        ),
        ("engine::create::before-resume", "rolled-forward"),
        ("engine::create::after-resume", "rolled-forward"),
        ("engine::create::before-commit", "rolled-forward"),
    ];
    for (external, (fp, outcome)) in [false, true]
        .into_iter()
        .flat_map(|e| cases.iter().map(move |c| (e, c)))
    {
        let kind: &[&str] = if external { &["--external"] } else { &[] };
        let create = |name: &'static str| [&["create", "c", name][..], kind].concat();
        let env = Env::new();
        env.running_domain("c", "16M", &["32M", "32M"]);
        env.run(&create("base"));
        let (name, spec) = match fp.split_once('|') {
            Some((spec, name)) => (name, spec.to_string()),
            None => (*fp, "return".to_string()),
        };
        let out = env
            .cmd(&create("snap"))
            .env("FAILPOINTS", format!("{name}={spec}"))
            .output()
            .unwrap();
        assert!(out.status.code().is_none(), "{fp} did not crash");
        let op = check_recovered(&env, "c", "running");
        assert_eq!(op["outcome"], *outcome, "{fp}: {op}");
        let names = env.snapshot_names("c");
        assert_eq!(
            names.contains("snap"),
            *outcome == "rolled-forward",
            "{fp}: {names:?}"
        );
        assert!(
            op["recovery"].as_str().is_some(),
            "{fp}: recovery is journaled"
        );
        // The domain is usable: a new snapshot and a revert to it work.
        env.run(&create("after"));
        env.run(&["revert", "c", "base"]);
        check_recovered(&env, "c", "running");
    }
}

#[test]
fn a_failed_step_rolls_the_create_back_at_once() {
    let env = Env::new();
    env.running_domain("f", "16M", &["32M", "32M"]);
    env.run(&["create", "f", "base"]);
    // This failpoint makes the memory save fail with an error (not a crash).
    let out = env
        .cmd(&["create", "f", "broken"])
        .env("FAILPOINTS", "engine::memstore::after-pack-sync=return")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("save-memory") && err.contains("rolled back"),
        "{err}"
    );
    let op = check_recovered(&env, "f", "running");
    assert_eq!(op["outcome"], "rolled-back");
    assert!(
        op["recovery"].is_null(),
        "rolled back by itself, not by recovery"
    );
    assert_eq!(
        env.snapshot_names("f").into_iter().collect::<Vec<_>>(),
        ["base"]
    );
    // The half-written pack file is gone; gc has nothing to do with it.
    env.run(&["gc"]);
    env.assert_consistent("f");
}

#[test]
fn disk_only_create_killed_while_paused_resumes_the_domain() {
    for fp in [
        "engine::create::after-pause",
        "engine::create::after-snapshot-disk",
    ] {
        let env = Env::new();
        env.running_domain("p", "8M", &["32M"]);
        crash(
            &env,
            &["create", "p", "d", "--disk-only", "--crash-consistent"],
            fp,
        );
        // The crash left the domain paused. Readers show it as it is, and the open
        // operation as open; the next command that writes recovers first, and the domain
        // runs again.
        assert_eq!(env.domain_state("p"), "paused", "{fp}");
        let h = env.json(&["history"]);
        assert_eq!(h.as_array().unwrap().last().unwrap()["outcome"], "open");
        env.run(&["domain", "list"]);
        assert_eq!(env.domain_state("p"), "paused", "{fp}: a reader recovered");
        let op = check_recovered(&env, "p", "running");
        assert!(op["recovery"].as_str().is_some(), "{fp}: {op}");
        let expected = if fp.ends_with("after-pause") {
            "rolled-back"
        } else {
            "rolled-forward"
        };
        assert_eq!(op["outcome"], expected, "{fp}");
    }
}

#[test]
fn revert_killed_at_every_step_never_leaves_a_half_reverted_domain() {
    let cases: &[(&str, bool)] = &[
        ("engine::revert::after-begin", false),
        ("engine::revert::before-verify-image", false),
        ("engine::revert::after-verify-image", false),
        ("engine::revert::before-stop-domain", true),
        ("engine::revert::after-stop-domain", true),
        ("engine::revert::before-revert-disk", true),
        ("engine::revert::after-revert-disk", true),
        ("engine::revert::before-restore-memory", true),
        ("engine::revert::after-restore-memory", true),
        ("engine::revert::before-set-run-state", true),
        ("engine::revert::after-set-run-state", true),
        ("engine::revert::before-commit", true),
    ];
    let external_cases: &[(&str, bool)] = &[
        ("engine::revert::before-discard-image", true),
        ("engine::revert::after-discard-image", true),
    ];
    let all = cases
        .iter()
        .map(|c| (false, c))
        .chain(cases.iter().chain(external_cases).map(|c| (true, c)));
    for (external, (fp, forward)) in all {
        let env = Env::new();
        env.running_domain("r", "16M", &["32M", "32M"]);
        env.run(&["domain", "pause", "r"]);
        let (m, d) = (env.memory_counter("r"), env.disk_counter("r"));
        if external {
            env.run(&["create", "r", "cp", "--external"]);
        } else {
            env.run(&["create", "r", "cp"]);
        }
        env.run(&["domain", "unpause", "r"]);
        env.wait_counter("r", 30);
        crash(&env, &["revert", "r", "cp"], fp);
        if *forward {
            // Rolled forward: the domain is the checkpoint, paused as it was taken.
            let op = check_recovered(&env, "r", "paused");
            assert_eq!(op["outcome"], "rolled-forward", "{fp}");
            assert_eq!(
                (env.memory_counter("r"), env.disk_counter("r")),
                (m, d),
                "{fp}"
            );
            let current = env.json(&["info", "r", "cp"]);
            assert_eq!(current["current"], true);
        } else {
            // Rolled back: the domain runs on, untouched.
            let op = check_recovered(&env, "r", "running");
            assert_eq!(op["outcome"], "rolled-back", "{fp}");
            assert!(env.memory_counter("r") > m + 10, "{fp}: not reverted");
        }
    }
}

#[test]
fn delete_killed_at_every_step_is_finished() {
    let cases = [
        "engine::delete::after-begin",
        "engine::delete::before-delete-disk",
        "engine::delete::after-delete-disk",
        "engine::delete::before-release-image",
        "engine::delete::after-release-image",
        "engine::delete::before-commit",
    ];
    for (external, fp) in [false, true]
        .into_iter()
        .flat_map(|e| cases.iter().map(move |c| (e, *c)))
    {
        let env = Env::new();
        env.running_domain("d", "16M", &["32M", "32M"]);
        let kind: &[&str] = if external { &["--external"] } else { &[] };
        env.run(&[&["create", "d", "one"][..], kind].concat());
        env.run(&[&["create", "d", "two"][..], kind].concat());
        crash(&env, &["delete", "d", "one"], fp);
        let op = check_recovered(&env, "d", "running");
        assert_eq!(op["outcome"], "rolled-forward", "{fp}");
        assert_eq!(
            env.snapshot_names("d").into_iter().collect::<Vec<_>>(),
            ["two"]
        );
        assert_eq!(env.json(&["info", "d", "two"])["parent"], Value::Null);
        env.run(&["revert", "d", "two"]);
        check_recovered(&env, "d", "running");
    }
}

#[test]
fn a_crash_during_recovery_converges_on_the_next_start() {
    let env = Env::new();
    env.running_domain("x", "16M", &["32M", "32M"]);
    crash(
        &env,
        &["create", "x", "t"],
        "engine::create::after-snapshot-disk",
    );
    // Recovery decides to roll back, then dies while undoing the first disk snapshot.
    crash(
        &env,
        &["recover"],
        "engine::create::before-undo-snapshot-disk",
    );
    crash(
        &env,
        &["domain", "pause", "x"],
        "engine::recover::after-decide",
    );
    let op = check_recovered(&env, "x", "running");
    assert_eq!(op["outcome"], "rolled-back");
    assert!(!env.snapshot_names("x").contains("t"));
}

#[test]
fn a_second_operation_on_a_busy_domain_is_refused_and_readers_still_work() {
    let env = Env::new();
    env.running_domain("b", "16M", &["32M"]);
    env.run(&["create", "b", "first"]);
    let mut slow = env
        .cmd(&["create", "b", "slow"])
        .env(
            "FAILPOINTS",
            "engine::create::before-snapshot-disk=sleep(4000)",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the slow operation is in its step: readers see it open.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = env.json(&["history", "b"]);
        if h.as_array().unwrap().iter().any(|o| o["outcome"] == "open") {
            break;
        }
        assert!(Instant::now() < deadline, "slow create never showed up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = env.try_run(&["create", "b", "other"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("busy"));
    let out = env.try_run(&["delete", "b", "first"]);
    assert_eq!(out.status.code(), Some(3));
    // Readers work beside the writer.
    assert!(env.snapshot_names("b").contains("first"));
    assert!(slow.wait().unwrap().success());
    let names = env.snapshot_names("b");
    assert!(
        names.contains("slow") && !names.contains("other"),
        "{names:?}"
    );
    check_recovered(&env, "b", "running");
}

#[test]
fn recover_reports_what_it_recovered_on_opening() {
    let env = Env::new();
    env.running_domain("r", "16M", &["32M"]);
    crash(
        &env,
        &["create", "r", "s"],
        "engine::create::after-snapshot-disk",
    );
    // Every data step had finished: the writer's opening rolls the create forward before
    // `recover` looks for open operations, and the report still names it.
    let report = env.json(&["recover"]);
    let ops = report.as_array().unwrap();
    assert_eq!(ops.len(), 1, "{report}");
    assert_eq!(ops[0]["kind"], "create", "{report}");
    assert_eq!(ops[0]["snapshot"], "s", "{report}");
    assert_eq!(ops[0]["decision"], "forward", "{report}");
    assert_eq!(ops[0]["open"], false, "{report}");
    // Nothing is left: a second recover has nothing to say.
    assert_eq!(env.json(&["recover"]), serde_json::json!([]));
}
