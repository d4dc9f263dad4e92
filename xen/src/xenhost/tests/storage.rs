//! Toolstack calls per command, disk kinds and their refusals, and LVM thin volumes, against
//! the fake hypervisor, `xl`, QMP server and `lvm`.

use std::ffi::CString;
use std::fs;
use std::path::Path;

use disk::lvm::fake::FakeLvm;
use serde_json::{json, Value};

use super::{list_json, qmp_server, Lab};
use crate::{DiskKind, Error, Host, RunState};

/// Makes a block device node (root only, as domsnap on a dom0 is).
fn mknod_block(path: &Path, major: u32, minor: u32) {
    let c = CString::new(path.to_str().expect("utf-8")).expect("path");
    // SAFETY: `c` is a valid NUL-terminated path; mknod takes plain integers.
    let rc = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// `domd` (domain id `domid`) with the disks `disks` instead of its one qcow2 disk.
fn with_disks(domid: u32, disks: Value) -> String {
    let mut v: Value = serde_json::from_str(&list_json(domid)).expect("json");
    v[0]["config"]["disks"] = disks;
    v.to_string()
}

/// A volume group `vg`: pool, thin `web1` (253:3, content A), thick `thick` (253:4).
fn fake_lvm(lab: &Lab) -> FakeLvm {
    FakeLvm::new(
        &lab.dir,
        "vg|pool|twi-aotz--||||-1|40.00|10.00|\n\
         vg|web1|Vwi-aotz--|pool||253|3|||A\n\
         vg|thick|-wi-a-----|||253|4|||T\n",
    )
}

#[test]
fn one_xl_list_per_command_and_again_only_for_a_stranger() {
    let lab = Lab::new();
    qmp_server(&lab, vec![]);
    lab.mem(1 << 20);
    // what a checkpoint asks of the host
    let d = lab.host.domain("domd").expect("domain");
    assert_eq!(d.state, RunState::Running);
    lab.host.save_memory("domd", &mut Vec::new()).expect("save");
    lab.host.domain("domd").expect("domain");
    lab.host
        .create_disk_snapshot("domd", "xvda", "c1@1")
        .expect("snapshot");
    lab.host.unpause("domd").expect("unpause");
    lab.host.domain("domd").expect("domain");
    assert_eq!(lab.host.listings(), 1);
    // a revert: destroy, restore (a new domain id, known by its UUID), unpause
    lab.host.destroy("domd").expect("destroy");
    lab.host
        .restore_memory(
            "domd",
            &mut &fs::read(lab.dir.join("mem")).expect("mem")[..],
        )
        .expect("restore");
    lab.host.unpause("domd").expect("unpause");
    assert_eq!(
        lab.host.domain("domd").expect("domain").state,
        RunState::Running
    );
    assert_eq!(lab.host.domains().expect("domains").len(), 1);
    assert_eq!(
        lab.host.listings(),
        1,
        "restored domain found without listing"
    );
    assert_eq!(lab.read("log").matches("list -l").count(), 1);

    // someone else creates a domain: the next call lists again and knows it
    let mut v: Value = serde_json::from_str(&list_json(6)).expect("json");
    let mut other = v[0].clone();
    other["domid"] = json!(9);
    other["config"]["c_info"]["name"] = json!("other");
    other["config"]["c_info"]["uuid"] = json!("0000000a-0000-4000-8000-000000000009");
    v.as_array_mut().expect("array").push(other);
    lab.write("list.json", v.to_string());
    fs::write(
        lab.dir.join("xc/9"),
        "0 0 0000000a-0000-4000-8000-000000000009",
    )
    .expect("xc");
    let names: Vec<String> = lab
        .host
        .domains()
        .expect("domains")
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["domd", "other"]);
    assert_eq!(lab.host.listings(), 2);
    lab.host.domain("other").expect("other");
    assert_eq!(lab.host.listings(), 2);
}

