//! XenHost against a fake hypervisor (see `xc::fake`), a fake `xl` script and a scripted QMP
//! server: the logic around the toolstack, without Xen.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::xc::fake;
use super::xl::Tools;
use super::*;
use crate::{Error, Host, RunState};

mod external;
mod storage;

/// The fake `xl`: logs its arguments, serves `list -l` from `list.json`, and plays
/// `destroy`, `save`, `restore` and `create` on the files of the fake hypervisor.
const FAKE_XL: &str = r#"#!/bin/sh
D=__DIR__
echo "$*" >> $D/log
dm() { mkdir -p $D/proc/7$1; printf 'qemu\000-xen-domid\000%s\000' $1 > $D/proc/7$1/cmdline; }
case "$1" in
list) cat $D/list.json ;;
destroy)
  rm -f $D/xc/$2; echo '[]' > $D/list.json
  (sleep 0.4; rm -rf $D/proc/7$2) > /dev/null 2>&1 &
  ;;
save)
  id=$3; f=$4; cp $D/xc/$id $D/state-at-save
  case "$(cat $D/save-mode 2>/dev/null)" in
  no-open) echo "xl: cannot suspend" >&2; exit 1 ;;
  esac
  if cat $D/mem > "$f"; then echo "0 1" > $D/xc/$id; exit 0; fi
  echo "Failed to save domain, resuming domain" >&2; echo "0 0" > $D/xc/$id; exit 1
  ;;
restore)
  f=$3; id=$(cat $D/next-id)
  cat "$f" > $D/restored
  if [ "$(cat $D/restore-mode 2>/dev/null)" != partial ] && ! cmp -s $D/restored $D/mem; then
    echo "cannot (re-)build domain: -3" >&2; exit 1; fi
  echo "0 1" > $D/xc/$id; cp $D/list-$id.json $D/list.json; dm $id
  [ "$(cat $D/restore-mode 2>/dev/null)" = partial ] && exit 1
  exit 0
  ;;
create)
  p=0; [ "$2" = -p ] && { p=1; shift; }
  id=$(cat $D/next-id); cp "$2" $D/created.cfg
  echo "0 $p" > $D/xc/$id; cp $D/list-$id.json $D/list.json; dm $id
  ;;
*) echo "fake xl: $*?" >&2; exit 2 ;;
esac
"#;

pub(super) fn list_json(domid: u32) -> String {
    json!([{
        "domid": domid,
        "config": {
            "c_info": {"type": "pv", "name": "domd", "uuid": "d0d0d0d0-0000-4000-8000-000000000001"},
            "b_info": {
                "max_vcpus": 1, "max_memkb": 131072, "target_memkb": 131072,
                "kernel": "/root/vmlinuz", "ramdisk": "/root/domU.cpio.gz",
                "cmdline": "console=hvc0 rdinit=/init", "type.pv": {}
            },
            "disks": [
                {"pdev_path": "/images/domd.qcow2", "vdev": "xvda", "backend": "qdisk",
                 "format": "qcow2", "readwrite": 1},
                {"pdev_path": "/images/cd.iso", "vdev": "xvdc", "format": "raw", "is_cdrom": 1}
            ],
            "on_reboot": "restart",
            "on_crash": "coredump_destroy",
            "on_soft_reset": "soft_reset"
        }
    }])
    .to_string()
}

pub(super) struct Lab {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub host: XenHost,
    tools: Tools,
}

/// A second XenHost on the lab's state directory: what the next domsnap process sees.
pub(super) fn reopen(lab: &Lab) -> XenHost {
    XenHost::open_with(&lab.dir.join("state"), lab.tools.clone()).expect("open")
}

