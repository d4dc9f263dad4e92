//! Interoperability with qemu-img/qemu-io in both directions.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use disk::DataImage;

const MIB: u64 = 1 << 20;

#[test]
fn created_image_is_valid_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for cs in [512u32, 4096, 65536, 2 << 20] {
        let img = dir.path().join(format!("a{cs}.qcow2"));
        disk::create_image(&img, 64 * MIB + 512, Some(cs)).unwrap();
        assert_qemu_clean(&img);
        let info = qemu_img(&["info", s(&img)]);
        assert!(info.contains("67109376 bytes"), "{info}");
        assert!(info.contains(&format!("cluster_size: {cs}")), "{info}");
        qemu_io(&img, "write -P 0x11 0 64k");
        assert_qemu_clean(&img);
    }
    let img = dir.path().join("a512.qcow2");
    assert!(matches!(
        disk::create_image(&img, MIB, None),
        Err(disk::Error::AlreadyExists { .. })
    ));
}

#[test]
fn data_image_reads_qemu_writes_and_qemu_reads_ours() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    disk::create_image(&img, 16 * MIB, None).unwrap();
    qemu_io(&img, "write -P 0x11 0 64k");
    let model = Model::new(dir.path().join("m.raw"), 16 * MIB);
    model.write(0, 65536, 0x11);
    {
        let mut d = DataImage::open(&img).unwrap();
        assert_eq!(d.virtual_size(), 16 * MIB);
        let mut buf = vec![0u8; 4096];
        d.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|b| *b == 0x11));
        d.write_at(&[0x22; 8192], 3 * MIB + 512).unwrap();
        d.flush().unwrap();
    }
    model.write(3 * MIB + 512, 8192, 0x22);
    assert!(same_content(&img, &model.path));
    assert_qemu_clean(&img);
}

#[test]
fn our_snapshots_work_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    disk::create_image(&img, 16 * MIB, None).unwrap();
    let model = Model::new(dir.path().join("m.raw"), 16 * MIB);
    qemu_io(&img, "write -P 0x11 0 64k");
    model.write(0, 65536, 0x11);
    let snap = disk::create_snapshot(&img, "one").unwrap();
    assert_eq!(snap.id, "1");
    assert_eq!(snap.disk_size, 16 * MIB);
    assert_qemu_clean(&img);
    assert_eq!(qemu_snapshots(&img), vec!["one".to_string()]);
    assert!(matches!(
        disk::create_snapshot(&img, "one"),
        Err(disk::Error::SnapshotExists { .. })
    ));

    qemu_io(&img, "write -P 0x33 0 128k");
    assert_qemu_clean(&img);
    qemu_img(&["snapshot", "-a", "one", s(&img)]);
    assert!(same_content(&img, &model.path));
    assert_qemu_clean(&img);
    qemu_img(&["snapshot", "-d", "one", s(&img)]);
    assert!(disk::list_snapshots(&img).unwrap().is_empty());
    assert_qemu_clean(&img);
}

#[test]
fn qemu_snapshots_work_here() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    let model = Model::new(dir.path().join("m.raw"), 16 * MIB);
    qemu_io(&img, "write -P 0x11 0 64k");
    model.write(0, 65536, 0x11);
    qemu_img(&["snapshot", "-c", "q1", s(&img)]);
    let list = disk::list_snapshots(&img).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "q1");
    let saved = dir.path().join("q1.raw");
    model.save(&saved);

    // Write through DataImage over a shared cluster: must copy, not overwrite the snapshot.
    {
        let mut d = DataImage::open(&img).unwrap();
        d.write_at(&[0x44; 4096], 8192).unwrap();
        d.flush().unwrap();
    }
    model.write(8192, 4096, 0x44);
    assert!(same_content(&img, &model.path));
    assert_qemu_clean(&img);

    disk::create_snapshot(&img, "d2").unwrap();
    assert_eq!(
        qemu_snapshots(&img),
        vec!["q1".to_string(), "d2".to_string()]
    );
    assert_qemu_clean(&img);

    disk::apply_snapshot(&img, "q1").unwrap();
    assert_qemu_clean(&img);
    assert!(same_content(&img, &saved));
    disk::apply_snapshot(&img, "d2").unwrap();
    assert!(same_content(&img, &model.path));
    assert_qemu_clean(&img);

    disk::delete_snapshot(&img, "q1").unwrap();
    assert_qemu_clean(&img);
    assert_eq!(qemu_snapshots(&img), vec!["d2".to_string()]);
    disk::delete_snapshot(&img, "d2").unwrap();
    assert_qemu_clean(&img);
    assert!(same_content(&img, &model.path));
    assert!(matches!(
        disk::delete_snapshot(&img, "d2"),
        Err(disk::Error::NoSuchSnapshot { .. })
    ));
    assert!(matches!(
        disk::apply_snapshot(&img, "zz"),
        Err(disk::Error::NoSuchSnapshot { .. })
    ));
    // qemu still writes happily after all of it.
    qemu_io(&img, "write -P 0x55 1M 64k");
    assert_qemu_clean(&img);
}

