//! External snapshots on the simulated host, with real guest processes and real qcow2
//! chains, checked with QEMU's tools (`qemu-img`, `qemu-io`).

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

use xen::contract::{qemu_img_check, qemu_img_check_allow_leaks, read_disk, read_disk_u64};
use xen::sim::{SimHost, Workload};
use xen::{Error, Host, RunState};

mod common;
use common::*;

fn domain_dir(host: &SimHost, name: &str) -> PathBuf {
    host.state_dir().join("sim/domains").join(name)
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Writes `len` bytes of `pattern` at `offset` with qemu-io (the image must not be open).
fn qemu_write(path: &Path, pattern: u8, offset: u64, len: u64) {
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} {offset} {len}"),
            s(path),
        ],
    );
}

/// A raw copy of what a qcow2 image (with its backing chain) reads.
fn raw_copy(path: &Path, to: &Path) {
    run(
        "qemu-img",
        &["convert", "-U", "-f", "qcow2", "-O", "raw", s(path), s(to)],
    );
}

/// `qemu-img compare`: Ok if the two read identically.
fn compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", a_fmt, "-F", b_fmt, s(a), s(b)])
        .output()
        .expect("run qemu-img compare");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} vs {}: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The file names of the backing chain of `top`, from `qemu-img info --backing-chain`.
fn qemu_chain(top: &Path) -> Vec<String> {
    let out = run(
        "qemu-img",
        &[
            "info",
            "-U",
            "--backing-chain",
            "--output=json",
            "-f",
            "qcow2",
            s(top),
        ],
    );
    let infos: serde_json::Value = serde_json::from_str(&out).expect("qemu-img json");
    infos
        .as_array()
        .expect("array")
        .iter()
        .map(|i| {
            let f = i["filename"].as_str().expect("filename");
            Path::new(f)
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn qcow2_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".qcow2"))
        .collect();
    names.sort();
    names
}

#[test]
fn external_snapshot_contract() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("xc", MIB, &[8 * MIB]).expect("define");
    xen::contract::external_snapshots(&host, "xc");
    assert_eq!(state(&host, "xc"), RunState::Shutoff);
}

