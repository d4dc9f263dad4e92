//! The contract every [`Host`] implementation keeps, as a reusable test suite.
//!
//! Each check takes a host and the name of a domain that exists, is shut off, and has at
//! least one disk, every disk a qcow2 image or an LVM thin volume, and leaves it shut off
//! again. The disk checks run on every disk. Checks panic (like `assert!`) when the
//! host breaks the contract; they are meant to be called from tests:
//!
//! ```ignore
//! xen::contract::run_all(&host, "contract-dom");
//! ```
//!
//! Disk images are inspected with `qemu-img` and `qemu-io` (QEMU's tools are the reference
//! for qcow2), only while the domain is shut off or read-only with `-U`. After a `destroy`
//! (the device model killed) leaked clusters are accepted, corruption never.

use std::io::Cursor;
use std::path::Path;
use std::process::Command;

use crate::{DiskKind, Error, Host, RunState};

/// Runs every check of the contract, in order, on domain `name` of `host`.
pub fn run_all(host: &dyn Host, name: &str) {
    lookup(host, name);
    lifecycle(host, name);
    start_refused_while_active(host, name);
    save_and_restore(host, name);
    restore_refuses_bad_streams(host, name);
    disk_snapshots_offline(host, name);
    disk_snapshots_online(host, name);
    apply_disk_snapshot_reverts(host, name);
}

fn state(host: &dyn Host, name: &str) -> RunState {
    host.domain(name)
        .unwrap_or_else(|e| panic!("domain({name}): {e}"))
        .state
}

