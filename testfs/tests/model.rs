//! The durability rules of the test file system, on the model alone (no FUSE needed): what
//! survives a power cut is exactly what was synced.
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;

use testfs::model::{Model, ROOT};
use testfs::{Fault, FaultOn};

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn content(m: &Model, dir: u64, file: &str) -> Option<Vec<u8>> {
    let a = m.lookup(dir, name(file)).ok()?;
    Some(m.read(a.ino, 0, 1 << 20).unwrap())
}

#[test]
fn unsynced_data_is_lost() {
    let mut m = Model::new();
    let f = m.create(ROOT, name("a"), 0o600, 0, 0).unwrap().ino;
    m.fsync(ROOT).unwrap();
    m.write(f, 0, b"hello").unwrap();
    m.reboot();
    assert_eq!(
        content(&m, ROOT, "a").unwrap(),
        b"",
        "the entry survives, the data not"
    );
}

#[test]
fn synced_data_survives_only_with_a_synced_entry() {
    let mut m = Model::new();
    let f = m.create(ROOT, name("a"), 0o600, 0, 0).unwrap().ino;
    m.write(f, 0, b"hello").unwrap();
    m.fsync(f).unwrap();
    let mut lost = Model::new();
    std::mem::swap(&mut lost, &mut m);
    lost.reboot();
    assert!(
        content(&lost, ROOT, "a").is_none(),
        "no directory fsync: no file"
    );

    let mut m = Model::new();
    let f = m.create(ROOT, name("a"), 0o600, 0, 0).unwrap().ino;
    m.write(f, 0, b"hello").unwrap();
    m.fsync(f).unwrap();
    m.fsync(ROOT).unwrap();
    m.write(f, 5, b" world").unwrap();
    m.reboot();
    assert_eq!(content(&m, ROOT, "a").unwrap(), b"hello");
}

#[test]
fn a_rename_needs_the_directory_synced() {
    let mut m = Model::new();
    let tmp = m.create(ROOT, name("x.tmp"), 0o600, 0, 0).unwrap().ino;
    m.write(tmp, 0, b"new").unwrap();
    m.fsync(tmp).unwrap();
    let old = m.create(ROOT, name("x"), 0o600, 0, 0).unwrap().ino;
    m.write(old, 0, b"old").unwrap();
    m.fsync(old).unwrap();
    m.fsync(ROOT).unwrap();
    m.rename(ROOT, name("x.tmp"), ROOT, name("x"), false)
        .unwrap();
    assert_eq!(content(&m, ROOT, "x").unwrap(), b"new");
    let mut before_sync = Model::new();
    std::mem::swap(&mut before_sync, &mut m);
    before_sync.reboot();
    assert_eq!(content(&before_sync, ROOT, "x").unwrap(), b"old");
    assert_eq!(content(&before_sync, ROOT, "x.tmp").unwrap(), b"new");
}

#[test]
fn a_renamed_file_keeps_its_synced_data_after_the_directory_sync() {
    let mut m = Model::new();
    let tmp = m.create(ROOT, name("x.tmp"), 0o600, 0, 0).unwrap().ino;
    m.write(tmp, 0, b"new").unwrap();
    m.fsync(tmp).unwrap();
    m.rename(ROOT, name("x.tmp"), ROOT, name("x"), false)
        .unwrap();
    m.fsync(ROOT).unwrap();
    m.reboot();
    assert_eq!(content(&m, ROOT, "x").unwrap(), b"new");
    assert!(content(&m, ROOT, "x.tmp").is_none());
}

#[test]
fn unlinked_files_come_back_until_the_directory_is_synced() {
    let mut m = Model::new();
    let f = m.create(ROOT, name("a"), 0o600, 0, 0).unwrap().ino;
    m.write(f, 0, b"data").unwrap();
    m.fsync(f).unwrap();
    m.fsync(ROOT).unwrap();
    m.unlink(ROOT, name("a")).unwrap();
    assert!(content(&m, ROOT, "a").is_none());
    m.reboot();
    assert_eq!(content(&m, ROOT, "a").unwrap(), b"data");
    m.unlink(ROOT, name("a")).unwrap();
    m.fsync(ROOT).unwrap();
    m.reboot();
    assert!(content(&m, ROOT, "a").is_none());
}