impl Lab {
    /// A host whose domain `domd` runs as domain id 5 (ids 6, 7 for its next lives).
    pub fn new() -> Lab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        fake::fail_open(false);
        fake::use_dir(dir.clone());
        for d in ["proc", "run", "state"] {
            fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        let xl = dir.join("xl");
        fs::write(&xl, FAKE_XL.replace("__DIR__", &dir.to_string_lossy())).expect("write xl");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&xl, fs::Permissions::from_mode(0o755)).expect("chmod");
        let xsr = dir.join("xenstore-read");
        let script = format!(
            "#!/bin/sh\necho \"$1\" >> {d}/xs.log\nif test -e {d}/ready; then echo 1; else echo; fi\n",
            d = dir.display()
        );
        fs::write(&xsr, script).expect("write xenstore-read");
        fs::set_permissions(&xsr, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(dir.join("ready"), "").expect("ready");
        for id in [5, 6, 7] {
            fs::write(dir.join(format!("list-{id}.json")), list_json(id)).expect("list");
        }
        fs::write(dir.join("list.json"), list_json(5)).expect("list");
        fs::write(dir.join("next-id"), "6").expect("next-id");
        fake::set_domain(5, 0, 0);
        let dm = dir.join("proc/75");
        fs::create_dir_all(&dm).expect("dm");
        fs::write(dm.join("cmdline"), b"qemu\0-xen-domid\x005\0").expect("dm");
        let tools = Tools {
            xl,
            qmp_dir: dir.join("run"),
            proc_dir: dir.join("proc"),
            dm_exit: Duration::from_secs(5),
            xenstore_read: dir.join("xenstore-read"),
            guest_ready: Duration::from_secs(2),
            lvm: dir.join("lvm"),
        };
        let host = XenHost::open_with(&dir.join("state"), tools.clone()).expect("open");
        Lab {
            _tmp: tmp,
            dir,
            host,
            tools,
        }
    }

    pub fn write(&self, file: &str, content: impl AsRef<[u8]>) {
        fs::write(self.dir.join(file), content).expect("write");
    }

    pub fn read(&self, file: &str) -> String {
        fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    pub fn mem(&self, len: usize) -> Vec<u8> {
        let mem: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        self.write("mem", &mem);
        mem
    }
}

#[test]
fn run_state_follows_xen_flags() {
    use xenctrl_sys::{
        XEN_DOMINF_blocked, XEN_DOMINF_dying, XEN_DOMINF_paused, XEN_DOMINF_shutdown,
    };
    let d = |flags| {
        super::xc::XcDomain {
            domid: 1,
            flags,
            tot_pages: 0,
            handle: [0; 16],
        }
        .run_state()
    };
    assert_eq!(d(0), RunState::Running);
    assert_eq!(d(XEN_DOMINF_blocked), RunState::Running);
    assert_eq!(d(XEN_DOMINF_paused), RunState::Paused);
    assert_eq!(d(XEN_DOMINF_shutdown), RunState::Paused);
    assert_eq!(d(XEN_DOMINF_dying | XEN_DOMINF_paused), RunState::Shutoff);
}

#[test]
fn config_from_xl_list() {
    let listed = config::parse_list(&list_json(5)).expect("parse");
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].domid, listed[0].name.as_str()), (5, "domd"));
    let c = &listed[0].config;
    assert_eq!(config::memory_bytes(c), 128 << 20);
    let disks = config::disks(c);
    assert_eq!(disks.len(), 1, "cdrom left out");
    assert_eq!(disks[0].info.target, "xvda");
    assert_eq!(disks[0].info.path, PathBuf::from("/images/domd.qcow2"));
    assert_eq!(disks[0].info.format, "qcow2");
    assert_eq!(disks[0].backend, "qdisk");
    let cfg = config::render_xl_cfg(c).expect("cfg");
    for want in [
        "name = \"domd\"",
        "type = \"pv\"",
        "memory = 128",
        "vcpus = 1",
        "kernel = \"/root/vmlinuz\"",
        "extra = \"console=hvc0 rdinit=/init\"",
        "on_reboot = \"restart\"",
        "on_crash = \"coredump-destroy\"",
        "'format=qcow2, vdev=xvda, access=rw, backendtype=qdisk, target=/images/domd.qcow2'",
    ] {
        assert!(cfg.contains(want), "{want:?} missing in\n{cfg}");
    }
    assert!(!cfg.contains("soft_reset"), "xl has no such action:\n{cfg}");
    // Domain-0 and garbage
    assert!(
        config::parse_list(r#"[{"domid":0,"config":{"c_info":{"name":"Domain-0"}}}]"#)
            .expect("parse")
            .is_empty()
    );
    assert!(config::parse_list("not json").is_err());
    assert!(config::check_name("../x").is_err());
    assert!(config::check_name(".x").is_err());
    assert!(config::check_name("domd").is_ok());
}