fn ok<T>(what: &str, r: crate::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Every disk of the domain: target, path, kind.
fn all_disks(host: &dyn Host, name: &str) -> Vec<(String, std::path::PathBuf, DiskKind)> {
    let info = ok("domain", host.domain(name));
    assert!(
        !info.disks.is_empty(),
        "the contract needs a domain with a disk; {name} has none"
    );
    info.disks
        .iter()
        .map(|d| {
            assert!(
                matches!(d.kind, DiskKind::Qcow2 | DiskKind::LvmThin),
                "the contract needs qcow2 or LVM thin disks; {} is {:?}",
                d.target,
                d.kind
            );
            (d.target.clone(), d.path.clone(), d.kind.clone())
        })
        .collect()
}

fn first_disk(host: &dyn Host, name: &str) -> (String, std::path::PathBuf) {
    let (target, path, kind) = all_disks(host, name).remove(0);
    assert_eq!(
        kind,
        DiskKind::Qcow2,
        "external snapshots need a qcow2 first disk"
    );
    (target, path)
}

/// The image check of a disk: `qemu-img check` for qcow2 (leaks allowed after a killed
/// device model if `leaks`), nothing for an LVM volume (LVM keeps its own metadata).
fn check_image(path: &Path, kind: &DiskKind, leaks: bool) {
    match (kind, leaks) {
        (DiskKind::Qcow2, false) => qemu_img_check(path),
        (DiskKind::Qcow2, true) => qemu_img_check_allow_leaks(path),
        _ => {}
    }
}

/// Writes `data` at `offset` of a disk of either kind (its domain shut off), durably.
fn write_any(path: &Path, kind: &DiskKind, offset: u64, data: &[u8]) {
    match kind {
        DiskKind::Qcow2 => {
            let file = std::env::temp_dir().join(format!("contract-{}.bin", std::process::id()));
            std::fs::write(&file, data).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
            let out = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c"])
                .arg(format!(
                    "write -s {} {offset} {}",
                    file.display(),
                    data.len()
                ))
                .arg(path)
                .output()
                .unwrap_or_else(|e| panic!("run qemu-io: {e}"));
            let _ = std::fs::remove_file(&file);
            assert!(
                out.status.success(),
                "qemu-io write {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        _ => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            f.write_all_at(data, offset)
                .and_then(|()| f.sync_all())
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
    }
}

/// The first `len` bytes at `offset` of a disk of either kind (see [`read_disk`]).
fn read_any(path: &Path, kind: &DiskKind, offset: u64, len: usize) -> Vec<u8> {
    match kind {
        DiskKind::Qcow2 => read_disk(path, offset, len),
        _ => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, offset)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            buf
        }
    }
}

/// `domains` lists the domain; `domain` finds it shut off; unknown names are refused.
pub fn lookup(host: &dyn Host, name: &str) {
    assert!(!host.kind().is_empty());
    let all = ok("domains", host.domains());
    assert!(
        all.iter().any(|d| d.name == name),
        "domains() does not list {name}"
    );
    let info = ok("domain", host.domain(name));
    assert_eq!(info.name, name);
    assert_eq!(
        info.state,
        RunState::Shutoff,
        "the contract starts shut off"
    );
    assert!(info.memory_bytes > 0);
    assert!(info.disk(&info.disks[0].target).is_some());
    assert!(matches!(
        host.domain("no-such-domain-4f2a"),
        Err(Error::NoSuchDomain(_))
    ));
}

/// start paused / unpause / pause / destroy, each idempotent where the trait says so, and
/// pause/unpause refused while shut off.
pub fn lifecycle(host: &dyn Host, name: &str) {
    assert!(host.pause(name).is_err(), "pause of a shut-off domain");
    assert!(host.unpause(name).is_err(), "unpause of a shut-off domain");
    ok("destroy (shut off)", host.destroy(name));

    ok("start paused", host.start(name, true));
    assert_eq!(state(host, name), RunState::Paused);
    ok("unpause", host.unpause(name));
    assert_eq!(state(host, name), RunState::Running);
    ok("unpause again", host.unpause(name));
    assert_eq!(state(host, name), RunState::Running);
    ok("pause", host.pause(name));
    assert_eq!(state(host, name), RunState::Paused);
    ok("pause again", host.pause(name));
    assert_eq!(state(host, name), RunState::Paused);
    ok("destroy", host.destroy(name));
    assert_eq!(state(host, name), RunState::Shutoff);
    ok("destroy again", host.destroy(name));

    ok("start running", host.start(name, false));
    assert_eq!(state(host, name), RunState::Running);
    ok("destroy running", host.destroy(name));
    assert_eq!(state(host, name), RunState::Shutoff);
}

/// A second start of an active domain is refused and leaves it as it was.
pub fn start_refused_while_active(host: &dyn Host, name: &str) {
    ok("start", host.start(name, true));
    assert!(
        host.start(name, false).is_err(),
        "start of an active domain"
    );
    assert_eq!(state(host, name), RunState::Paused);
    ok("destroy", host.destroy(name));
}

/// save_memory leaves the domain paused; restore_memory brings it back paused; restore is
/// refused while active.
pub fn save_and_restore(host: &dyn Host, name: &str) {
    ok("start", host.start(name, false));
    let mut image = Vec::new();
    let n = ok("save_memory", host.save_memory(name, &mut image));
    assert_eq!(
        n,
        image.len() as u64,
        "save_memory returns the bytes written"
    );
    assert!(n > 0);
    assert_eq!(state(host, name), RunState::Paused, "save leaves it paused");

    assert!(
        host.restore_memory(name, &mut Cursor::new(&image)).is_err(),
        "restore onto an active domain"
    );
    assert_eq!(state(host, name), RunState::Paused);

    ok("destroy", host.destroy(name));
    ok(
        "restore_memory",
        host.restore_memory(name, &mut Cursor::new(&image)),
    );
    assert_eq!(
        state(host, name),
        RunState::Paused,
        "restore leaves it paused"
    );
    ok("unpause after restore", host.unpause(name));
    assert_eq!(state(host, name), RunState::Running);
    ok("destroy", host.destroy(name));
}

/// A truncated or empty stream is refused and leaves the domain shut off.
pub fn restore_refuses_bad_streams(host: &dyn Host, name: &str) {
    ok("start", host.start(name, true));
    let mut image = Vec::new();
    ok("save_memory", host.save_memory(name, &mut image));
    ok("destroy", host.destroy(name));
    for bad in [&image[..image.len() / 2], &[][..]] {
        assert!(
            host.restore_memory(name, &mut Cursor::new(bad)).is_err(),
            "restore of a {}-byte stream",
            bad.len()
        );
        assert_eq!(state(host, name), RunState::Shutoff);
    }
}

/// Disk snapshots of a shut-off domain: create and delete are idempotent, apply of an
/// unknown tag fails, the image stays clean. On every disk.
pub fn disk_snapshots_offline(host: &dyn Host, name: &str) {
    for (target, path, kind) in all_disks(host, name) {
        let tag = "contract-offline";
        ok("create", host.create_disk_snapshot(name, &target, tag));
        ok(
            "create again",
            host.create_disk_snapshot(name, &target, tag),
        );
        let tags = ok("list", host.disk_snapshots(name, &target));
        assert_eq!(tags.iter().filter(|t| *t == tag).count(), 1, "{tags:?}");
        ok("apply", host.apply_disk_snapshot(name, &target, tag));
        ok("apply again", host.apply_disk_snapshot(name, &target, tag));
        ok("delete", host.delete_disk_snapshot(name, &target, tag));
        ok(
            "delete again",
            host.delete_disk_snapshot(name, &target, tag),
        );
        assert!(!ok("list", host.disk_snapshots(name, &target)).contains(&tag.to_owned()));
        assert!(host
            .apply_disk_snapshot(name, &target, "contract-never-taken")
            .is_err());
        check_image(&path, &kind, false);
    }
    assert!(host
        .create_disk_snapshot(name, "no-such-disk", "contract-offline")
        .is_err());
}

/// Disk snapshots of an active domain (through the device model for qcow2); apply is
/// refused. On every disk.
pub fn disk_snapshots_online(host: &dyn Host, name: &str) {
    let disks = all_disks(host, name);
    ok("start", host.start(name, false));
    for (target, _, _) in &disks {
        let tag = "contract-online";
        ok(
            "create (running)",
            host.create_disk_snapshot(name, target, tag),
        );
        ok("create again", host.create_disk_snapshot(name, target, tag));
        assert!(ok("list (running)", host.disk_snapshots(name, target)).contains(&tag.to_owned()));
        assert!(
            matches!(
                host.apply_disk_snapshot(name, target, tag),
                Err(Error::WrongState { .. })
            ),
            "apply while running"
        );
        assert_eq!(state(host, name), RunState::Running);
    }
    ok("pause", host.pause(name));
    for (target, _, _) in &disks {
        let tag = "contract-online";
        ok(
            "delete (paused)",
            host.delete_disk_snapshot(name, target, tag),
        );
        ok("delete again", host.delete_disk_snapshot(name, target, tag));
        assert!(!ok("list", host.disk_snapshots(name, target)).contains(&tag.to_owned()));
    }
    ok("unpause", host.unpause(name));
    ok("destroy", host.destroy(name));
    for (_, path, kind) in &disks {
        check_image(path, kind, true);
    }
}

/// Applying a snapshot brings back the disk content it was taken with (the first MiB),
/// after that content was overwritten. On every disk.
pub fn apply_disk_snapshot_reverts(host: &dyn Host, name: &str) {
    let disks = all_disks(host, name);
    let tag = "contract-revert";
    let mut before = Vec::new();
    for (target, path, kind) in &disks {
        ok("create", host.create_disk_snapshot(name, target, tag));
        let data = read_any(path, kind, 0, 1 << 20);
        write_any(path, kind, 0, &[0x5a; 65536]);
        assert!(
            read_any(path, kind, 0, 1 << 20) != data,
            "{target}: the overwrite did not change the disk"
        );
        before.push(data);
    }
    for ((target, path, kind), before) in disks.iter().zip(before) {
        ok("apply", host.apply_disk_snapshot(name, target, tag));
        assert!(
            read_any(path, kind, 0, 1 << 20) == before,
            "{target} differs from snapshot {tag} after apply"
        );
        ok("delete", host.delete_disk_snapshot(name, target, tag));
        check_image(path, kind, true);
    }
}

/// External snapshots (not part of [`run_all`]: only for hosts that implement them).
/// Overlays are created beside the disk's current image, named `<stem>.contract-*.qcow2`.
///
/// Shut off: create (idempotent) makes the overlay the disk's image; running: refused with
/// [`Error::WrongState`]; paused: through the device model, and the old image never changes
/// afterwards. Revert (shut off) reads exactly the base; remove_image of the images below
/// keeps what every remaining image reads, refuses the current image, and is idempotent.
/// Leaves the domain shut off on an overlay chain of its own.
pub fn external_snapshots(host: &dyn Host, name: &str) {
    let (target, first) = first_disk(host, name);
    let dir = first
        .parent()
        .unwrap_or_else(|| panic!("{} has no directory", first.display()));
    let overlay = |what: &str| dir.join(format!("{target}.contract-{what}.qcow2"));
    let current = |host: &dyn Host| {
        ok("domain", host.domain(name))
            .disk(&target)
            .unwrap_or_else(|| panic!("{name} lost disk {target}"))
            .path
            .clone()
    };

    let a = overlay("a");
    ok(
        "create external (shut off)",
        host.create_external_snapshot(name, &target, &a),
    );
    ok(
        "create external again",
        host.create_external_snapshot(name, &target, &a),
    );
    assert_eq!(current(host), a, "the disk is on the overlay");
    qemu_img_check(&a);

    ok("start", host.start(name, false));
    std::thread::sleep(std::time::Duration::from_millis(100));
    let b = overlay("b");
    assert!(
        matches!(
            host.create_external_snapshot(name, &target, &b),
            Err(Error::WrongState { .. })
        ),
        "external snapshot while running"
    );
    ok("pause", host.pause(name));
    ok(
        "create external (paused)",
        host.create_external_snapshot(name, &target, &b),
    );
    assert_eq!(current(host), b);
    let frozen = read_disk(&a, 0, 1 << 20);
    ok("unpause", host.unpause(name));
    std::thread::sleep(std::time::Duration::from_millis(200));
    ok("pause", host.pause(name));
    assert!(
        read_disk(&a, 0, 1 << 20) == frozen,
        "a frozen image changed"
    );
    ok("destroy", host.destroy(name));

    let c = overlay("c");
    ok(
        "revert external",
        host.revert_external_snapshot(name, &target, &a, &c),
    );
    ok(
        "revert external again",
        host.revert_external_snapshot(name, &target, &a, &c),
    );
    assert_eq!(current(host), c);
    assert!(read_disk(&c, 0, 1 << 20) == frozen, "revert reads the base");

    let b_content = read_disk(&b, 0, 1 << 20);
    assert!(
        matches!(host.remove_image(name, &target, &c), Err(Error::Invalid(_))),
        "remove of the current image"
    );
    ok("remove a", host.remove_image(name, &target, &a));
    ok("remove a again", host.remove_image(name, &target, &a));
    assert!(!a.exists(), "{} not removed", a.display());
    assert!(read_disk(&c, 0, 1 << 20) == frozen, "c changed");
    assert!(read_disk(&b, 0, 1 << 20) == b_content, "b changed");
    ok("remove b", host.remove_image(name, &target, &b));
    assert!(!b.exists());
    qemu_img_check(&c);
}

/// `qemu-img check` of a qcow2 image: no errors, no leaked clusters.
pub fn qemu_img_check(path: &Path) {
    let (code, report) = run_qemu_img_check(path);
    assert!(
        code == Some(0),
        "qemu-img check {}: {report}",
        path.display()
    );
}

/// `qemu-img check` of a qcow2 image that a killed device model may have left with leaked
/// clusters (harmless: allocated, unreferenced; QEMU leaks them too when killed), but with
/// no corruption.
pub fn qemu_img_check_allow_leaks(path: &Path) {
    let (code, report) = run_qemu_img_check(path);
    // 0: clean; 3: leaks only (qemu-img(1), "check").
    assert!(
        matches!(code, Some(0) | Some(3)),
        "qemu-img check {}: {report}",
        path.display()
    );
}

fn run_qemu_img_check(path: &Path) -> (Option<i32>, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("run qemu-img check: {e}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), report)
}

/// Reads `len` bytes at `offset` of a qcow2 image with `qemu-io -r -U` (works while a
/// device model has the image open).
pub fn read_disk(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c"])
        .arg(format!("read -v {offset} {len}"))
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("run qemu-io: {e}"));
    assert!(
        out.status.success(),
        "qemu-io read {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines: "00000000:  07 07 … 07  ................"
    let mut bytes = Vec::with_capacity(len);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((addr, rest)) = line.split_once(":  ") else {
            continue;
        };
        if u64::from_str_radix(addr, 16).is_err() {
            continue;
        }
        // The hex bytes end where the two spaces before the ASCII column are.
        let hex = rest.split("  ").next().unwrap_or_default();
        bytes.extend(
            hex.split_whitespace()
                .filter_map(|h| u8::from_str_radix(h, 16).ok()),
        );
    }
    assert_eq!(bytes.len(), len, "qemu-io gave {} bytes", bytes.len());
    bytes
}

/// The little-endian u64 at `offset` of a qcow2 image (see [`read_disk`]).
pub fn read_disk_u64(path: &Path, offset: u64) -> u64 {
    let bytes = read_disk(path, offset, 8);
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes);
    u64::from_le_bytes(le)
}