/// A chain built while the counter runs: each frozen image keeps the counter it had when
/// frozen; reverting to each one reads exactly it and the domain counts on from there.
#[test]
fn chain_while_running_then_revert_to_each_position() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("ch", MIB, &[16 * MIB]).expect("define");
    let dir = domain_dir(&host, "ch");
    // Data below the counter: overlays must copy it up when the counter's cluster is written.
    qemu_write(&xvda(&host, "ch"), 0x5a, 0, MIB);

    host.start("ch", false).expect("start");
    // (frozen image, counter on it, memory image saved then)
    let mut frozen: Vec<(PathBuf, u64, Vec<u8>)> = Vec::new();
    let mut last = 0;
    for i in 1..=5 {
        wait_counter(&host, "ch", last + 20);
        let overlay = dir.join(format!("xvda.s{i}.qcow2"));
        assert!(
            matches!(
                host.create_external_snapshot("ch", "xvda", &overlay),
                Err(Error::WrongState {
                    state: RunState::Running,
                    ..
                })
            ),
            "refused while running"
        );
        let mut memory = Vec::new();
        host.save_memory("ch", &mut memory).expect("save (pauses)");
        assert_eq!(state(&host, "ch"), RunState::Paused);
        let m = host.memory_counter("ch").expect("counter");
        let image = xvda(&host, "ch");
        let d = read_disk_u64(&image, 0);
        assert!(d == m || d == m + 1, "memory {m}, disk {d}");
        host.create_external_snapshot("ch", "xvda", &overlay)
            .expect("external snapshot");
        assert_eq!(xvda(&host, "ch"), overlay, "the disk is on the overlay");
        host.create_external_snapshot("ch", "xvda", &overlay)
            .expect("idempotent");
        assert_eq!(read_disk_u64(&overlay, 0), d, "overlay reads through");
        frozen.push((image, d, memory));
        host.unpause("ch").expect("unpause");
        last = m;
        for (path, value, _) in &frozen {
            assert_eq!(read_disk_u64(path, 0), *value, "{} changed", path.display());
        }
    }
    wait_counter(&host, "ch", last + 20);
    host.pause("ch").expect("pause");
    let top = xvda(&host, "ch");
    assert!(read_disk_u64(&top, 0) > last);
    // The rest of the counter's cluster was copied up from the base.
    assert!(read_disk(&top, 8, 4088).iter().all(|&b| b == 0x5a));
    assert!(read_disk(&top, 65536, 4096).iter().all(|&b| b == 0x5a));
    let mut expected = vec!["xvda.s5.qcow2".to_owned()];
    expected.extend((1..=4).rev().map(|i| format!("xvda.s{i}.qcow2")));
    expected.push("xvda.qcow2".to_owned());
    assert_eq!(qemu_chain(&top), expected);
    host.shutdown("ch").expect("shutdown");
    for name in &expected {
        qemu_img_check(&dir.join(name));
    }
    for (path, value, _) in &frozen {
        assert_eq!(read_disk_u64(path, 0), *value, "{} changed", path.display());
    }

    // Revert to each frozen image (shut off), then count on from its memory image.
    for (i, (base, value, memory)) in frozen.iter().enumerate() {
        let overlay = dir.join(format!("xvda.r{i}.qcow2"));
        host.revert_external_snapshot("ch", "xvda", base, &overlay)
            .expect("revert");
        host.revert_external_snapshot("ch", "xvda", base, &overlay)
            .expect("revert again");
        assert_eq!(xvda(&host, "ch"), overlay);
        compare(&overlay, "qcow2", base, "qcow2").expect("overlay reads as the frozen image");
        host.restore_memory("ch", &mut Cursor::new(memory))
            .expect("restore memory");
        let m = host.memory_counter("ch").expect("counter");
        assert!(*value == m || *value == m + 1);
        host.unpause("ch").expect("unpause");
        wait_counter(&host, "ch", m + 10);
        host.pause("ch").expect("pause");
        let now = read_disk_u64(&overlay, 0);
        assert!(now >= m + 10, "counts on from {m}: {now}");
        assert_eq!(
            read_disk_u64(base, 0),
            *value,
            "the frozen image is untouched"
        );
        host.destroy("ch").expect("destroy");
        qemu_img_check_allow_leaks(&overlay);
        qemu_img_check(base);
    }
    assert!(
        matches!(
            host.revert_external_snapshot("ch", "xvda", &frozen[0].0, &frozen[0].0),
            Err(Error::Invalid(_))
        ),
        "overlay = base"
    );
    host.start("ch", true).expect("start");
    assert!(
        matches!(
            host.revert_external_snapshot("ch", "xvda", &frozen[0].0, &dir.join("x.qcow2")),
            Err(Error::WrongState { .. })
        ),
        "revert while active"
    );
    host.destroy("ch").expect("destroy");
    host.undefine("ch").expect("undefine");
    assert!(!dir.exists());
}

/// An overlay left by a crash between its creation and the switch is taken over; a file
/// in the way that is not an overlay of the current image is refused.
#[test]
fn interrupted_create_is_taken_over() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("ic", MIB, &[8 * MIB]).expect("define");
    let dir = domain_dir(&host, "ic");
    let base = dir.join("xvda.qcow2");
    let left = dir.join("left.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "xvda.qcow2",
            "-F",
            "qcow2",
            s(&left),
        ],
    );
    let stranger = dir.join("stranger.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&stranger), "8M"],
    );
    assert!(matches!(
        host.create_external_snapshot("ic", "xvda", &stranger),
        Err(Error::Invalid(_))
    ));
    assert_eq!(xvda(&host, "ic"), base);
    host.create_external_snapshot("ic", "xvda", &left)
        .expect("take over");
    assert_eq!(xvda(&host, "ic"), left);
    // Same while the domain is paused, through the device model.
    host.start("ic", true).expect("start");
    let left2 = dir.join("left2.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "left.qcow2",
            "-F",
            "qcow2",
            s(&left2),
        ],
    );
    assert!(host
        .create_external_snapshot("ic", "xvda", &stranger)
        .is_err());
    assert_eq!(xvda(&host, "ic"), left);
    host.create_external_snapshot("ic", "xvda", &left2)
        .expect("take over while paused");
    assert_eq!(xvda(&host, "ic"), left2);
    host.unpause("ic").expect("unpause");
    wait_counter(&host, "ic", 10);
    host.shutdown("ic").expect("shutdown");
    assert!(read_disk_u64(&left2, 0) >= 10);
    assert_eq!(read_disk_u64(&left, 0), 0);
    qemu_img_check(&left2);
    // A new guest opens the current image from the configuration.
    host.start("ic", false).expect("start");
    let n = host.memory_counter("ic").expect("counter");
    wait_counter(&host, "ic", n + 10);
    host.shutdown("ic").expect("shutdown");
    assert!(read_disk_u64(&left2, 0) >= n + 10);
    assert_eq!(read_disk_u64(&base, 0), 0);
}

