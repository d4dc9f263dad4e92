//! `kill -9` of an export at different moments: the bundle that was there stays whole (its
//! descriptor is replaced only once everything the new one names is durable), and the next
//! export completes and reads back exactly.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bundle::SnapshotInfo;
use store::LocalStore;

const CHILD: &str = "BUNDLE_CRASH_TEST_DEST";
const CHILD_SEED: &str = "BUNDLE_CRASH_TEST_SEED";

fn info() -> SnapshotInfo {
    SnapshotInfo {
        name: "s1".into(),
        description: String::new(),
        created: 1,
        kind: "checkpoint".into(),
        crash_consistent: false,
        run_state: "running".into(),
        memory_size: 0,
    }
}

/// 128 MiB of distinct pages (four packs), different for each seed.
fn memory(seed: u64) -> Vec<u8> {
    let mut m = vec![0u8; 128 << 20];
    for (k, w) in m.chunks_mut(8).enumerate() {
        w.copy_from_slice(&(k as u64 ^ (seed << 40)).to_le_bytes());
    }
    m
}

fn export(dest: &Path, seed: u64) {
    let store = LocalStore::open(dest, false).unwrap();
    let mem = memory(seed);
    let mut r: &[u8] = &mem;
    bundle::export(&store, "web", info(), Some(&mut r), &[], "h").unwrap();
}

/// The seed of the memory image the bundle at `dest` holds, checked byte for byte.
fn imported_seed(dest: &Path, seeds: &[u64]) -> u64 {
    let store = LocalStore::open(dest, true).unwrap();
    let mut b = bundle::open(&store, "web", "s1").unwrap();
    let mut got = Vec::new();
    b.read_memory(&mut got).unwrap();
    *seeds
        .iter()
        .find(|s| got == memory(**s))
        .expect("the bundle holds one whole export")
}

/// Run as a child process by the test below: exports the seed `CHILD_SEED` into the
/// destination named by `CHILD`, then waits to be killed.
#[test]
fn child_export() {
    if let Some(dest) = std::env::var_os(CHILD) {
        let seed = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
        export(Path::new(&dest), seed);
        std::thread::sleep(Duration::from_secs(600));
    }
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[test]
fn an_export_killed_at_any_moment_leaves_the_previous_bundle_whole() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    export(&dest, 1);
    // Kill once the child has written k packs (0: at once), or after its descriptor (5).
    // Each round exports other pages, so that every pack it writes is new.
    for k in [0usize, 1, 2, 4, 5] {
        let seed = 10 + k as u64;
        let packs_before = count(&dest.join("packs"));
        let descriptor = dest.join("bundles/web/s1");
        let inode = |p: &Path| std::fs::metadata(p).map(|m| m.ino()).ok();
        let old_descriptor = inode(&descriptor);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_export", "--nocapture"])
            .env(CHILD, &dest)
            .env(CHILD_SEED, seed.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let written = count(&dest.join("packs")) - packs_before;
            let done = inode(&descriptor) != old_descriptor;
            if (k < 5 && written >= k) || (k == 5 && done) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the child export made no progress"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Whichever export's descriptor is there, its bundle is whole.
        let found = imported_seed(&dest, &[1, seed]);
        if k == 5 {
            assert_eq!(found, seed, "the finished export is visible");
        }
        // The next export completes, whatever was left behind.
        export(&dest, 1);
        assert_eq!(imported_seed(&dest, &[1]), 1);
    }
}