#[test]
fn a_new_process_keeps_the_paths_it_changed_while_xl_shows_old_ones() {
    // libxl keeps the configuration it booted with; domsnap's record of the same
    // incarnation wins (external snapshots change the image of a running domain).
    let lab = Lab::new();
    lab.host.domain("domd").expect("domain");
    let store = config::Store::open(lab.dir.join("state/xen/domains")).expect("store");
    let mut saved = store.load("domd").expect("load").expect("saved");
    assert!(config::set_disk_path(
        &mut saved.config,
        "xvda",
        Path::new("/images/xvda-9.qcow2")
    ));
    store.save(&saved).expect("save");
    let again = super::reopen(&lab);
    let d = again.domain("domd").expect("domain");
    assert_eq!(d.disks[0].path, Path::new("/images/xvda-9.qcow2"));
    // a new incarnation nobody here made: libxl's configuration is the truth again
    fs::remove_file(lab.dir.join("xc/5")).expect("rm");
    fs::write(lab.dir.join("xc/8"), "0 0").expect("xc");
    lab.write("list.json", list_json(8));
    let d = again.domain("domd").expect("domain");
    assert_eq!(d.disks[0].path, Path::new("/images/domd.qcow2"));
}

use super::super::config;

#[test]
fn every_disk_gets_its_kind_and_refusals_name_the_disk() {
    let lab = Lab::new();
    let lvm = fake_lvm(&lab);
    let raw = lab.dir.join("raw.img");
    fs::write(&raw, vec![0u8; 4096]).expect("raw");
    let (thin, thick, plain) = (
        lab.dir.join("dev-web1"),
        lab.dir.join("dev-thick"),
        lab.dir.join("dev-sdb"),
    );
    mknod_block(&thin, 253, 3);
    mknod_block(&thick, 253, 4);
    mknod_block(&plain, 8, 16);
    let p = |x: &Path| x.to_string_lossy().into_owned();
    let disk = |vdev: &str, path: String, format: &str, backend: &str| json!({"vdev": vdev, "pdev_path": path, "format": format, "backend": backend, "readwrite": 1});
    let mut script = disk("xvdg", "iqn.2001-04.com.example:disk".into(), "raw", "phy");
    script["script"] = json!("block-iscsi");
    lab.write(
        "list.json",
        with_disks(
            5,
            json!([
                disk("xvda", "/images/domd.qcow2".into(), "qcow2", "qdisk"),
                disk("xvdb", p(&thin), "raw", "phy"),
                disk("xvdc", p(&raw), "raw", "qdisk"),
                disk("xvdd", p(&thick), "raw", "phy"),
                disk("xvde", p(&plain), "raw", "phy"),
                disk("xvdf", "/images/d.vhd".into(), "vhd", "tap"),
                script,
                disk("xvdh", "/images/q.qcow2".into(), "qcow2", "phy"),
            ]),
        ),
    );
    let d = lab.host.domain("domd").expect("domain");
    let kinds: Vec<(&str, &DiskKind)> = d
        .disks
        .iter()
        .map(|d| (d.target.as_str(), &d.kind))
        .collect();
    assert_eq!(kinds[0], ("xvda", &DiskKind::Qcow2));
    assert_eq!(kinds[1], ("xvdb", &DiskKind::LvmThin));
    let reason = |i: usize| match &d.disks[i].kind {
        DiskKind::Unsupported { reason } => reason.clone(),
        k => panic!("{}: {k:?}", d.disks[i].target),
    };
    assert!(reason(2).contains("raw image file"), "{}", reason(2));
    assert!(
        reason(3).contains("thick LVM volume vg/thick"),
        "{}",
        reason(3)
    );
    assert!(reason(4).contains("not an LVM volume"), "{}", reason(4));
    assert!(reason(5).contains("vhd image"), "{}", reason(5));
    assert!(reason(6).contains("block-iscsi"), "{}", reason(6));
    assert!(
        reason(7).contains("qcow2 image on the phy backend"),
        "{}",
        reason(7)
    );

    let why = d.snapshot_refusal(false).expect("refused");
    assert!(why.contains("disk xvdc of domain \"domd\""), "{why}");
    assert!(why.contains("raw image file"), "{why}");
    let only_lvm = crate::DomainInfo {
        disks: d.disks[..2].to_vec(),
        ..d.clone()
    };
    assert_eq!(only_lvm.snapshot_refusal(false), None);
    let why = only_lvm.snapshot_refusal(true).expect("external refused");
    assert!(why.contains("xvdb") && why.contains("LVM thin"), "{why}");

    // the host refuses the same disks itself, before touching anything
    for target in ["xvdc", "xvdd", "xvde", "xvdf", "xvdg", "xvdh"] {
        let err = lab
            .host
            .create_disk_snapshot("domd", target, "s@1")
            .expect_err(target);
        assert!(
            matches!(err, Error::Invalid(ref m) if m.contains(target)),
            "{err:?}"
        );
    }
    assert!(!lvm.log().contains("lvcreate"), "{}", lvm.log());
}