/// Layers with distinct patterns: base ← l1 ← l2 ← l3 ← l4 (current), built shut off.
fn build_layers(host: &SimHost, name: &str) -> Vec<PathBuf> {
    let dir = domain_dir(host, name);
    let writes: [&[(u8, u64, u64)]; 5] = [
        &[(0x11, 0, 4 * MIB), (0x12, 9 * MIB, 2 * MIB)],
        &[(0x22, MIB, MIB), (0x23, 6 * MIB, MIB)],
        &[(0x33, 3 * MIB / 2, 3 * MIB / 2), (0x34, 100_000, 3000)],
        &[
            (0x44, 0, MIB / 2),
            (0x45, 5 * MIB, MIB / 2),
            (0x46, 10 * MIB, 4096),
        ],
        &[(0x55, 7 * MIB, MIB / 2), (0x56, 3 * MIB, 70_000)],
    ];
    let mut images = Vec::new();
    for (i, layer) in writes.iter().enumerate() {
        if i > 0 {
            let overlay = dir.join(format!("l{i}.qcow2"));
            host.create_external_snapshot(name, "xvda", &overlay)
                .expect("external snapshot (shut off)");
        }
        let current = xvda(host, name);
        for &(pattern, offset, len) in layer.iter() {
            qemu_write(&current, pattern, offset, len);
        }
        images.push(current);
    }
    images
}

/// Saves a raw copy of every image, keyed by path.
fn save_all(images: &[PathBuf], raw_dir: &Path) -> BTreeMap<PathBuf, PathBuf> {
    std::fs::create_dir_all(raw_dir).expect("mkdir");
    images
        .iter()
        .map(|p| {
            let raw = raw_dir.join(format!(
                "{}.raw",
                p.file_name().expect("name").to_string_lossy()
            ));
            raw_copy(p, &raw);
            (p.clone(), raw)
        })
        .collect()
}

/// Every image still there reads as saved; `removed` are gone.
fn check_remaining(saved: &BTreeMap<PathBuf, PathBuf>, removed: &[PathBuf]) {
    for (image, raw) in saved {
        if removed.contains(image) {
            assert!(!image.exists(), "{} not removed", image.display());
            continue;
        }
        compare(image, "qcow2", raw, "raw").expect("content unchanged");
    }
}

fn remove_in_turn(
    host: &SimHost,
    name: &str,
    saved: &BTreeMap<PathBuf, PathBuf>,
    order: &[&PathBuf],
    check_files: bool,
) {
    let mut removed = Vec::new();
    for image in order {
        host.remove_image(name, "xvda", image)
            .unwrap_or_else(|e| panic!("remove {}: {e}", image.display()));
        removed.push((*image).clone());
        check_remaining(saved, &removed);
        host.remove_image(name, "xvda", image)
            .expect("idempotent remove");
        if check_files {
            for other in saved.keys().filter(|p| !removed.contains(p)) {
                qemu_img_check(other);
            }
        }
    }
}

