//! The thin volume backend against a fake `lvm` command that keeps its volumes in a text
//! file, one line per LV: `vg|name|attr|pool|tags|major|minor|data%|meta%|content`, where
//! `content` stands for the blocks of the volume (a snapshot copies its origin's).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::*;

const FAKE_LVM: &str = r#"#!/bin/sh
S=__STATE__
echo "$*" >> $S.log
cmd=$1; shift
field() { awk -F'|' -v n="$1" -v f="$2" '$2==n {print $f}' $S; }
case $cmd in
lvs)
  printf '{"report":[{"lv":['; sep=
  while IFS='|' read vg name attr pool tags ma mi data meta content; do
    [ -n "$vg" ] || continue
    printf '%s{"vg_name":"%s","lv_name":"%s","lv_attr":"%s","pool_lv":"%s","lv_tags":"%s","lv_kernel_major":"%s","lv_kernel_minor":"%s","data_percent":"%s","metadata_percent":"%s"}' \
      "$sep" "$vg" "$name" "$attr" "$pool" "$tags" "$ma" "$mi" "$data" "$meta"; sep=,
  done < $S
  printf ']}]}\n' ;;
lvcreate)
  name= tags= act=-1
  while [ $# -gt 1 ]; do case $1 in -n) name=$2; shift;; --addtag) tags=$2; shift;; -ay) act=253;; esac; shift; done
  origin=${1#*/}
  [ -e $S.fail-create ] && { echo "  Cannot create new thin volume, free space in thin pool vg/pool reached threshold." >&2; exit 5; }
  [ -n "$(field "$origin" 2)" ] || { echo "  Failed to find LV $origin" >&2; exit 5; }
  [ -z "$(field "$name" 2)" ] || { echo "  Logical Volume \"$name\" already exists" >&2; exit 5; }
  echo "vg|$name|Vwi---tz-k|$(field "$origin" 4)|$tags|$act|0|||$(field "$origin" 10)" >> $S ;;
lvrename)
  while [ "${1#-}" != "$1" ]; do shift; done
  [ -n "$(field "$2" 2)" ] || { echo "  Existing logical volume \"$2\" not found" >&2; exit 5; }
  awk -F'|' -v OFS='|' -v o="$2" -v n="$3" '$2==o {$2=n} {print}' $S > $S.tmp && mv $S.tmp $S ;;
lvremove)
  while [ $# -gt 1 ]; do shift; done; lv=${1#*/}
  [ -n "$(field "$lv" 2)" ] || { echo "  Failed to find logical volume \"$1\"" >&2; exit 5; }
  awk -F'|' -v n="$lv" '$2!=n' $S > $S.tmp && mv $S.tmp $S ;;
*) echo "fake lvm: $cmd?" >&2; exit 3 ;;
esac
"#;

struct Fake {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    lvm: Lvm,
}

impl Fake {
    /// A volume group `vg` with thin pool `pool` (data `data`% used), thin volume `web1`
    /// (content `A`) and thick volume `thick`.
    fn new(data: &str) -> Fake {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = tmp.path().join("lvs");
        fs::write(
            &state,
            format!(
                "vg|pool|twi-aotz--||||-1|{data}|10.00|\n\
                 vg|web1|Vwi-aotz--|pool||253|3|||A\n\
                 vg|thick|-wi-a-----|||253|4|||T\n"
            ),
        )
        .expect("state");
        let program = tmp.path().join("lvm");
        let script = FAKE_LVM.replace("__STATE__", &state.to_string_lossy());
        fs::write(&program, script).expect("lvm");
        fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).expect("chmod");
        Fake {
            lvm: Lvm::new(&program),
            state,
            _tmp: tmp,
        }
    }

    fn lines(&self) -> Vec<Vec<String>> {
        fs::read_to_string(&self.state)
            .expect("state")
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    }

    fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.lines().into_iter().map(|l| l[1].clone()).collect();
        n.sort();
        n
    }

    fn content(&self, name: &str) -> String {
        self.lines()
            .into_iter()
            .find(|l| l[1] == name)
            .map(|l| l[9].clone())
            .unwrap_or_else(|| panic!("no LV {name}"))
    }

    /// The guest writes: the origin's content becomes `c`.
    fn write(&self, name: &str, c: &str) {
        let text: Vec<String> = self
            .lines()
            .into_iter()
            .map(|mut l| {
                if l[1] == name {
                    l[9] = c.to_string();
                }
                l.join("|")
            })
            .collect();
        fs::write(&self.state, text.join("\n") + "\n").expect("write");
    }

    fn log(&self) -> String {
        fs::read_to_string(self.state.with_extension("log")).unwrap_or_default()
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
    fs::write(
        &f.state,
        fs::read_to_string(&f.state).expect("state") + "vg|web1.look+1|Vwi---tz-k|pool||-1|0|||X\n",
    )
    .expect("write");
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
            append(f, "vg|web1.revert-new|Vwi-a-tz--|pool||253|9|||A");
        }),
        ("after renaming the origin", |f| {
            rename(f, "web1", "web1.revert-old");
            f.write("web1.revert-old", "B");
            append(f, "vg|web1.revert-new|Vwi-a-tz--|pool||253|9|||A");
        }),
        ("after renaming the new volume", |f| {
            append(f, "vg|web1.revert-old|Vwi-a-tz--|pool||253|9|||B");
        }),
        (
            "an apply of another snapshot, after renaming the origin",
            |f| {
                rename(f, "web1", "web1.revert-old");
                append(f, "vg|web1.revert-new|Vwi-a-tz--|pool||253|9|||OTHER");
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

fn append(f: &Fake, line: &str) {
    let text = fs::read_to_string(&f.state).expect("state") + line + "\n";
    fs::write(&f.state, text).expect("write");
}

fn rename(f: &Fake, from: &str, to: &str) {
    let text = fs::read_to_string(&f.state)
        .expect("state")
        .replace(&format!("|{from}|"), &format!("|{to}|"));
    fs::write(&f.state, text).expect("write");
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
    fs::write(f2.state.with_extension("fail-create"), "").expect("arm");
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
