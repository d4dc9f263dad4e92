//! Export → import of bundles on a local directory store: content round-trips exactly
//! (disks compared by qemu-img with the snapshot qemu-img reads), a second export sends only
//! what changed, and damaged or partial bundles are refused naming what is wrong.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use bundle::{DiskSource, Error, SnapshotInfo};
use store::{LocalStore, ObjectStore};

const MIB: u64 = 1 << 20;

fn qemu(args: &[&str]) -> (i32, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn info(name: &str) -> SnapshotInfo {
    SnapshotInfo {
        name: name.into(),
        description: "test".into(),
        created: 1_700_000_000,
        kind: "checkpoint".into(),
        crash_consistent: false,
        run_state: "running".into(),
        memory_size: 8 * MIB,
    }
}

/// A memory image: mostly zero pages, some patterned, some equal to each other.
fn memory(seed: u8) -> Vec<u8> {
    let mut m = vec![0u8; 8 * MIB as usize];
    for (i, page) in m.chunks_mut(4096).enumerate() {
        if i % 3 == 0 {
            page.fill((i % 7) as u8 + 1);
        }
        if i % 50 == 0 {
            page[..8].copy_from_slice(&(i as u64 ^ u64::from(seed)).to_le_bytes());
        }
    }
    m
}

/// An image with data, an internal snapshot `tag`, and changes after it.
fn disk(dir: &Path, name: &str, tag: &str) -> PathBuf {
    let img = dir.join(name);
    disk::create_image(&img, 16 * MIB + 4096, None).unwrap();
    let io = |cmd: &str| {
        let (code, out) = qemu(&["qemu-io", "-f", "qcow2", "-c", cmd, s(&img)]);
        assert_eq!(code, 0, "{out}");
    };
    io("write -P 0x11 0 1M");
    io("write -P 0x22 3M 200k");
    io("write -P 0x33 16M 4k");
    disk::create_snapshot(&img, tag).unwrap();
    io("write -P 0x44 0 512k");
    img
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    disks: Vec<DiskSource>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let disks = ["xvda", "xvdb"]
        .iter()
        .map(|n| DiskSource {
            name: n.to_string(),
            image: disk(&root, &format!("{n}.qcow2"), "s1@7"),
            snapshot: "s1@7".into(),
        })
        .collect();
    Fixture {
        _dir: dir,
        root,
        disks,
    }
}

fn export(dest: &dyn ObjectStore, f: &Fixture, snap: &str, mem: &[u8]) -> bundle::ExportReport {
    let mut r: &[u8] = mem;
    bundle::export(dest, "web", info(snap), Some(&mut r), &f.disks, "host-a").unwrap()
}

#[test]
fn export_import_round_trip_and_incremental() {
    let f = fixture();
    let dest = LocalStore::open(&f.root.join("dest"), false).unwrap();
    let mem = memory(1);
    let first = export(&dest, &f, "s1", &mem);
    // Zero pages and clusters are not sent; equal pages are sent once.
    assert!(first.bytes_sent < 4 * MIB, "{first:?}");
    assert!(first.bytes_reused > 0, "{first:?}");

    // Import, as another host would: open (checks), memory, disks.
    let mut b = bundle::open(&dest, "web", "s1").unwrap();
    assert_eq!(b.descriptor().snapshot, info("s1"));
    assert_eq!(b.descriptor().disks.len(), 2);
    b.verify().unwrap();
    let mut got = Vec::new();
    assert_eq!(b.read_memory(&mut got).unwrap(), mem.len() as u64);
    assert_eq!(got, mem);
    for (i, d) in f.disks.iter().enumerate() {
        let out = f.root.join(format!("imported-{}.qcow2", d.name));
        b.write_disk(i, &out).unwrap();
        let (code, text) = qemu(&["qemu-img", "check", s(&out)]);
        assert_eq!(code, 0, "{text}");
        let want = f.root.join(format!("want-{}.raw", d.name));
        let (code, text) = qemu(&[
            "qemu-img",
            "convert",
            "-l",
            "snapshot.name=s1@7",
            "-O",
            "raw",
            s(&d.image),
            s(&want),
        ]);
        assert_eq!(code, 0, "{text}");
        let (code, text) = qemu(&["qemu-img", "compare", "-f", "raw", s(&want), s(&out)]);
        assert_eq!(code, 0, "{text}");
    }
    assert_eq!(bundle::list(&dest).unwrap(), [("web".into(), "s1".into())]);

    // A second checkpoint whose memory changed a little: only the changed pages are sent.
    let mut mem2 = mem.clone();
    mem2[4096 * 10..4096 * 11].fill(0xab);
    mem2[4096 * 11..4096 * 12].fill(0xcd);
    let second = export(&dest, &f, "s2", &mem2);
    assert_eq!(second.bytes_sent, 2 * 4096, "{second:?}");
    let mut got = Vec::new();
    bundle::open(&dest, "web", "s2")
        .unwrap()
        .read_memory(&mut got)
        .unwrap();
    assert_eq!(got, mem2);
    // The same export again sends nothing.
    assert_eq!(export(&dest, &f, "s2", &mem2).bytes_sent, 0);
}

fn damage(f: &Fixture, what: impl FnOnce(&Path)) -> Error {
    let root = f.root.join(format!("dest-{}", rand_suffix()));
    let dest = LocalStore::open(&root, false).unwrap();
    export(&dest, f, "s1", &memory(1));
    what(&root);
    let dest = LocalStore::open(&root, true).unwrap();
    match bundle::open(&dest, "web", "s1") {
        Err(e) => e,
        Ok(mut b) => match b.verify() {
            Err(e) => e,
            Ok(()) => panic!("a damaged bundle was accepted"),
        },
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn damaged_or_partial_bundles_are_refused_naming_what_is_wrong() {
    let f = fixture();
    // No descriptor: an export interrupted before its end is no bundle.
    let e = damage(&f, |root| {
        std::fs::remove_file(root.join("bundles/web/s1")).unwrap()
    });
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    // A descriptor cut short or changed.
    let e = damage(&f, |root| {
        let p = root.join("bundles/web/s1");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 3]).unwrap();
    });
    assert!(matches!(e, Error::Damaged { .. }), "{e}");
    assert!(e.to_string().contains("checksum"), "{e}");
    // A manifest lost.
    let e = damage(&f, |root| {
        std::fs::remove_file(&files(&root.join("manifests"))[0]).unwrap()
    });
    assert!(matches!(e, Error::Missing { .. }), "{e}");
    assert!(e.to_string().contains("manifests/"), "{e}");
    // A pack lost: its chunks are in no pack.
    let e = damage(&f, |root| {
        std::fs::remove_file(&files(&root.join("packs"))[0]).unwrap()
    });
    assert!(matches!(e, Error::Missing { .. }), "{e}");
    assert!(e.to_string().contains("chunk"), "{e}");
    // A pack cut short.
    let e = damage(&f, |root| {
        let p = &files(&root.join("packs"))[0];
        let len = std::fs::metadata(p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
    });
    assert!(matches!(e, Error::Missing { .. }), "{e}");
    // A byte of a pack changed: found when the chunks are read.
    let e = damage(&f, |root| {
        let p = &files(&root.join("packs"))[0];
        let mut b = std::fs::read(p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        std::fs::write(p, b).unwrap();
    });
    assert!(matches!(e, Error::Damaged { .. }), "{e}");
    assert!(e.to_string().contains("does not match its hash"), "{e}");
    // The index lost: nothing says where the chunks are.
    let e = damage(&f, |root| {
        std::fs::remove_dir_all(root.join("index")).unwrap()
    });
    assert!(matches!(e, Error::Missing { .. }), "{e}");
}

#[test]
fn names_that_cannot_be_objects_are_refused() {
    let f = fixture();
    let dest = LocalStore::open(&f.root.join("dest"), false).unwrap();
    for (d, s) in [("a/b", "s"), ("web", ".."), ("web", "")] {
        let mut r: &[u8] = b"";
        let e = bundle::export(&dest, d, info(s), Some(&mut r), &[], "h").unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }
    assert!(dest.list("").unwrap().is_empty(), "nothing was written");
}
