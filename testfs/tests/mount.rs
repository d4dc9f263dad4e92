//! The test file system mounted for real: ordinary system calls, a power cut that kills the
//! processes using it and drops what they did not sync, injected errors.
//!
//! Needs /dev/fuse and root. Elsewhere these tests skip, except with `CI=true`, where a test
//! that cannot reach its real component fails.
#![allow(clippy::unwrap_used)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use testfs::{Fault, FaultOn, TestFs};

fn mounted() -> Option<(tempfile::TempDir, TestFs)> {
    if let Err(why) = testfs::available() {
        let ci = std::env::var("CI")
            .is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"));
        if ci {
            panic!("CI=true: the FUSE test file system cannot run here: {why}");
        }
        eprintln!("skipped: {why}");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = TestFs::mount(dir.path()).unwrap();
    Some((dir, fs))
}

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

fn read(p: &Path) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    File::open(p).ok()?.read_to_end(&mut v).unwrap();
    Some(v)
}

#[test]
fn a_power_cut_keeps_exactly_what_was_synced() {
    let Some((_dir, mut fs)) = mounted() else {
        return;
    };
    let root = fs.path().to_path_buf();
    std::fs::create_dir(root.join("journal")).unwrap();
    sync_dir(&root);
    let synced = root.join("journal/synced");
    let mut f = File::create(&synced).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    sync_dir(&root.join("journal"));
    f.write_all(b" and more").unwrap();
    drop(f);
    let unsynced = root.join("journal/unsynced");
    std::fs::write(&unsynced, b"lost").unwrap();
    std::fs::set_permissions(&synced, std::fs::Permissions::from_mode(0o640)).unwrap();

    // A process that uses the file system dies with the power.
    let mut child = Command::new("sleep")
        .arg("1000")
        .current_dir(root.join("journal"))
        .spawn()
        .unwrap();
    let cut = fs.power_cut(&[]).unwrap();
    assert!(cut.killed.contains(&child.id()), "{cut:?}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(child.wait().unwrap().signal(), Some(9));

    assert_eq!(read(&synced).unwrap(), b"durable");
    assert!(read(&unsynced).is_none());
    let mode = std::fs::metadata(&synced).unwrap().permissions().mode() & 0o777;
    assert_ne!(mode, 0o640, "an unsynced chmod is lost too");
    assert_eq!(fs.cuts(), 1);
}

#[test]
fn injected_errors_reach_the_caller() {
    let Some((_dir, fs)) = mounted() else {
        return;
    };
    let root = fs.path().to_path_buf();
    fs.inject(Fault {
        on: FaultOn::Fsync,
        path: "packs/".into(),
        errno: libc::EIO,
        skip: 0,
        times: 0,
    });
    std::fs::create_dir(root.join("packs")).unwrap();
    let mut f = File::create(root.join("packs/p")).unwrap();
    f.write_all(b"x").unwrap();
    let e = f.sync_all().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    fs.clear_faults();
    f.sync_all().unwrap();

    fs.set_capacity(Some(64 * 1024));
    let mut big = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(root.join("big"))
        .unwrap();
    let e = big.write_all(&vec![7u8; 1 << 20]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
}

#[test]
fn rename_over_and_directory_listing() {
    let Some((_dir, fs)) = mounted() else {
        return;
    };
    let root = fs.path().to_path_buf();
    std::fs::write(root.join("a.tmp"), b"1").unwrap();
    std::fs::write(root.join("a"), b"0").unwrap();
    std::fs::rename(root.join("a.tmp"), root.join("a")).unwrap();
    assert_eq!(read(&root.join("a")).unwrap(), b"1");
    std::fs::create_dir_all(root.join("x/y")).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "x"]);
    assert!(std::fs::remove_dir(root.join("x")).is_err(), "not empty");
    std::fs::remove_dir(root.join("x/y")).unwrap();
    std::fs::remove_dir(root.join("x")).unwrap();
}
