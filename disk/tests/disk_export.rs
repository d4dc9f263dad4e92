//! A disk's content at an internal snapshot, read cluster by cluster and written as a
//! standalone image: compared with what qemu-img reads at that snapshot.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use disk::Cluster;

const MIB: u64 = 1 << 20;

#[test]
fn snapshot_content_round_trips_into_a_standalone_image() {
    let dir = tempfile::tempdir().unwrap();
    for cs in [4096u32, 65536] {
        let img = dir.path().join(format!("d{cs}.qcow2"));
        // 20 MiB + 512: the last cluster is partial.
        disk::create_image(&img, 20 * MIB + 512, Some(cs)).unwrap();
        qemu_io(&img, "write -P 0x11 0 1M");
        qemu_io(&img, "write -P 0x22 5M 300k");
        qemu_io(&img, "write -z 5200k 64k");
        qemu_io(&img, "write -P 0x33 20M 512");
        disk::create_snapshot(&img, "s1@1").unwrap();
        // Changes after the snapshot must not show in its content.
        qemu_io(&img, "write -P 0x44 0 2M");
        qemu_io(&img, "discard 5M 64k");
        qemu_io(&img, "write -P 0x55 10M 1M");

        let mut r = disk::snapshot_reader(&img, "s1@1").unwrap();
        assert_eq!(r.disk_size(), 20 * MIB + 512);
        assert_eq!(r.cluster_size(), u64::from(cs));
        let mut clusters = Vec::new();
        for i in 0..r.clusters() {
            if let Cluster::Data(d) = r.read(i).unwrap() {
                clusters.push((i, d));
            }
        }
        let allocated: u64 = clusters.iter().map(|(_, d)| d.len() as u64).sum();
        assert!(allocated < 2 * MIB, "only allocated clusters: {allocated}");

        let out = dir.path().join(format!("out{cs}.qcow2"));
        disk::write_image(&out, r.disk_size(), cs, clusters.into_iter().map(Ok)).unwrap();
        assert_qemu_clean(&out);
        let want = dir.path().join(format!("want{cs}.raw"));
        qemu_img(&[
            "convert",
            "-l",
            "snapshot.name=s1@1",
            "-O",
            "raw",
            s(&img),
            s(&want),
        ]);
        let cmp = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&want), s(&out)]);
        assert!(cmp.contains("Images are identical"), "{cmp}");
        // And the active layer differs, so the comparison could fail.
        let (code, _) = run(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "qcow2", s(&img), s(&out)],
        );
        assert_eq!(code, 1, "the active layer differs from the snapshot");
    }
}

#[test]
fn refusals_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    disk::create_image(&img, 4 * MIB, None).unwrap();
    assert!(matches!(
        disk::snapshot_reader(&img, "nope"),
        Err(disk::Error::NoSuchSnapshot { .. })
    ));
    disk::create_snapshot(&img, "s").unwrap();
    let mut r = disk::snapshot_reader(&img, "s").unwrap();
    assert_eq!(r.read(0).unwrap(), Cluster::Zero);
    assert!(matches!(
        r.read(64),
        Err(disk::Error::InvalidArgument { .. })
    ));
    // A cluster past the disk's end is refused, and nothing overwrites an existing file.
    let out = dir.path().join("o.qcow2");
    let e = disk::write_image(&out, MIB, 65536, [Ok((16, vec![1u8; 65536]))]).unwrap_err();
    assert!(matches!(e, disk::Error::InvalidArgument { .. }), "{e}");
    let e = disk::write_image(&out, MIB, 65536, []).unwrap_err();
    assert!(matches!(e, disk::Error::AlreadyExists { .. }), "{e}");
    // An image with a backing file: its snapshot's content is not its own.
    let top = dir.path().join("top.qcow2");
    disk::create_overlay(&img, &top).unwrap();
    disk::create_snapshot(&top, "t").unwrap();
    assert!(matches!(
        disk::snapshot_reader(&top, "t"),
        Err(disk::Error::Unsupported { .. })
    ));
}
