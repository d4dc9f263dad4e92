//! Parser robustness: mutated headers, snapshot tables, L1/refcount tables and random files
//! must give an error (or a valid result), never a panic or a huge allocation. Lengths read
//! from the image are bounded by the file size and the spec's limits, so the small files
//! here can only lead to small allocations.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/diff.rs"]
mod diff;
use common::*;
use diff::Rng;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A small image with two snapshots (one per tool), compressed data, 4 KiB clusters.
fn seed_image(dir: &Path) -> (Vec<u8>, Vec<(u64, u64)>) {
    let img = dir.join("seed.qcow2");
    disk::create_image(&img, 512 * 1024, Some(4096)).unwrap();
    qemu_io(&img, "write -P 0x11 0 64k");
    qemu_img(&["snapshot", "-c", "q", s(&img)]);
    qemu_io(&img, "write -c -P 0x22 128k 4k");
    disk::create_snapshot(&img, "d").unwrap();
    qemu_io(&img, "write -P 0x33 4k 8k");
    let bytes = std::fs::read(&img).unwrap();
    // Regions worth mutating: header, and every table the header points to.
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let be32 = |at: usize| u64::from(u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()));
    let regions = vec![
        (0, 512),
        (be64(64), 512),          // snapshot table
        (be64(40), be32(36) * 8), // active L1
        (be64(48), 512),          // refcount table
    ];
    (bytes, regions)
}

fn exercise(path: &Path) {
    let _ = disk::list_snapshots(path);
    let _ = disk::check(path);
    let _ = disk::backing_file(path);
    let _ = disk::create_snapshot(path, "new");
    let _ = disk::apply_snapshot(path, "q");
    let _ = disk::delete_snapshot(path, "d");
    let _ = disk::repair_leaks(path);
}

#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (seed, regions) = seed_image(dir.path());
    let path = dir.path().join("m.qcow2");
    let mut rng = Rng::new(42);
    let iterations = std::env::var("DISK_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500u64);
    for i in 0..iterations {
        let mut bytes = seed.clone();
        let (start, len) = regions[rng.below(regions.len() as u64) as usize];
        let flips = 1 + rng.below(8);
        for _ in 0..flips {
            let at = (start + rng.below(len.max(1))) as usize % bytes.len();
            match rng.below(4) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.next() as u8,
                2 => bytes[at] = 0xff,
                _ => {
                    // A whole big-endian field at 8-byte alignment.
                    let a = at & !7;
                    if a + 8 <= bytes.len() {
                        let v = [0u64, u64::MAX, 1 << 40, rng.next(), 0x200, 0x1000]
                            [rng.below(6) as usize];
                        bytes[a..a + 8].copy_from_slice(&v.to_be_bytes());
                    }
                }
            }
        }
        if rng.chance(5) {
            bytes.truncate(rng.below(bytes.len() as u64) as usize);
        }
        std::fs::write(&path, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| exercise(&path));
        assert!(r.is_ok(), "iteration {i} panicked");
    }
}

#[test]
fn random_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.qcow2");
    let mut rng = Rng::new(7);
    for i in 0..300 {
        let len = rng.below(16384) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if len >= 104 && rng.chance(80) {
            // Plausible header start so that parsing goes deeper.
            bytes[0..4].copy_from_slice(&0x5146_49fbu32.to_be_bytes());
            bytes[4..8].copy_from_slice(&[0, 0, 0, 2 + rng.below(2) as u8]);
            bytes[20..24].copy_from_slice(&(9 + rng.below(4) as u32).to_be_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| exercise(&path));
        assert!(r.is_ok(), "iteration {i} panicked");
    }
}

#[test]
fn huge_lengths_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let (seed, _) = seed_image(dir.path());
    let path = dir.path().join("h.qcow2");
    // nb_snapshots, l1_size and refcount_table_clusters at their maximum.
    for (at, v) in [
        (60usize, u32::MAX),
        (36, u32::MAX),
        (56, u32::MAX),
        (36, 4 * 1024 * 1024),
    ] {
        let mut bytes = seed.clone();
        bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(disk::check(&path).is_err() || !disk::check(&path).unwrap().is_clean());
        assert!(disk::create_snapshot(&path, "x").is_err());
    }
    // A snapshot entry claiming a 64 KiB name in a file that is much shorter.
    let mut bytes = seed.clone();
    let table = u64::from_be_bytes(bytes[64..72].try_into().unwrap()) as usize;
    bytes[table + 14..table + 16].copy_from_slice(&u16::MAX.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(table as u64 + 100).unwrap();
    f.write_all_at(&[0], 0).unwrap_or(());
    drop(f);
    let mut fixed = std::fs::read(&path).unwrap();
    fixed[0] = 0x51;
    std::fs::write(&path, &fixed).unwrap();
    assert!(matches!(
        disk::list_snapshots(&path),
        Err(disk::Error::Corruption { .. })
    ));
}
