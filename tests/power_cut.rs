//! Power cuts: the state directory (journal, memory packs, the simulated host's disks and
//! memory) lives on a test file system that keeps only what was synced; at a random moment
//! of a random operation (or of its recovery) the power goes: every process using the file
//! system dies and every unsynced write is lost. The next command must recover, and the
//! invariants of the torture checker (`torture/check.rs`) must hold after every round.
//!
//! Each run prints its seed; `SEED=<seed>` replays it. `POWER_CUT_ROUNDS` sets the number of
//! rounds (default 40). Needs /dev/fuse and root: elsewhere it skips, except with `CI=true`,
//! where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "torture/mod.rs"]
mod harness;

use harness::rng::{seed_from_env, Rng};
use harness::{check, ops, World};

#[test]
fn power_cuts_at_random_moments_keep_every_invariant() {
    if let Err(why) = testfs::available() {
        assert!(
            !common::ci(),
            "CI=true: the power-cut test cannot run here: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let seed = seed_from_env();
    let rounds: u64 = std::env::var("POWER_CUT_ROUNDS")
        .ok()
        .map(|s| s.parse().expect("POWER_CUT_ROUNDS is a number"))
        .unwrap_or(40);
    eprintln!("power-cut seed {seed}, {rounds} rounds");
    let mut rng = Rng::new(seed);
    let mut world = World::on_testfs();
    for n in 1..=rounds {
        let result = ops::round(&mut world, &mut rng, n).and_then(|()| check::check(&mut world));
        if let Err(problem) = result {
            if let Some(fs) = &world.fs {
                let m = fs.model();
                eprintln!("the file system now:\n{}\n", m.listing(false).join("\n"));
            }
            panic!(
                "power-cut seed {seed}: round {n} broke an invariant:\n{problem}\n\nlast rounds:\n{}\n\
                 replay: SEED={seed} POWER_CUT_ROUNDS={n} cargo test --release \
                 --features domsnap/failpoints,domsnap/xen -p domsnap --test power_cut",
                world.tail(40)
            );
        }
    }
    let cuts = world.fs.as_ref().map_or(0, |f| f.cuts());
    assert!(cuts > 0, "no power cut happened in {rounds} rounds");
    for (name, k) in &world.known {
        eprintln!("power-cut seed {seed}: known defect {name} met {k} times");
    }
    eprintln!("power-cut seed {seed}: {rounds} rounds, {cuts} power cuts, every invariant held");
}
