//! External snapshots: overlay chains, commit and rebase, checked with qemu-img.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

const MIB: u64 = 1 << 20;

/// base ← o1 ← … ← o5, each level with its own writes; returns the paths and the model
/// content seen at each level.
fn chain(dir: &std::path::Path) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    let size = 8 * MIB;
    let model = Model::new(dir.join("model.raw"), size);
    let mut imgs = vec![dir.join("base.qcow2")];
    disk::create_image(&imgs[0], size, Some(65536)).unwrap();
    let mut snaps = Vec::new();
    for level in 0..6u64 {
        if level > 0 {
            let next = dir.join(format!("o{level}.qcow2"));
            disk::create_overlay(imgs.last().unwrap(), &next).unwrap();
            assert_eq!(
                disk::backing_file(&next).unwrap().unwrap(),
                *imgs.last().unwrap()
            );
            imgs.push(next);
        }
        let img = imgs.last().unwrap();
        let pat = 0x10 + level as u8;
        let off = level * 700 * 1024;
        qemu_io(img, &format!("write -P {pat} {off} 300k"));
        model.write(off, 300 * 1024, pat);
        if level % 2 == 1 {
            qemu_io(
                img,
                &format!("write -c -P {} {} 64k", pat + 0x40, 4 * MIB + level * 65536),
            );
            model.write(4 * MIB + level * 65536, 65536, pat + 0x40);
        }
        if level == 3 {
            qemu_io(img, "write -z 0 64k");
            model.write(0, 65536, 0);
        }
        assert_qemu_clean(img);
        let saved = dir.join(format!("model{level}.raw"));
        model.save(&saved);
        snaps.push(saved);
    }
    (imgs, snaps)
}

#[test]
fn chain_of_six_reads_like_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let (imgs, models) = chain(dir.path());
    for (img, m) in imgs.iter().zip(&models) {
        assert!(same_content(img, m), "{img:?}");
    }
    let info = qemu_img(&["info", "--backing-chain", s(&imgs[5])]);
    assert_eq!(info.matches("image: ").count(), 6, "{info}");
    assert!(disk::backing_file(&imgs[0]).unwrap().is_none());
}

#[test]
fn commit_top_into_its_backing() {
    let dir = tempfile::tempdir().unwrap();
    let (imgs, models) = chain(dir.path());
    // o4 has an internal snapshot: commit must copy shared clusters, not overwrite them.
    qemu_img(&["snapshot", "-c", "keep", s(&imgs[4])]);
    disk::commit_overlay(&imgs[5]).unwrap();
    assert!(same_content(&imgs[4], &models[5]));
    assert!(same_content(&imgs[5], &models[5]));
    assert_qemu_clean(&imgs[4]);
    disk::apply_snapshot(&imgs[4], "keep").unwrap();
    assert!(same_content(&imgs[4], &models[4]));
    assert_qemu_clean(&imgs[4]);
}

#[test]
fn rebase_drops_middle_images() {
    let dir = tempfile::tempdir().unwrap();
    let (imgs, models) = chain(dir.path());
    // Remove o4 and o2 from the chain: o5 → o3, o3 → o1.
    disk::rebase(&imgs[5], Some(&imgs[3])).unwrap();
    assert!(same_content(&imgs[5], &models[5]));
    disk::rebase(&imgs[3], Some(&imgs[1])).unwrap();
    assert!(same_content(&imgs[3], &models[3]));
    std::fs::remove_file(&imgs[4]).unwrap();
    std::fs::remove_file(&imgs[2]).unwrap();
    assert!(same_content(&imgs[5], &models[5]));
    assert_eq!(disk::backing_file(&imgs[5]).unwrap().unwrap(), imgs[3]);
    assert_qemu_clean(&imgs[5]);
    assert_qemu_clean(&imgs[3]);
    // Flatten completely.
    disk::rebase(&imgs[5], None).unwrap();
    assert!(disk::backing_file(&imgs[5]).unwrap().is_none());
    assert!(same_content(&imgs[5], &models[5]));
    assert_qemu_clean(&imgs[5]);
}