#[test]
fn saved_record_round_trips() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = config::Store::open(tmp.path().join("d")).expect("store");
    let listed = config::parse_list(&list_json(9)).expect("parse");
    let saved = config::Saved::new("domd", 9, listed[0].config.clone());
    store.save(&saved).expect("save");
    assert_eq!(store.load("domd").expect("load"), Some(saved));
    assert_eq!(store.names().expect("names"), vec!["domd".to_string()]);
    assert_eq!(store.load("other").expect("load"), None);
    fs::write(tmp.path().join("d/bad.json"), b"{\"magic\":\"x\"}").expect("write");
    assert!(store.load("bad").is_err());
}

#[test]
fn open_fails_off_xen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fake::use_dir(tmp.path().to_path_buf());
    fake::fail_open(true);
    let tools = Tools {
        xl: PathBuf::from("/nonexistent/xl"),
        qmp_dir: tmp.path().into(),
        proc_dir: tmp.path().into(),
        dm_exit: Duration::from_secs(1),
        xenstore_read: PathBuf::from("/nonexistent/xenstore-read"),
        guest_ready: Duration::from_secs(1),
        lvm: PathBuf::from("/nonexistent/lvm"),
    };
    let err = XenHost::open_with(tmp.path(), tools).expect_err("must fail");
    fake::fail_open(false);
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
}

#[test]
fn domain_states_and_the_remembered_config() {
    let lab = Lab::new();
    let d = lab.host.domain("domd").expect("domain");
    assert_eq!(d.state, RunState::Running);
    assert_eq!(d.memory_bytes, 128 << 20);
    assert_eq!(d.disks.len(), 1);
    fake::set_domain(5, 0, 1);
    assert_eq!(
        lab.host.domain("domd").expect("domain").state,
        RunState::Paused
    );
    assert!(matches!(
        lab.host.domain("nope"),
        Err(Error::NoSuchDomain(_))
    ));
    lab.host.destroy("domd").expect("destroy");
    let d = lab.host.domain("domd").expect("known after destroy");
    assert_eq!(d.state, RunState::Shutoff);
    assert_eq!(d.disks[0].target, "xvda");
    let all = lab.host.domains().expect("domains");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, RunState::Shutoff);
    assert!(matches!(
        lab.host.pause("domd"),
        Err(Error::WrongState {
            state: RunState::Shutoff,
            ..
        })
    ));
}

#[test]
fn pause_and_unpause_are_idempotent_despite_pause_counting() {
    let lab = Lab::new();
    lab.host.pause("domd").expect("pause");
    lab.host.pause("domd").expect("pause again");
    assert_eq!(fake::get(5), Some((0, 1)));
    fake::set_domain(5, 0, 3); // paused by others too
    lab.host.unpause("domd").expect("unpause");
    assert_eq!(fake::get(5), Some((0, 0)));
    lab.host.unpause("domd").expect("unpause again");
    assert_eq!(fake::get(5), Some((0, 0)));
}

#[test]
fn destroy_waits_for_the_device_model() {
    let lab = Lab::new();
    let start = Instant::now();
    lab.host.destroy("domd").expect("destroy");
    assert!(
        !lab.dir.join("proc/75").exists(),
        "returned before the device model exited"
    );
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(fake::get(5), None);
    lab.host.destroy("domd").expect("idempotent");
    assert_eq!(lab.read("log").matches("destroy").count(), 1);
}

