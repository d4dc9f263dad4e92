//! Image variants (qcow2 v2, refcount widths, extended L2, zstd, lazy refcounts, resized
//! images) and the images this crate must refuse.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/diff.rs"]
mod diff;
use common::*;
use diff::Sim;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn qemu_create(dir: &Path, opts: &str, size: u64) -> PathBuf {
    let img = dir.join("v.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        s(&img),
        &size.to_string(),
    ]);
    img
}

fn run_variant(opts: &str, cs: u64, seed: u64, steps: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let img = qemu_create(dir.path(), opts, size);
    let mut sim = Sim::new(img, dir.path(), size, cs, seed);
    sim.data_image = !opts.contains("extended_l2") && !opts.contains("zstd");
    for _ in 0..steps {
        sim.step();
    }
    sim.verify_all_snapshots();
}

#[test]
fn version_2_images() {
    run_variant("compat=0.10,cluster_size=65536", 65536, 11, 30);
}

#[test]
fn refcount_widths() {
    for (bits, seed) in [(8, 12), (32, 13), (64, 14)] {
        run_variant(
            &format!("refcount_bits={bits},cluster_size=4096"),
            4096,
            seed,
            25,
        );
    }
}

#[test]
fn lazy_refcounts_when_clean() {
    run_variant("lazy_refcounts=on,cluster_size=16384", 16384, 15, 25);
}

#[test]
fn extended_l2_entries() {
    run_variant("extended_l2=on,cluster_size=65536", 65536, 16, 30);
}

#[test]
fn zstd_compression() {
    run_variant("compression_type=zstd,cluster_size=65536", 65536, 17, 30);
}

#[test]
fn data_image_refuses_what_imago_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    for opts in ["compression_type=zstd", "extended_l2=on"] {
        let img = qemu_create(dir.path(), opts, MIB);
        let err = disk::DataImage::open(&img).unwrap_err();
        assert!(matches!(err, disk::Error::Unsupported { .. }), "{err}");
        std::fs::remove_file(img).unwrap();
    }
}

#[test]
fn narrow_refcounts_overflow_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_create(dir.path(), "refcount_bits=2,cluster_size=65536", MIB);
    qemu_io(&img, "write -P 0x11 0 128k");
    disk::create_snapshot(&img, "a").unwrap();
    disk::create_snapshot(&img, "b").unwrap();
    // A third path to the same clusters needs refcount 4 > 3.
    let err = disk::create_snapshot(&img, "c").unwrap_err();
    assert!(matches!(err, disk::Error::Unsupported { .. }), "{err}");
    assert_qemu_clean(&img);
    assert_eq!(disk::list_snapshots(&img).unwrap().len(), 2);

    let img1 = dir.path().join("one.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=1",
        s(&img1),
        "1M",
    ]);
    qemu_io(&img1, "write -P 0x11 0 64k");
    assert!(matches!(
        disk::create_snapshot(&img1, "a"),
        Err(disk::Error::Unsupported { .. })
    ));
    assert_qemu_clean(&img1);
}

#[test]
fn apply_restores_the_virtual_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_create(dir.path(), "cluster_size=65536", 4 * MIB);
    qemu_io(&img, "write -P 0x11 0 1M");
    disk::create_snapshot(&img, "small").unwrap();
    qemu_img(&["resize", "-q", s(&img), "12M"]);
    qemu_io(&img, "write -P 0x22 8M 1M");
    disk::create_snapshot(&img, "big").unwrap();
    assert_qemu_clean(&img);
    disk::apply_snapshot(&img, "small").unwrap();
    assert_qemu_clean(&img);
    assert!(qemu_img(&["info", s(&img)]).contains("virtual size: 4 MiB"));
    let model = Model::new(dir.path().join("small.raw"), 4 * MIB);
    model.write(0, MIB, 0x11);
    assert!(same_content(&img, &model.path));
    qemu_img(&["snapshot", "-a", "big", s(&img)]);
    assert!(qemu_img(&["info", s(&img)]).contains("virtual size: 12 MiB"));
    disk::apply_snapshot(&img, "big").unwrap();
    assert_qemu_clean(&img);
    let list = disk::list_snapshots(&img).unwrap();
    assert_eq!((list[0].disk_size, list[1].disk_size), (4 * MIB, 12 * MIB));
}

