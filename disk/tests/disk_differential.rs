//! Differential tests against qemu-img: seeded random sequences of writes (plain,
//! compressed, zero, through DataImage) and snapshot create/apply/delete, each done at random
//! by this crate or by qemu-img; after every step qemu-img check is clean, the content equals
//! the model, and both tools list the same snapshots.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/diff.rs"]
mod diff;
use common::*;
use diff::Sim;

const MIB: u64 = 1 << 20;

fn random_run(cs: u64, size: u64, steps: u64, seed: u64, ours_created: bool) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    if ours_created {
        disk::create_image(&img, size, Some(cs as u32)).unwrap();
    } else {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            s(&img),
            &size.to_string(),
        ]);
    }
    let mut sim = Sim::new(img, dir.path(), size, cs, seed);
    for _ in 0..steps {
        sim.step();
    }
    sim.verify_all_snapshots();
}

#[test]
fn random_4k_clusters() {
    random_run(4096, 2 * MIB, 60, 1, true);
}

#[test]
fn random_64k_clusters() {
    random_run(65536, 8 * MIB, 60, 2, false);
}

#[test]
fn random_2m_clusters() {
    random_run(2 * MIB, 16 * MIB, 40, 3, true);
}

#[test]
fn random_512b_clusters() {
    random_run(512, MIB, 40, 4, false);
}

#[test]
fn hundred_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.qcow2");
    let size = 4 * MIB;
    disk::create_image(&img, size, Some(65536)).unwrap();
    let mut sim = Sim::new(img, dir.path(), size, 65536, 5);
    for i in 0..100 {
        sim.write();
        if i % 7 == 0 {
            sim.write_compressed();
        }
        sim.create(i % 3 != 0);
    }
    sim.verify();
    assert_eq!(disk::list_snapshots(&sim.img).unwrap().len(), 100);
    for _ in 0..10 {
        let ours = sim.rng.chance(50);
        sim.apply(ours);
        sim.verify();
        sim.write();
        sim.verify();
    }
    for _ in 0..50 {
        let ours = sim.rng.chance(50);
        sim.delete(ours);
    }
    sim.verify();
    sim.verify_all_snapshots();
}

/// Longer exploration: `DISK_DIFF_SEEDS=100 cargo test -p disk --release -- --ignored`.
#[test]
#[ignore]
fn random_many_seeds() {
    let n: u64 = std::env::var("DISK_DIFF_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for seed in 100..100 + n {
        let cs = [512, 4096, 16384, 65536, 2 * MIB][(seed % 5) as usize];
        let size = (cs * 64).clamp(MIB, 16 * MIB);
        random_run(cs, size, 80, seed, seed % 2 == 0);
    }
}
