//! Randomized torture: random operations on several simulated domains, killed at random
//! moments and at random failpoints, recovery killed too, and every invariant checked after
//! every round (see `torture/check.rs`).
//!
//! Several independent state directories ("worlds") run side by side, each from its own
//! seed, printed at the start; `SEED=<seed> TORTURE_WORLDS=1` replays one world.
//! `TORTURE_ROUNDS` sets the number of rounds in all (default 300), `TORTURE_WORLDS` the
//! number of worlds (default 3), `TORTURE_VERBOSE=1` prints every round as it runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "torture/mod.rs"]
mod harness;

use std::sync::atomic::{AtomicBool, Ordering};

use harness::rng::seed_from_env;
use harness::rng::Rng;
use harness::{check, ops, World};

/// Rounds per state directory: a new one (fresh domains, empty journal) after this many,
/// so the journal's history stays short enough to read after every round.
const ROUNDS_PER_WORLD: u64 = 100;

/// Writes a line to the test process's stderr even when the harness captures output, so
/// that every run's seeds show in the log, passed or failed.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

/// Runs `rounds` rounds from `seed`; `Err` with the seed and the recent log on the first
/// broken invariant.
fn torture(seed: u64, rounds: u64, stop: &AtomicBool) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let mut world = World::new();
    let mut done_in_world = 0;
    let mut known = std::collections::BTreeMap::new();
    for n in 1..=rounds {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if done_in_world == ROUNDS_PER_WORLD {
            for (name, k) in std::mem::take(&mut world.known) {
                *known.entry(name).or_insert(0) += k;
            }
            world = World::new();
            done_in_world = 0;
        }
        let result = ops::round(&mut world, &mut rng, n).and_then(|()| check::check(&mut world));
        if let Err(problem) = result {
            stop.store(true, Ordering::Relaxed);
            return Err(format!(
                "torture seed {seed}: round {n} broke an invariant:\n{problem}\n\nlast rounds:\n{}\n\
                 replay: SEED={seed} TORTURE_WORLDS=1 TORTURE_ROUNDS={n} cargo test --release \
                 --features domsnap/failpoints,domsnap/xen -p domsnap --test torture",
                world.tail(40)
            ));
        }
        done_in_world += 1;
    }
    for (name, k) in std::mem::take(&mut world.known) {
        *known.entry(name).or_insert(0) += k;
    }
    for (name, k) in &known {
        say(&format!(
            "torture seed {seed}: known defect {name} met {k} times"
        ));
    }
    Ok(())
}

#[test]
fn random_operations_killed_at_random_moments_keep_every_invariant() {
    let seed = seed_from_env();
    let rounds = env_number("TORTURE_ROUNDS", 300);
    let worlds = env_number("TORTURE_WORLDS", 3).max(1);
    let stop = AtomicBool::new(false);
    let results: Vec<(u64, u64, Result<(), String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..worlds)
            .map(|k| {
                let world_seed = seed.wrapping_add(k);
                let share = rounds / worlds + u64::from(k < rounds % worlds);
                say(&format!(
                    "torture world {k}: seed {world_seed}, {share} rounds"
                ));
                let stop = &stop;
                s.spawn(move || (world_seed, share, torture(world_seed, share, stop)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failures = Vec::new();
    for (world_seed, share, result) in results {
        match result {
            Ok(()) => say(&format!("torture seed {world_seed}: {share} rounds passed")),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
