//! External snapshots on the (fake) Xen host: real qcow2 images, and a QMP server that keeps
//! a node graph the way QEMU does (blockdev-add, blockdev-snapshot, block-stream).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::super::config;
use super::{list_json, qemu, qemu_io_read_byte, qemu_io_write, reopen, Lab};
use crate::{Error, Host, RunState};

/// One qcow2 node of the fake device model.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    file: PathBuf,
    backing: Option<String>,
}

type Graph = Arc<Mutex<(Vec<Node>, Vec<Value>)>>;

/// The device model of domain 5: `nodes` to begin with; records every command.
fn device_model(lab: &Lab, nodes: Vec<Node>) -> Graph {
    let _ = fs::remove_file(lab.dir.join("run/qmp-libxl-5"));
    let listener = UnixListener::bind(lab.dir.join("run/qmp-libxl-5")).expect("bind");
    let graph: Graph = Arc::new(Mutex::new((nodes, Vec::new())));
    let g = graph.clone();
    std::thread::spawn(move || {
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
                let mut state = g.lock().expect("lock");
                state.1.push(cmd.clone());
                let a = &cmd["arguments"];
                let s = |k: &str| a[k].as_str().unwrap_or_default().to_string();
                let ret = match cmd["execute"].as_str().unwrap_or_default() {
                    "query-named-block-nodes" => {
                        let nodes = &state.0;
                        let depth = |n: &Node| {
                            let mut d = 0;
                            let mut b = n.backing.clone();
                            while let Some(x) = b {
                                d += 1;
                                b = nodes
                                    .iter()
                                    .find(|m| m.name == x)
                                    .and_then(|m| m.backing.clone());
                            }
                            d
                        };
                        json!(nodes
                            .iter()
                            .map(|n| json!({"node-name": n.name, "drv": "qcow2",
                                "file": n.file.to_string_lossy(), "backing_file_depth": depth(n)}))
                            .collect::<Vec<_>>())
                    }
                    "blockdev-add" => {
                        state.0.push(Node {
                            name: s("node-name"),
                            file: PathBuf::from(a["file"]["filename"].as_str().unwrap_or_default()),
                            backing: None,
                        });
                        json!({})
                    }
                    "blockdev-snapshot" => {
                        let (node, overlay) = (s("node"), s("overlay"));
                        if let Some(o) = state.0.iter_mut().find(|n| n.name == overlay) {
                            o.backing = Some(node);
                        }
                        json!({})
                    }
                    "block-stream" => {
                        // QEMU copies the data in and rewrites the backing file: so does this.
                        let (device, base) = (s("device"), s("base-node"));
                        let file =
                            |n: &str| state.0.iter().find(|x| x.name == n).map(|x| x.file.clone());
                        let child = file(&device).expect("device node");
                        let base_file = if base.is_empty() { None } else { file(&base) };
                        disk::rebase(&child, base_file.as_deref()).expect("stream");
                        if let Some(c) = state.0.iter_mut().find(|n| n.name == device) {
                            c.backing = (!base.is_empty()).then_some(base);
                        }
                        json!({})
                    }
                    _ => json!([]),
                };
                let _ = writeln!(conn, "{}", json!({"return": ret, "id": cmd["id"]}));
            }
        }
    });
    graph
}

fn commands(g: &Graph) -> Vec<String> {
    g.lock()
        .expect("lock")
        .1
        .iter()
        .map(|c| c["execute"].as_str().unwrap_or_default().to_string())
        .filter(|c| c != "qmp_capabilities" && c != "query-named-block-nodes")
        .collect()
}

/// `domd` (running, domain id 5) with one qcow2 disk `xvda` on `<lab>/img/xvda.qcow2`, whose
/// first 64 KiB hold 0x11.
fn lab_with_image() -> (Lab, PathBuf) {
    let lab = Lab::new();
    let dir = lab.dir.join("img");
    fs::create_dir_all(&dir).expect("mkdir");
    let base = dir.join("xvda.qcow2");
    disk::create_image(&base, 1 << 20, None).expect("image");
    qemu_io_write(&base, 0x11);
    let mut v: Value = serde_json::from_str(&list_json(5)).expect("json");
    v[0]["config"]["disks"][0]["pdev_path"] = json!(base.to_string_lossy());
    lab.write("list.json", v.to_string());
    let mut v6 = v.clone();
    v6[0]["domid"] = json!(6);
    lab.write("list-6.json", v6.to_string());
    (lab, base)
}