#[test]
fn a_new_directory_needs_its_parent_synced_and_its_entries_need_itself() {
    let mut m = Model::new();
    let d = m.mkdir(ROOT, name("d"), 0o700, 0, 0).unwrap().ino;
    let f = m.create(d, name("f"), 0o600, 0, 0).unwrap().ino;
    m.write(f, 0, b"x").unwrap();
    m.fsync(f).unwrap();
    m.fsync(ROOT).unwrap();
    m.reboot();
    let d2 = m.lookup(ROOT, name("d")).unwrap().ino;
    assert_eq!(d2, d, "inode numbers stay");
    assert!(m.lookup(d, name("f")).is_err(), "d itself was never synced");
}

#[test]
fn truncation_and_sparse_reads() {
    let mut m = Model::new();
    let f = m.create(ROOT, name("a"), 0o600, 0, 0).unwrap().ino;
    m.write(f, 10_000, b"tail").unwrap();
    assert_eq!(m.getattr(f).unwrap().size, 10_004);
    let all = m.read(f, 0, 20_000).unwrap();
    assert_eq!(all.len(), 10_004);
    assert!(all[..10_000].iter().all(|b| *b == 0));
    m.setattr(f, None, None, None, Some(10_002), None, None)
        .unwrap();
    m.setattr(f, None, None, None, Some(10_004), None, None)
        .unwrap();
    assert_eq!(&m.read(f, 10_000, 4).unwrap(), b"ta\0\0");
}

#[test]
fn faults_fire_on_matching_paths_after_their_skip() {
    let mut m = Model::new();
    let d = m.mkdir(ROOT, name("journal"), 0o700, 0, 0).unwrap().ino;
    let f = m.create(d, name("000001.log"), 0o600, 0, 0).unwrap().ino;
    let other = m.create(ROOT, name("other"), 0o600, 0, 0).unwrap().ino;
    m.inject(Fault {
        on: FaultOn::Write,
        path: "journal/".into(),
        errno: libc::ENOSPC,
        skip: 1,
        times: 1,
    });
    assert!(m.write(f, 0, b"a").is_ok(), "skipped");
    assert_eq!(m.write(f, 1, b"b"), Err(libc::ENOSPC));
    assert!(m.write(f, 1, b"b").is_ok(), "spent");
    assert!(m.write(other, 0, b"x").is_ok());
    assert_eq!(m.fired.len(), 1);
    assert_eq!(m.fired[0].1, "journal/000001.log");
}

#[test]
fn a_full_disk_refuses_new_blocks() {
    let mut m = Model::new();
    m.capacity = Some(3 * 4096);
    let f = m.create(ROOT, name("a"), 0o600, 0, 0).unwrap().ino;
    m.write(f, 0, &[1u8; 8192]).unwrap();
    assert_eq!(m.write(f, 8192, &[1u8; 8192]), Err(libc::ENOSPC));
    assert!(m.write(f, 0, &[2u8; 100]).is_ok(), "rewriting is fine");
    m.unlink(ROOT, name("a")).unwrap();
    let g = m.create(ROOT, name("b"), 0o600, 0, 0).unwrap().ino;
    assert!(
        m.write(g, 0, &[1u8; 12288]).is_ok(),
        "space freed by unlink"
    );
}

#[test]
fn an_open_unlinked_file_lives_until_closed() {
    let mut m = Model::new();
    let f = m.create(ROOT, name("a"), 0o600, 0, 0).unwrap().ino;
    m.open(f).unwrap();
    m.write(f, 0, b"x").unwrap();
    m.unlink(ROOT, name("a")).unwrap();
    assert_eq!(m.read(f, 0, 1).unwrap(), b"x");
    let n = m.inodes();
    m.release(f);
    assert_eq!(m.inodes(), n - 1);
}

#[test]
fn frozen_refuses_everything() {
    let mut m = Model::new();
    let f = m.create(ROOT, name("a"), 0o600, 0, 0).unwrap().ino;
    m.frozen = true;
    assert_eq!(m.write(f, 0, b"x"), Err(libc::EIO));
    assert_eq!(m.fsync(f), Err(libc::EIO));
    assert!(m.getattr(f).is_err());
    m.reboot();
    assert!(!m.frozen);
}

#[test]
fn a_grow_fault_spares_rewrites_in_place() {
    let mut m = Model::new();
    let f = m.create(ROOT, name("img"), 0o600, 0, 0).unwrap().ino;
    m.write(f, 0, &[0u8; 4096]).unwrap();
    m.inject(Fault {
        on: FaultOn::Grow,
        path: "img".into(),
        errno: libc::ENOSPC,
        skip: 0,
        times: 0,
    });
    assert!(m.write(f, 8, b"counter").is_ok());
    assert_eq!(m.write(f, 65536, b"new cluster"), Err(libc::ENOSPC));
}