#[test]
fn destroy_fails_when_the_device_model_stays() {
    let lab = Lab::new();
    let stuck = lab.dir.join("proc/99");
    fs::create_dir_all(&stuck).expect("mkdir");
    fs::write(stuck.join("cmdline"), b"qemu\0-xen-domid\x005\0").expect("write");
    let start = Instant::now();
    let err = lab.host.destroy("domd").expect_err("DM never exits");
    assert!(matches!(err, Error::DeviceModel { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn save_streams_the_fifo_into_the_sink() {
    let lab = Lab::new();
    let mem = lab.mem(3 << 20);
    let mut sink = Vec::new();
    let n = lab.host.save_memory("domd", &mut sink).expect("save");
    assert_eq!(n, mem.len() as u64);
    assert!(sink == mem, "stream differs");
    assert_eq!(
        lab.host.domain("domd").expect("domain").state,
        RunState::Paused
    );
    assert!(lab.read("log").contains("save -p 5 "));
    // the private directory with the FIFO is gone
    let left: Vec<_> = fs::read_dir(lab.dir.join("state/xen/tmp"))
        .expect("tmp")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn save_of_a_paused_domain_lets_it_run_for_the_suspend() {
    let lab = Lab::new();
    lab.mem(1000);
    fake::set_domain(5, 0, 2);
    lab.host.save_memory("domd", &mut Vec::new()).expect("save");
    assert_eq!(lab.read("state-at-save").trim(), "0 0");
    assert_eq!(
        lab.host.domain("domd").expect("domain").state,
        RunState::Paused
    );
}

/// A sink that fails after `left` bytes.
struct Breaks(usize);
impl Write for Breaks {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() > self.0 {
            return Err(io::Error::other("chunk store full"));
        }
        self.0 -= buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn failed_sink_leaves_the_domain_running() {
    let lab = Lab::new();
    lab.mem(8 << 20);
    let err = lab
        .host
        .save_memory("domd", &mut Breaks(100_000))
        .expect_err("sink fails");
    assert!(matches!(err, Error::Stream { .. }), "{err:?}");
    assert_eq!(
        lab.host.domain("domd").expect("domain").state,
        RunState::Running
    );
}

#[test]
fn save_fails_cleanly_when_xl_never_opens_the_fifo() {
    let lab = Lab::new();
    lab.write("save-mode", "no-open");
    let start = Instant::now();
    let err = lab
        .host
        .save_memory("domd", &mut Vec::new())
        .expect_err("xl fails");
    assert!(start.elapsed() < Duration::from_secs(5));
    match err {
        Error::Toolstack { stderr, .. } => assert!(stderr.contains("cannot suspend"), "{stderr}"),
        e => panic!("{e:?}"),
    }
    assert_eq!(
        lab.host.domain("domd").expect("domain").state,
        RunState::Running
    );
}

#[test]
fn restore_feeds_the_source_into_xl_and_leaves_it_paused() {
    let lab = Lab::new();
    let mem = lab.mem(5 << 20);
    assert!(matches!(
        lab.host.restore_memory("domd", &mut &mem[..]),
        Err(Error::WrongState {
            state: RunState::Running,
            ..
        })
    ));
    lab.host.destroy("domd").expect("destroy");
    lab.host
        .restore_memory("domd", &mut &mem[..])
        .expect("restore");
    assert!(fs::read(lab.dir.join("restored")).expect("restored") == mem);
    assert_eq!(
        lab.host.domain("domd").expect("domain").state,
        RunState::Paused
    );
    assert!(lab.read("log").contains("restore -p "));
}

/// A source that fails after `left` bytes.
struct Torn<'a>(&'a [u8], usize);
impl Read for Torn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.1 == 0 {
            return Err(io::Error::other("chunk missing"));
        }
        let n = buf.len().min(self.1).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        self.1 -= n;
        Ok(n)
    }
}

#[test]
fn torn_source_leaves_the_domain_shut_off() {
    let lab = Lab::new();
    let mem = lab.mem(4 << 20);
    lab.host.destroy("domd").expect("destroy");
    let err = lab
        .host
        .restore_memory("domd", &mut Torn(&mem, 1 << 20))
        .expect_err("torn");
    assert!(matches!(err, Error::Stream { .. }), "{err:?}");
    assert_eq!(
        lab.host.domain("domd").expect("domain").state,
        RunState::Shutoff
    );
    // xl failing after it made a domain: the half-built domain is destroyed
    lab.write("restore-mode", "partial");
    lab.write("next-id", "7");
    let err = lab
        .host
        .restore_memory("domd", &mut &mem[..])
        .expect_err("xl fails");
    assert!(matches!(err, Error::Toolstack { .. }), "{err:?}");
    assert_eq!(
        lab.host.domain("domd").expect("domain").state,
        RunState::Shutoff
    );
    assert_eq!(fake::get(7), None);
}

#[test]
fn start_boots_from_the_remembered_config() {
    let lab = Lab::new();
    lab.host.destroy("domd").expect("destroy");
    lab.host.start("domd", true).expect("start");
    assert_eq!(
        lab.host.domain("domd").expect("domain").state,
        RunState::Paused
    );
    let cfg = lab.read("created.cfg");
    assert!(cfg.contains("target=/images/domd.qcow2"), "{cfg}");
    assert!(lab.read("log").contains("create -p "));
    assert!(matches!(
        lab.host.start("domd", false),
        Err(Error::WrongState { .. })
    ));
}

/// A QMP server for domain 5's device model: one disk node `xvda-qcow2` whose snapshot table
/// is `snaps`; sends an event before every reply. Records the commands it got.
pub(super) fn qmp_server(lab: &Lab, snaps: Vec<String>) -> Arc<Mutex<Vec<Value>>> {
    let listener = UnixListener::bind(lab.dir.join("run/qmp-libxl-5")).expect("bind");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut snaps = snaps;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let _ = writeln!(
                conn,
                r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#
            );
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                let cmd: Value = serde_json::from_str(&line).expect("json");
                line.clear();
                log.lock().expect("lock").push(cmd.clone());
                let name = cmd["arguments"]["name"].as_str().unwrap_or("").to_string();
                let ret = match cmd["execute"].as_str() {
                    Some("query-named-block-nodes") => {
                        let s: Vec<Value> = snaps.iter().map(|n| json!({"name": n})).collect();
                        json!([{"node-name": "xvda-qcow2", "image": {"snapshots": s}}])
                    }
                    Some("blockdev-snapshot-internal-sync") => {
                        snaps.push(name);
                        json!({})
                    }
                    Some("blockdev-snapshot-delete-internal-sync") => {
                        snaps.retain(|s| *s != name);
                        json!({})
                    }
                    _ => json!({}),
                };
                let _ = writeln!(conn, r#"{{"event": "JOB_STATUS_CHANGE", "data": {{}}}}"#);
                let _ = writeln!(conn, "{}", json!({"return": ret, "id": cmd["id"]}));
            }
        }
    });
    seen
}