/// remove_image while shut off, at every position, with a branch made by a revert.
#[test]
fn remove_image_shut_off_every_position() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define_with_workload("rm", MIB, &[12 * MIB], Workload::Idle)
        .expect("define");
    let dir = domain_dir(&host, "rm");
    let images = build_layers(&host, "rm");
    // A branch: revert to l1 and write to the new overlay; l4 is now a leaf, not current.
    let r = dir.join("r.qcow2");
    host.revert_external_snapshot("rm", "xvda", &images[1], &r)
        .expect("revert");
    qemu_write(&r, 0x77, 2 * MIB, MIB);
    let mut all = images.clone();
    all.push(r.clone());
    let saved = save_all(&all, &tmp.path().join("raw"));
    assert!(matches!(
        host.remove_image("rm", "xvda", &r),
        Err(Error::Invalid(_))
    ));
    // l2 (middle), base (bottom), l1 (two children, one of them current), l3 (middle
    // under a leaf), l4 (a leaf).
    let [base, l1, l2, l3, l4] = [0, 1, 2, 3, 4].map(|i| &images[i]);
    remove_in_turn(&host, "rm", &saved, &[l2, base, l1, l3, l4], true);
    assert_eq!(qcow2_files(&dir), ["r.qcow2"]);
    assert_eq!(qemu_chain(&r), ["r.qcow2"]);
    assert_eq!(xvda(&host, "rm"), r);
    qemu_img_check(&r);
}

/// remove_image while the domain runs: images the guest has open are rebased through its
/// device model, the active image among them.
#[test]
fn remove_image_while_running_every_position() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define_with_workload("rr", MIB, &[12 * MIB], Workload::Idle)
        .expect("define");
    let dir = domain_dir(&host, "rr");
    let images = build_layers(&host, "rr");
    let saved = save_all(&images, &tmp.path().join("raw"));
    host.start("rr", false).expect("start");
    assert_eq!(state(&host, "rr"), RunState::Running);
    let [base, l1, l2, l3, l4] = [0, 1, 2, 3, 4].map(|i| &images[i]);
    assert!(matches!(
        host.remove_image("rr", "xvda", l4),
        Err(Error::Invalid(_))
    ));
    // l2 (middle), base (bottom), l3 (child: the active image), l1 (bottom, child active).
    remove_in_turn(&host, "rr", &saved, &[l2, base, l3, l1], false);
    assert_eq!(state(&host, "rr"), RunState::Running);
    assert_eq!(qcow2_files(&dir), ["l4.qcow2"]);
    assert_eq!(qemu_chain(l4), ["l4.qcow2"]);
    // The guest still writes to its (rebased, reopened) image.
    host.shutdown("rr").expect("shutdown");
    qemu_img_check(l4);
    check_remaining(&saved, &[base.clone(), l1.clone(), l2.clone(), l3.clone()]);
    host.set_workload("rr", Workload::Counter)
        .expect("workload");
    host.start("rr", false).expect("start");
    wait_counter(&host, "rr", 10);
    host.shutdown("rr").expect("shutdown");
    assert!(read_disk_u64(l4, 0) >= 10);
    assert!(read_disk(l4, 8, 4088).iter().all(|&b| b == 0x44));
    qemu_img_check(l4);
}

/// remove_image while paused with the counter: the frozen chain below the active image
/// shrinks and the counter's image keeps counting.
#[test]
fn remove_image_while_paused_with_counter() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("rp", MIB, &[8 * MIB]).expect("define");
    let dir = domain_dir(&host, "rp");
    qemu_write(&xvda(&host, "rp"), 0x31, 0, 2 * MIB);
    host.start("rp", false).expect("start");
    let mut frozen = Vec::new();
    for i in 1..=3 {
        let n = host.memory_counter("rp").expect("counter");
        wait_counter(&host, "rp", n + 10);
        host.pause("rp").expect("pause");
        frozen.push(xvda(&host, "rp"));
        host.create_external_snapshot("rp", "xvda", &dir.join(format!("p{i}.qcow2")))
            .expect("snapshot");
        host.unpause("rp").expect("unpause");
    }
    let n = host.memory_counter("rp").expect("counter");
    wait_counter(&host, "rp", n + 10);
    host.pause("rp").expect("pause");
    let top = xvda(&host, "rp");
    let mut all = frozen.clone();
    all.push(top.clone());
    let saved = save_all(&all, &tmp.path().join("raw"));
    // p2 (child: the active p3), then the base, then p1.
    remove_in_turn(
        &host,
        "rp",
        &saved,
        &[&frozen[2], &frozen[0], &frozen[1]],
        false,
    );
    assert_eq!(qemu_chain(&top), ["p3.qcow2"]);
    let before = read_disk_u64(&top, 0);
    host.unpause("rp").expect("unpause");
    wait_counter(&host, "rp", before + 10);
    host.shutdown("rp").expect("shutdown");
    assert!(read_disk_u64(&top, 0) >= before + 10);
    assert!(read_disk(&top, 8, 4088).iter().all(|&b| b == 0x31));
    qemu_img_check(&top);
}

