//! The thin volume backend against the fake `lvm` command of [`super::fake`].

use std::fs;

use super::fake::FakeLvm;
use super::*;

/// A volume group `vg` with thin pool `pool` (data `data`% used), thin volume `web1`
/// (content `A`) and thick volume `thick`.
struct Fake {
    _tmp: tempfile::TempDir,
    fake: FakeLvm,
    lvm: Lvm,
}

impl Fake {
    fn new(data: &str) -> Fake {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fake = FakeLvm::new(
            tmp.path(),
            &format!(
                "vg|pool|twi-aotz--||||-1|{data}|10.00|\n\
                 vg|web1|Vwi-aotz--|pool||253|3|||A\n\
                 vg|thick|-wi-a-----|||253|4|||T\n"
            ),
        );
        Fake {
            lvm: fake.lvm(),
            fake,
            _tmp: tmp,
        }
    }
}

impl std::ops::Deref for Fake {
    type Target = FakeLvm;
    fn deref(&self) -> &FakeLvm {
        &self.fake
    }
}

#[test]
fn report_parses_thin_thick_and_pools() {
    let f = Fake::new("40.00");
    let vols = f.lvm.volumes(None).expect("lvs");
    assert_eq!(vols.len(), 3);
    let web1 = vols.iter().find(|v| v.name == "web1").expect("web1");
    assert!(web1.is_thin());
    assert_eq!(web1.pool.as_deref(), Some("pool"));
    assert_eq!(web1.device, Some((253, 3)));
    let pool = vols.iter().find(|v| v.name == "pool").expect("pool");
    assert_eq!(pool.data_percent, Some(40.0));
    assert_eq!(pool.device, None, "inactive: major -1");
    assert!(!vols.iter().any(|v| v.name == "thick" && v.is_thin()));
    assert!(parse_report("{\"nope\": 1}").is_err());
    assert!(parse_report("garbage").is_err());
}

#[test]
fn snapshots_create_delete_apply_and_are_idempotent() {
    let f = Fake::new("40.00");
    let v = f.lvm.thin_volume("vg", "web1").expect("thin");
    assert!(v.snapshots().expect("list").is_empty());
    v.create_snapshot("s1@7").expect("create");
    v.create_snapshot("s1@7").expect("create again");
    assert_eq!(v.snapshots().expect("list"), ["s1@7"]);
    assert_eq!(
        f.content("web1.s1+7"),
        "A",
        "the snapshot holds the origin's blocks"
    );
    assert_eq!(
        f.log().matches("lvcreate").count(),
        1,
        "idempotent create runs lvcreate once"
    );
    // an LV that merely looks like a snapshot (no mark) is not one
    f.append("vg|web1.look+1|Vwi---tz-k|pool||-1|0|||X");
    assert_eq!(v.snapshots().expect("list"), ["s1@7"]);

    f.write("web1", "B");
    v.apply_snapshot("s1@7").expect("apply");
    assert_eq!(
        f.content("web1"),
        "A",
        "apply brought the snapshot's content back"
    );
    assert_eq!(f.content("web1.s1+7"), "A", "the snapshot is kept");
    f.write("web1", "C");
    v.apply_snapshot("s1@7").expect("apply again");
    assert_eq!(f.content("web1"), "A");
    assert!(
        !f.names().iter().any(|n| n.contains("revert-")),
        "no scratch volume left: {:?}",
        f.names()
    );
    assert!(matches!(
        v.apply_snapshot("never@1"),
        Err(Error::NoSuchSnapshot { .. })
    ));

    v.delete_snapshot("s1@7").expect("delete");
    v.delete_snapshot("s1@7").expect("delete again");
    assert!(v.snapshots().expect("list").is_empty());
    assert_eq!(
        f.content("web1"),
        "A",
        "deleting a snapshot leaves the origin"
    );
}

#[test]
fn an_interrupted_apply_converges_whatever_step_it_reached() {
    // The states a crash leaves after each step of an apply of s1 (see the module doc).
    type Setup = fn(&Fake);
    let states: [(&str, Setup); 4] = [
        ("after create", |f| {
            f.write("web1", "B");
            f.append("vg|web1.revert-new|Vwi-a-tz--|pool||253|9|||A");
        }),
        ("after renaming the origin", |f| {
            f.rename("web1", "web1.revert-old");
            f.write("web1.revert-old", "B");
            f.append("vg|web1.revert-new|Vwi-a-tz--|pool||253|9|||A");
        }),
        ("after renaming the new volume", |f| {
            f.append("vg|web1.revert-old|Vwi-a-tz--|pool||253|9|||B");
        }),
        (
            "an apply of another snapshot, after renaming the origin",
            |f| {
                f.rename("web1", "web1.revert-old");
                f.append("vg|web1.revert-new|Vwi-a-tz--|pool||253|9|||OTHER");
            },
        ),
    ];
    for (what, setup) in states {
        let f = Fake::new("40.00");
        let v = f.lvm.thin_volume("vg", "web1").expect("thin");
        v.create_snapshot("s1@7").expect("create");
        setup(&f);
        v.apply_snapshot("s1@7")
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(f.content("web1"), "A", "{what}");
        assert_eq!(
            f.names(),
            ["pool", "thick", "web1", "web1.s1+7"],
            "{what}: nothing else left"
        );
    }
}

#[test]
fn refusals_name_the_volume_and_change_nothing() {
    let f = Fake::new("40.00");
    let err = f.lvm.thin_volume("vg", "thick").expect_err("thick");
    assert!(
        matches!(&err, Error::NotThin { volume, .. } if volume == "vg/thick"),
        "{err:?}"
    );
    assert!(err.to_string().contains("vg/thick"), "{err}");
    assert!(matches!(
        f.lvm.thin_volume("vg", "nope"),
        Err(Error::NoSuchVolume { .. })
    ));
    let v = f.lvm.thin_volume("vg", "web1").expect("thin");
    for bad in [
        "",
        ".x",
        "a/b",
        "a b",
        "revert-new",
        "revert-old",
        &"x".repeat(130),
    ] {
        assert!(
            matches!(v.create_snapshot(bad), Err(Error::InvalidArgument { .. })),
            "{bad:?}"
        );
    }
    let before = f.names();

    // a pool at the limit: refused before lvcreate runs
    let full = Fake::new("95.00");
    let v = full.lvm.thin_volume("vg", "web1").expect("thin");
    let err = v.create_snapshot("s1@7").expect_err("full pool");
    assert!(
        matches!(&err, Error::ThinPoolFull { pool, .. } if pool == "vg/pool"),
        "{err:?}"
    );
    assert!(err.to_string().contains("vg/web1"), "{err}");
    assert!(!full.log().contains("lvcreate"));
    // LVM's own refusal is an Lvm error with its message
    let f2 = Fake::new("40.00");
    fs::write(f2.fail_create_path(), "").expect("arm");
    let v = f2.lvm.thin_volume("vg", "web1").expect("thin");
    let err = v.create_snapshot("s1@7").expect_err("lvm refuses");
    assert!(
        matches!(&err, Error::Lvm { stderr, .. } if stderr.contains("threshold")),
        "{err:?}"
    );
    assert!(v.snapshots().expect("list").is_empty());
    assert_eq!(f.names(), before);
}

#[test]
fn a_missing_lvm_command_is_an_io_error() {
    let lvm = Lvm::new("/nonexistent/lvm");
    assert!(matches!(lvm.volumes(None), Err(Error::Io { .. })));
}
