//! An answer that an operation is already done must survive a power cut: recovery acts on
//! "this snapshot exists" or "it is already gone" and records the step as done. Runs on a
//! FUSE file system that keeps only what was synced (`testfs`): needs /dev/fuse and root;
//! elsewhere it skips, except with `CI=true`, where it fails.
#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"))
}

fn mounted() -> Option<(tempfile::TempDir, testfs::TestFs)> {
    if let Err(why) = testfs::available() {
        assert!(!ci(), "CI=true: the power-cut test cannot run here: {why}");
        eprintln!("skipped: {why}");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = testfs::TestFs::mount(dir.path()).unwrap();
    Some((dir, fs))
}

/// A durable image with no snapshot.
fn durable_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("d.qcow2");
    disk::create_image(&img, 1 << 20, Some(4096)).unwrap();
    std::fs::File::open(&img).unwrap().sync_all().unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
    img
}

fn names(img: &Path) -> Vec<String> {
    disk::list_snapshots(img)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect()
}

/// A create whose header was written but never synced, then a delete that synced its new
/// clusters (and with them the create's header) but not its own header: the image reads
/// "no snapshot" while the durable image holds it. The next delete answers "no such
/// snapshot"; after a power cut the snapshot must still be gone.
#[test]
fn no_such_snapshot_is_durable() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((_dir, mut fs)) = mounted() else {
        return;
    };
    let img = durable_image(fs.path());
    fail::cfg("disk::internal::sync_header", "return").unwrap();
    let created = disk::create_snapshot(&img, "s@1");
    let deleted = disk::delete_snapshot(&img, "s@1");
    fail::cfg("disk::internal::sync_header", "off").unwrap();
    assert!(
        matches!(created, Err(disk::Error::FailPoint(_))),
        "{created:?}"
    );
    assert!(
        matches!(deleted, Err(disk::Error::FailPoint(_))),
        "{deleted:?}"
    );
    assert!(names(&img).is_empty());
    let again = disk::delete_snapshot(&img, "s@1");
    assert!(
        matches!(again, Err(disk::Error::NoSuchSnapshot { .. })),
        "{again:?}"
    );
    fs.power_cut(&[]).unwrap();
    assert_eq!(
        names(&img),
        Vec::<String>::new(),
        "the deleted snapshot came back"
    );
}

/// A create whose header was written but never synced: the next create answers "exists";
/// after a power cut the snapshot must still exist.
#[test]
fn snapshot_exists_is_durable() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((_dir, mut fs)) = mounted() else {
        return;
    };
    let img = durable_image(fs.path());
    fail::cfg("disk::internal::sync_header", "return").unwrap();
    let created = disk::create_snapshot(&img, "s@1");
    fail::cfg("disk::internal::sync_header", "off").unwrap();
    assert!(
        matches!(created, Err(disk::Error::FailPoint(_))),
        "{created:?}"
    );
    let again = disk::create_snapshot(&img, "s@1");
    assert!(
        matches!(again, Err(disk::Error::SnapshotExists { .. })),
        "{again:?}"
    );
    fs.power_cut(&[]).unwrap();
    assert_eq!(
        names(&img),
        vec!["s@1".to_string()],
        "the snapshot was lost"
    );
}
