//! A fake `lvm` command for tests (feature `testing`): a shell script keeping its volumes in
//! a text file, one line per LV: `vg|name|attr|pool|tags|major|minor|data%|meta%|content`,
//! where `content` stands for the blocks of the volume (a snapshot copies its origin's). It
//! answers `lvs --reportformat json`, `lvcreate -s`, `lvrename` and `lvremove` as LVM does,
//! logs every command line to `<state>.log`, and refuses every `lvcreate` while
//! [`FakeLvm::fail_create_path`] exists (as LVM does for a pool over its threshold).
#![allow(clippy::unwrap_used, missing_docs)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::Lvm;

/// The script; `__STATE__` stands for the state file.
pub const SCRIPT: &str = r#"#!/bin/sh
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
  name= tags= act=-1 min=0
  while [ $# -gt 1 ]; do case $1 in -n) name=$2; shift;; --addtag) tags=$2; shift;; -ay) act=253; min=$((100 + $(wc -l < $S)));; esac; shift; done
  origin=${1#*/}
  [ -e $S.fail-create ] && { echo "  Cannot create new thin volume, free space in thin pool vg/pool reached threshold." >&2; exit 5; }
  [ -n "$(field "$origin" 2)" ] || { echo "  Failed to find LV $origin" >&2; exit 5; }
  [ -z "$(field "$name" 2)" ] || { echo "  Logical Volume \"$name\" already exists" >&2; exit 5; }
  echo "vg|$name|Vwi---tz-k|$(field "$origin" 4)|$tags|$act|$min|||$(field "$origin" 10)" >> $S ;;
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

/// A fake `lvm` in a directory of the caller's.
#[derive(Debug)]
pub struct FakeLvm {
    state: PathBuf,
    program: PathBuf,
}

impl FakeLvm {
    /// Writes the script and the state (`volumes`: lines as in the module documentation)
    /// into `dir`.
    pub fn new(dir: &Path, volumes: &str) -> FakeLvm {
        let state = dir.join("lvs");
        fs::write(&state, volumes).expect("fake lvm state");
        let program = dir.join("lvm");
        fs::write(
            &program,
            SCRIPT.replace("__STATE__", &state.to_string_lossy()),
        )
        .expect("fake lvm");
        fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).expect("chmod");
        FakeLvm { state, program }
    }

    /// The script's path.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// An [`Lvm`] running the script.
    pub fn lvm(&self) -> Lvm {
        Lvm::new(&self.program)
    }

    fn lines(&self) -> Vec<Vec<String>> {
        fs::read_to_string(&self.state)
            .expect("state")
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    }

    /// Every LV name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.lines().into_iter().map(|l| l[1].clone()).collect();
        n.sort();
        n
    }

    /// The content of LV `name`.
    pub fn content(&self, name: &str) -> String {
        self.lines()
            .into_iter()
            .find(|l| l[1] == name)
            .map(|l| l[9].clone())
            .unwrap_or_else(|| panic!("no LV {name}"))
    }

    /// The device number of LV `name`, if active.
    pub fn device(&self, name: &str) -> Option<(u32, u32)> {
        let l = self.lines().into_iter().find(|l| l[1] == name)?;
        Some((l[5].parse().ok()?, l[6].parse().ok()?))
    }

    /// The guest writes: the content of LV `name` becomes `c`.
    pub fn write(&self, name: &str, c: &str) {
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

    /// Adds an LV line.
    pub fn append(&self, line: &str) {
        let text = fs::read_to_string(&self.state).expect("state") + line + "\n";
        fs::write(&self.state, text).expect("write");
    }

    /// Renames an LV (as a crash in the middle of an apply leaves it).
    pub fn rename(&self, from: &str, to: &str) {
        let text = fs::read_to_string(&self.state)
            .expect("state")
            .replace(&format!("|{from}|"), &format!("|{to}|"));
        fs::write(&self.state, text).expect("write");
    }

    /// Every command line run so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.state.with_extension("log")).unwrap_or_default()
    }

    /// While this file exists, `lvcreate` fails.
    pub fn fail_create_path(&self) -> PathBuf {
        self.state.with_extension("fail-create")
    }
}