#[test]
fn disks_of_an_active_domain_go_through_qmp() {
    let lab = Lab::new();
    let seen = qmp_server(&lab, vec!["old".into()]);
    assert_eq!(
        lab.host.disk_snapshots("domd", "xvda").expect("list"),
        vec!["old"]
    );
    lab.host
        .create_disk_snapshot("domd", "xvda", "c1")
        .expect("create");
    lab.host
        .create_disk_snapshot("domd", "xvda", "c1")
        .expect("idempotent");
    lab.host
        .delete_disk_snapshot("domd", "xvda", "old")
        .expect("delete");
    lab.host
        .delete_disk_snapshot("domd", "xvda", "old")
        .expect("idempotent");
    assert_eq!(
        lab.host.disk_snapshots("domd", "xvda").expect("list"),
        vec!["c1"]
    );
    let cmds = seen.lock().expect("lock").clone();
    let creates: Vec<_> = cmds
        .iter()
        .filter(|c| c["execute"] == "blockdev-snapshot-internal-sync")
        .collect();
    assert_eq!(creates.len(), 1);
    assert_eq!(
        creates[0]["arguments"],
        json!({"device": "xvda-qcow2", "name": "c1"})
    );
    assert!(matches!(
        lab.host.disk_snapshots("domd", "xvdz"),
        Err(Error::NoSuchDisk { .. })
    ));
    assert!(matches!(
        lab.host.apply_disk_snapshot("domd", "xvda", "c1"),
        Err(Error::WrongState { .. })
    ));
}