/// Paths outside the domain directory, with tricks, or not naming a .qcow2 are refused
/// and change nothing.
#[test]
fn invalid_image_paths_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("iv", MIB, &[8 * MIB]).expect("define");
    host.define("other", MIB, &[8 * MIB]).expect("define");
    let dir = domain_dir(&host, "iv");
    let base = dir.join("xvda.qcow2");
    host.create_external_snapshot("iv", "xvda", &dir.join("s1.qcow2"))
        .expect("snapshot");
    let outside = tmp.path().join("outside.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&outside), "8M"],
    );
    std::os::unix::fs::symlink(&outside, dir.join("link.qcow2")).expect("symlink");
    let config = std::fs::read(dir.join("domain.json")).expect("config");
    let files = qcow2_files(&dir);
    let domains = tmp.path().join("sim/domains");
    let bad: Vec<PathBuf> = vec![
        PathBuf::from(""),
        PathBuf::from("/"),
        outside.clone(),
        PathBuf::from("/etc/x.qcow2"),
        PathBuf::from("../x.qcow2"),
        PathBuf::from("sub/x.qcow2"),
        PathBuf::from(".x.qcow2"),
        PathBuf::from("x.raw"),
        PathBuf::from("x.qcow2/"),
        dir.join("x.raw"),
        dir.join("domain.json"),
        dir.join("memory"),
        dir.join("../other/xvda.qcow2"),
        domains.join("other/xvda.qcow2"),
        dir.join("./x.qcow2"),
        PathBuf::from(format!("{}//x.qcow2", dir.display())),
        dir.join("link.qcow2"),
        dir.join("a b.qcow2"),
        dir.join(format!("{}.qcow2", "x".repeat(200))),
    ];
    for path in &bad {
        let results = [
            host.create_external_snapshot("iv", "xvda", path),
            host.revert_external_snapshot("iv", "xvda", path, &dir.join("r.qcow2")),
            host.revert_external_snapshot("iv", "xvda", &base, path),
            host.remove_image("iv", "xvda", path),
        ];
        for r in results {
            assert!(
                matches!(r, Err(Error::Invalid(_))),
                "{}: {r:?}",
                path.display()
            );
        }
    }
    // Not errors of the path: unknown disk, current image, unknown domain.
    assert!(matches!(
        host.create_external_snapshot("iv", "xvdz", &dir.join("s2.qcow2")),
        Err(Error::NoSuchDisk { .. })
    ));
    assert!(matches!(
        host.remove_image("iv", "xvda", &dir.join("s1.qcow2")),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        host.remove_image("nope", "xvda", &dir.join("s1.qcow2")),
        Err(Error::NoSuchDomain(_))
    ));
    assert_eq!(
        std::fs::read(dir.join("domain.json")).expect("config"),
        config
    );
    assert_eq!(qcow2_files(&dir), files);
    assert_eq!(xvda(&host, "iv"), dir.join("s1.qcow2"));
    assert_eq!(
        std::fs::read_dir(&dir)
            .expect("list")
            .filter(|e| e
                .as_ref()
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .starts_with('.'))
            .count(),
        0,
        "no temporary files left"
    );
    // A bare file name is a name in the domain directory.
    host.create_external_snapshot("iv", "xvda", Path::new("s2.qcow2"))
        .expect("bare name");
    assert_eq!(xvda(&host, "iv"), dir.join("s2.qcow2"));
    qemu_img_check(&dir.join("s2.qcow2"));
}