fn path_of(host: &dyn Host) -> PathBuf {
    host.domain("domd").expect("domain").disks[0].path.clone()
}

#[test]
fn a_paused_domain_moves_to_the_overlay_through_qmp_and_the_store_remembers() {
    let (lab, base) = lab_with_image();
    let g = device_model(
        &lab,
        vec![Node {
            name: "xvda-qcow2".into(),
            file: base.clone(),
            backing: None,
        }],
    );
    let ov = base.with_file_name("xvda-7.qcow2");
    assert!(matches!(
        lab.host.create_external_snapshot("domd", "xvda", &ov),
        Err(Error::WrongState {
            state: RunState::Running,
            ..
        })
    ));
    lab.host.pause("domd").expect("pause");
    for bad in [
        PathBuf::from("xvda-7.qcow2"),
        lab.dir.join("xvda-7.qcow2"),
        base.with_file_name("../img/xvda-7.qcow2"),
        base.with_file_name(".hidden.qcow2"),
        base.with_file_name("x y.qcow2"),
    ] {
        assert!(
            matches!(
                lab.host.create_external_snapshot("domd", "xvda", &bad),
                Err(Error::Invalid(_))
            ),
            "{}",
            bad.display()
        );
    }
    assert!(commands(&g).is_empty(), "refusals touched the device model");
    lab.host
        .create_external_snapshot("domd", "xvda", &ov)
        .expect("external snapshot");
    assert_eq!(commands(&g), ["blockdev-add", "blockdev-snapshot"]);
    let seen = g.lock().expect("lock").1.clone();
    let snap = seen
        .iter()
        .find(|c| c["execute"] == "blockdev-snapshot")
        .expect("snapshot");
    assert_eq!(
        snap["arguments"],
        json!({"node": "xvda-qcow2", "overlay": "ds-xvda-7"})
    );
    assert_eq!(path_of(&lab.host), ov);
    assert_eq!(
        disk::backing_file(&ov).expect("backing"),
        Some(base.clone())
    );
    lab.host
        .create_external_snapshot("domd", "xvda", &ov)
        .expect("again");
    assert_eq!(commands(&g).len(), 2, "idempotent");
    // the next process: xl still names the old image; the store wins for this incarnation
    assert_eq!(path_of(&reopen(&lab)), ov);
    // and a restore of a stream saved with the old path boots on the overlay
    lab.host.destroy("domd").expect("destroy");
    let mut stream = b"Xen saved domain, xl format\n \0 \r".to_vec();
    let cfg = {
        let mut c = config::parse_list(&list_json(5)).expect("parse")[0]
            .config
            .clone();
        c["disks"][0]["pdev_path"] = json!(base.to_string_lossy());
        let mut b = c.to_string().into_bytes();
        b.push(0);
        b
    };
    for w in [0x0102_0304u32, 3, 0, 4 + cfg.len() as u32, cfg.len() as u32] {
        stream.extend_from_slice(&w.to_ne_bytes());
    }
    stream.extend_from_slice(&cfg);
    stream.extend_from_slice(b"pages");
    lab.write("mem", "unused");
    lab.write("restore-mode", "partial");
    let _ = lab.host.restore_memory("domd", &mut &stream[..]);
    let restored = fs::read(lab.dir.join("restored")).expect("restored");
    let text = String::from_utf8_lossy(&restored);
    assert!(text.contains(&*ov.to_string_lossy()), "{text}");
    assert!(!text.contains(&format!("\"{}\"", base.display())), "{text}");
}