#[test]
fn dead_device_model_is_a_device_model_error() {
    let lab = Lab::new();
    // no QMP server listening
    let err = lab
        .host
        .create_disk_snapshot("domd", "xvda", "c1")
        .expect_err("no DM");
    assert!(matches!(err, Error::DeviceModel { .. }), "{err:?}");
}

#[test]
fn disks_of_a_shut_off_domain_go_to_the_image() {
    let lab = Lab::new();
    let img = lab.dir.join("img.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", path(&img), "1M"]);
    qemu_io_write(&img, 0x11);
    let listed = lab
        .read("list-5.json")
        .replace("/images/domd.qcow2", &img.to_string_lossy());
    lab.write("list.json", &listed);
    lab.host.destroy("domd").expect("destroy");
    lab.host
        .create_disk_snapshot("domd", "xvda", "d1")
        .expect("create");
    lab.host
        .create_disk_snapshot("domd", "xvda", "d1")
        .expect("idempotent");
    assert_eq!(
        lab.host.disk_snapshots("domd", "xvda").expect("list"),
        vec!["d1"]
    );
    // What the snapshot holds is overwritten, then brought back by apply.
    qemu_io_write(&img, 0x22);
    assert_eq!(qemu_io_read_byte(&img), 0x22);
    lab.host
        .apply_disk_snapshot("domd", "xvda", "d1")
        .expect("apply");
    assert_eq!(
        qemu_io_read_byte(&img),
        0x11,
        "apply brought d1's data back"
    );
    qemu_io_write(&img, 0x33);
    lab.host
        .apply_disk_snapshot("domd", "xvda", "d1")
        .expect("apply again");
    assert_eq!(qemu_io_read_byte(&img), 0x11, "a second apply too");
    assert!(matches!(
        lab.host.apply_disk_snapshot("domd", "xvda", "nope"),
        Err(Error::NoSuchDiskSnapshot { .. })
    ));
    lab.host
        .delete_disk_snapshot("domd", "xvda", "d1")
        .expect("delete");
    lab.host
        .delete_disk_snapshot("domd", "xvda", "d1")
        .expect("idempotent");
    assert!(lab
        .host
        .disk_snapshots("domd", "xvda")
        .expect("list")
        .is_empty());
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs a QEMU tool; a missing tool or a failure fails the test (never a skip).
pub(super) fn qemu(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} is needed by this test: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fills the first 64 KiB of a qcow2 image with `byte`.
pub(super) fn qemu_io_write(img: &std::path::Path, byte: u8) {
    let cmd = format!("write -P {byte} 0 64k");
    qemu(&["qemu-io", "-f", "qcow2", "-c", &cmd, path(img)]);
}

/// The byte the first 64 KiB of a qcow2 image are filled with (fails if they differ).
pub(super) fn qemu_io_read_byte(img: &std::path::Path) -> u8 {
    for byte in [0x11u8, 0x22, 0x33] {
        let cmd = format!("read -P {byte} 0 64k");
        let out = std::process::Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c", &cmd, path(img)])
            .output()
            .expect("qemu-io is needed by this test");
        // qemu-io reports a pattern mismatch on stdout and still exits 0.
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && !text.contains("Pattern verification failed") {
            return byte;
        }
    }
    panic!("{} holds none of the test patterns", img.display());
}

#[test]
fn save_waits_for_a_booting_guest() {
    let lab = Lab::new();
    lab.mem(1000);
    fs::remove_file(lab.dir.join("ready")).expect("rm");
    let ready = lab.dir.join("ready");
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        fs::write(ready, "").expect("ready");
    });
    let start = Instant::now();
    lab.host.save_memory("domd", &mut Vec::new()).expect("save");
    assert!(start.elapsed() >= Duration::from_millis(600));
    assert!(
        start.elapsed() < Duration::from_millis(1900),
        "waited for the timeout"
    );
    t.join().expect("join");
    assert!(lab
        .read("xs.log")
        .contains("/local/domain/5/control/feature-suspend"));
    // a guest that never says so: save is tried after guest_ready anyway
    fs::remove_file(lab.dir.join("ready")).expect("rm");
    fake::set_domain(5, 0, 0);
    lab.host.save_memory("domd", &mut Vec::new()).expect("save");
}