fn set_header_u64(img: &Path, at: u64, f: impl Fn(u64) -> u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&f(u64::from_be_bytes(b)).to_be_bytes(), at)
        .unwrap();
}

fn refused(img: &Path) -> disk::Error {
    let e = disk::create_snapshot(img, "x").unwrap_err();
    assert!(disk::DataImage::open(img).is_err());
    e
}

#[test]
fn refuses_what_it_cannot_handle() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let luks = d.join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=123456",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        s(&luks),
        "1M",
    ]);
    assert!(matches!(refused(&luks), disk::Error::Unsupported { .. }));

    let data_file = d.join("ext.qcow2");
    let raw = d.join("ext.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&raw)),
        s(&data_file),
        "1M",
    ]);
    assert!(matches!(
        refused(&data_file),
        disk::Error::Unsupported { .. }
    ));

    let dirty = d.join("dirty.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&dirty),
        "1M",
    ]);
    set_header_u64(&dirty, 72, |v| v | 1);
    assert!(matches!(refused(&dirty), disk::Error::Unsupported { .. }));
    // Listing still works on it.
    assert!(disk::list_snapshots(&dirty).unwrap().is_empty());

    let corrupt = d.join("corrupt.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&corrupt), "1M"]);
    set_header_u64(&corrupt, 72, |v| v | 2);
    assert!(matches!(refused(&corrupt), disk::Error::Corruption { .. }));

    let unknown = d.join("unknown.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&unknown), "1M"]);
    set_header_u64(&unknown, 72, |v| v | 1 << 20);
    assert!(matches!(refused(&unknown), disk::Error::Unsupported { .. }));

    let not_qcow2 = d.join("plain.raw");
    std::fs::write(&not_qcow2, vec![0u8; 4096]).unwrap();
    assert!(matches!(
        disk::list_snapshots(&not_qcow2),
        Err(disk::Error::Corruption { .. })
    ));
}

#[test]
fn unknown_autoclear_bits_are_cleared_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_create(dir.path(), "cluster_size=65536", MIB);
    set_header_u64(&img, 88, |v| v | 1 << 40);
    disk::create_snapshot(&img, "a").unwrap();
    let info = qemu_img(&["info", "--output=json", s(&img)]);
    assert!(!info.contains("\"autoclear\""), "{info}");
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut b, 88)
        .unwrap();
    assert_eq!(u64::from_be_bytes(b), 0);
    assert_qemu_clean(&img);
}

#[test]
fn persistent_bitmaps_are_kept_like_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_create(dir.path(), "cluster_size=65536", 4 * MIB);
    qemu_io(&img, "write -P 0x11 0 1M");
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    assert_qemu_clean(&img);
    disk::create_snapshot(&img, "a").unwrap();
    qemu_img(&["snapshot", "-c", "q", s(&img)]);
    assert_qemu_clean(&img);
    let info = qemu_img(&["info", s(&img)]);
    assert!(
        info.contains("name: b0") && !info.contains("inconsistent"),
        "{info}"
    );
    // Applying is refused, as QEMU refuses it.
    assert!(matches!(
        disk::apply_snapshot(&img, "a"),
        Err(disk::Error::Unsupported { .. })
    ));
    disk::delete_snapshot(&img, "a").unwrap();
    disk::delete_snapshot(&img, "q").unwrap();
    assert_qemu_clean(&img);
    let (code, text) = run("qemu-img", &["check", s(&img)]);
    assert!(code == 0 && !text.contains("warning"), "{text}");
}