#[test]
fn leaks_are_found_and_repaired() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.qcow2");
    disk::create_image(&img, 16 * MIB, None).unwrap();
    qemu_io(&img, "write -P 0x11 0 128k");
    qemu_img(&["snapshot", "-c", "a", s(&img)]);
    qemu_io(&img, "write -P 0x12 64k 128k");
    // Raise the refcount of a cluster nothing refers to: a leak (layout of create_image:
    // refcount block in cluster 2, 16-bit entries).
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let len = f.metadata().unwrap().len();
    let c = len.div_ceil(65536) + 2;
    f.set_len((c + 1) * 65536).unwrap();
    f.write_all_at(&1u16.to_be_bytes(), 2 * 65536 + c * 2)
        .unwrap();
    drop(f);
    assert_eq!(
        qemu_check(&img).0,
        3,
        "qemu-img check should report leaks only"
    );
    let r = disk::check(&img).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 1), "{r:?}");
    let after = disk::repair_leaks(&img).unwrap();
    assert!(after.is_clean(), "{after:?}");
    assert_qemu_clean(&img);
    assert_eq!(qemu_snapshots(&img), vec!["a".to_string()]);
}

#[test]
fn locks_keep_qemu_and_us_apart() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("lk.qcow2");
    disk::create_image(&img, 4 * MIB, None).unwrap();
    {
        let mut d = DataImage::open(&img).unwrap();
        d.write_at(&[1; 512], 0).unwrap();
        // Snapshot operations, a second writer and qemu-img all refuse; listing works.
        assert!(matches!(
            disk::create_snapshot(&img, "x"),
            Err(disk::Error::Locked { .. })
        ));
        assert!(matches!(
            DataImage::open(&img),
            Err(disk::Error::Locked { .. })
        ));
        assert_ne!(run("qemu-img", &["snapshot", "-c", "q", s(&img)]).0, 0);
        assert!(disk::list_snapshots(&img).unwrap().is_empty());
    }
    // A running QEMU writer (qemu-io sleeping with the image open) blocks us as well.
    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 3000", s(&img)])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let r = disk::create_snapshot(&img, "x");
    let opened = DataImage::open(&img);
    child.wait().unwrap();
    assert!(matches!(r, Err(disk::Error::Locked { .. })), "{r:?}");
    assert!(matches!(opened, Err(disk::Error::Locked { .. })));
    disk::create_snapshot(&img, "x").unwrap();
    assert_qemu_clean(&img);
}

#[test]
fn listing_works_while_a_writer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    disk::create_image(&img, 64 * MIB, Some(4096)).unwrap();
    qemu_io(&img, "write -P 0x11 0 1M");
    qemu_img(&["snapshot", "-c", "a", s(&img)]);
    disk::create_snapshot(&img, "b").unwrap();
    let writer_img = img.clone();
    let writer = std::thread::spawn(move || {
        let mut d = DataImage::open(&writer_img).unwrap();
        for i in 0..2000u64 {
            d.write_at(&[i as u8; 4096], (i * 7919 * 4096) % (60 * MIB))
                .unwrap();
            if i % 100 == 0 {
                d.flush().unwrap();
            }
        }
        d.flush().unwrap();
    });
    let mut lists = 0;
    while !writer.is_finished() {
        let names: Vec<String> = disk::list_snapshots(&img)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        lists += 1;
    }
    writer.join().unwrap();
    assert!(lists > 0);
    assert_qemu_clean(&img);
}