#[test]
fn an_interrupted_switch_is_settled_by_asking_the_device_model() {
    for switched in [false, true] {
        let (lab, base) = lab_with_image();
        let ov = base.with_file_name("xvda-7.qcow2");
        disk::create_overlay(&base, &ov).expect("overlay");
        let mut nodes = vec![Node {
            name: "xvda-qcow2".into(),
            file: base.clone(),
            backing: None,
        }];
        if switched {
            nodes.push(Node {
                name: "ds-xvda-7".into(),
                file: ov.clone(),
                backing: Some("xvda-qcow2".into()),
            });
        }
        device_model(&lab, nodes);
        lab.host.domain("domd").expect("domain");
        // what a crash between recording the switch and finishing it leaves
        let store = config::Store::open(lab.dir.join("state/xen/domains")).expect("store");
        let mut saved = store.load("domd").expect("load").expect("saved");
        saved.switch = Some(config::Switch {
            target: "xvda".into(),
            from: base.clone(),
            to: ov.clone(),
        });
        store.save(&saved).expect("save");
        let host = reopen(&lab);
        let want = if switched { &ov } else { &base };
        assert_eq!(&path_of(&host), want, "switched: {switched}");
        assert!(store
            .load("domd")
            .expect("load")
            .expect("saved")
            .switch
            .is_none());
    }
}

#[test]
fn revert_and_removal_keep_what_every_image_reads() {
    let (lab, base) = lab_with_image();
    let g = device_model(
        &lab,
        vec![Node {
            name: "xvda-qcow2".into(),
            file: base.clone(),
            backing: None,
        }],
    );
    let ov1 = base.with_file_name("xvda-7.qcow2");
    lab.host.pause("domd").expect("pause");
    lab.host
        .create_external_snapshot("domd", "xvda", &ov1)
        .expect("snapshot");
    lab.host.unpause("domd").expect("unpause");
    qemu_io_write(&ov1, 0x22); // the guest writes after the snapshot
                               // running: removing the frozen base streams it into the overlay the guest uses
    assert!(matches!(
        lab.host.remove_image("domd", "xvda", &ov1),
        Err(Error::Invalid(_))
    ));
    // shut off: revert onto a fresh overlay of the base, then remove the old overlay
    lab.host.destroy("domd").expect("destroy");
    let ov2 = base.with_file_name("xvda-9.qcow2");
    lab.host
        .revert_external_snapshot("domd", "xvda", &base, &ov2)
        .expect("revert");
    lab.host
        .revert_external_snapshot("domd", "xvda", &base, &ov2)
        .expect("revert again");
    assert_eq!(path_of(&lab.host), ov2);
    assert_eq!(
        qemu_io_read_byte(&ov2),
        0x11,
        "the revert reads the snapshot"
    );
    lab.host
        .remove_image("domd", "xvda", &ov1)
        .expect("remove ov1");
    assert!(!ov1.exists());
    lab.host
        .remove_image("domd", "xvda", &ov1)
        .expect("idempotent");
    // removing the base pulls its data into the one image still on it
    lab.host
        .remove_image("domd", "xvda", &base)
        .expect("remove base");
    assert!(!base.exists());
    assert_eq!(disk::backing_file(&ov2).expect("backing"), None);
    assert_eq!(qemu_io_read_byte(&ov2), 0x11);
    qemu(&["qemu-img", "check", "-q", ov2.to_str().expect("utf-8")]);
    assert_eq!(commands(&g), ["blockdev-add", "blockdev-snapshot"]);
}

#[test]
fn removing_the_base_of_a_running_domain_streams_it_into_the_overlay() {
    let (lab, base) = lab_with_image();
    let ov1 = base.with_file_name("xvda-7.qcow2");
    disk::create_overlay(&base, &ov1).expect("overlay");
    qemu_io_write(&ov1, 0x22);
    let mut v: Value = serde_json::from_str(&lab.read("list.json")).expect("json");
    v[0]["config"]["disks"][0]["pdev_path"] = json!(ov1.to_string_lossy());
    lab.write("list.json", v.to_string());
    let g = device_model(
        &lab,
        vec![
            Node {
                name: "xvda-qcow2".into(),
                file: base.clone(),
                backing: None,
            },
            Node {
                name: "ds-xvda-7".into(),
                file: ov1.clone(),
                backing: Some("xvda-qcow2".into()),
            },
        ],
    );
    lab.host
        .remove_image("domd", "xvda", &base)
        .expect("remove base");
    assert!(!base.exists());
    assert_eq!(
        commands(&g),
        ["query-block-jobs", "block-stream", "query-block-jobs"]
    );
    assert_eq!(disk::backing_file(&ov1).expect("backing"), None);
    assert_eq!(qemu_io_read_byte(&ov1), 0x22);
    assert!(Path::new(&ov1).exists());
}