#[test]
fn thin_volume_disks_are_snapshotted_by_lvm_in_every_state() {
    let lab = Lab::new();
    let lvm = fake_lvm(&lab);
    let thin = lab.dir.join("dev-web1");
    mknod_block(&thin, 253, 3);
    lab.write(
        "list.json",
        with_disks(
            5,
            json!([{"vdev": "xvdb", "pdev_path": thin.to_string_lossy(), "format": "raw",
                    "backend": "phy", "readwrite": 1}]),
        ),
    );
    fs::copy(lab.dir.join("list.json"), lab.dir.join("list-6.json")).expect("cp");
    // running: no device model involved
    lab.host
        .create_disk_snapshot("domd", "xvdb", "s1@3")
        .expect("create while running");
    lab.host
        .create_disk_snapshot("domd", "xvdb", "s1@3")
        .expect("idempotent");
    assert_eq!(
        lab.host.disk_snapshots("domd", "xvdb").expect("list"),
        ["s1@3"]
    );
    assert_eq!(lvm.log().matches("lvcreate").count(), 1);
    assert!(matches!(
        lab.host.apply_disk_snapshot("domd", "xvdb", "s1@3"),
        Err(Error::WrongState { .. })
    ));
    lvm.write("web1", "B");
    lab.host.destroy("domd").expect("destroy");
    lab.host
        .apply_disk_snapshot("domd", "xvdb", "s1@3")
        .expect("apply");
    assert_eq!(lvm.content("web1"), "A");
    // the origin is a new LV now: the device path follows it, as udev moves /dev/vg/web1
    let (major, minor) = lvm.device("web1").expect("active");
    assert_ne!((major, minor), (253, 3));
    fs::remove_file(&thin).expect("rm");
    mknod_block(&thin, major, minor);
    assert!(matches!(
        lab.host.apply_disk_snapshot("domd", "xvdb", "never@1"),
        Err(Error::NoSuchDiskSnapshot { .. })
    ));
    // the pool full: refused, named, nothing made
    fs::write(lvm.fail_create_path(), "").expect("arm");
    let err = lab
        .host
        .create_disk_snapshot("domd", "xvdb", "s2@4")
        .expect_err("full");
    assert!(matches!(err, Error::Disk { .. }), "{err:?}");
    fs::remove_file(lvm.fail_create_path()).expect("disarm");
    assert_eq!(
        lab.host.disk_snapshots("domd", "xvdb").expect("list"),
        ["s1@3"]
    );
    lab.host
        .delete_disk_snapshot("domd", "xvdb", "s1@3")
        .expect("delete");
    lab.host
        .delete_disk_snapshot("domd", "xvdb", "s1@3")
        .expect("idempotent");
    assert!(lab
        .host
        .disk_snapshots("domd", "xvdb")
        .expect("list")
        .is_empty());
    // the check of an LVM disk has nothing to find
    assert!(lab
        .host
        .check_disk("domd", "xvdb")
        .expect("check")
        .is_clean());
}
