//! Crash at every ordered write of a snapshot operation (each case checks that its failpoint
//! fired: one that is never reached fails): the image must stay free of
//! corruption for `qemu-img check`, read as before or after the operation, and be usable.
//! Run with `cargo test -p disk --features failpoints`.
#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::path::Path;
use std::sync::Mutex;

const MIB: u64 = 1 << 20;
static SERIAL: Mutex<()> = Mutex::new(());

const STEPS: [&str; 7] = [
    "disk::internal::write_l2",
    "disk::internal::write_l1",
    "disk::internal::write_table",
    "disk::internal::write_refcounts",
    "disk::internal::sync_new",
    "disk::internal::write_header",
    "disk::internal::sync_header",
];

/// An image with one qemu snapshot "q" and two of ours, "d" and "e", plus later writes.
///
/// "e" is taken by domsnap while clusters written since "d" belong to the active image alone:
/// its L2 table keeps their COPIED flags, and the guest writes into the same table after it.
/// So applying "e" must write a fresh L2 table, and deleting "e" gives the active image back
/// sole ownership of those clusters (new L2 and L1 tables): every step of both is reached.
fn setup(dir: &Path) -> (std::path::PathBuf, Model) {
    let img = dir.join("f.qcow2");
    disk::create_image(&img, 4 * MIB, Some(4096)).unwrap();
    let model = Model::new(dir.join("m.raw"), 4 * MIB);
    qemu_io(&img, "write -P 0x11 0 256k");
    model.write(0, 256 * 1024, 0x11);
    qemu_img(&["snapshot", "-c", "q", s(&img)]);
    model.save(&dir.join("q.raw"));
    qemu_io(&img, "write -c -P 0x22 1M 64k");
    model.write(MIB, 64 * 1024, 0x22);
    disk::create_snapshot(&img, "d").unwrap();
    model.save(&dir.join("d.raw"));
    qemu_io(&img, "write -P 0x33 128k 512k");
    model.write(128 * 1024, 512 * 1024, 0x33);
    disk::create_snapshot(&img, "e").unwrap();
    model.save(&dir.join("e.raw"));
    qemu_io(&img, "write -P 0x44 0 64k");
    model.write(0, 64 * 1024, 0x44);
    (img, model)
}

fn crash_during(op: &str, step: &'static str, action: &str) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (img, model) = setup(dir.path());
    let before = dir.path().join("before.raw");
    model.save(&before);
    let names_before = disk::list_snapshots(&img).unwrap().len();
    fail::cfg(step, action).unwrap();
    let img2 = img.clone();
    let op2 = op.to_string();
    let outcome = std::panic::catch_unwind(move || match op2.as_str() {
        "create" => disk::create_snapshot(&img2, "new").map(|_| ()),
        "apply" => disk::apply_snapshot(&img2, "e"),
        "delete" => disk::delete_snapshot(&img2, "e"),
        _ => unreachable!(),
    });
    fail::cfg(step, "off").unwrap();
    // The failpoint must have stopped the operation: a case whose failpoint is never reached
    // would pass as an ordinary success and prove nothing.
    match &outcome {
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("");
            assert!(
                action == "panic" && message.contains(step),
                "{op} at {step} ({action}): a panic that is not the injected one: {message:?}"
            );
        }
        Ok(Err(disk::Error::FailPoint(name))) => {
            assert_eq!(*name, step, "{op}: stopped by another failpoint");
            assert_eq!(
                action, "return",
                "{op} at {step}: {action} returned instead"
            );
        }
        Ok(Ok(())) => panic!("{op}: failpoint {step} was never reached"),
        Ok(Err(e)) => panic!("{op} at {step}: unexpected error {e}"),
    }
    let stopped = true;
    // No corruption, and (every change being one atomic switch) not even a leak.
    let (code, text) = qemu_check(&img);
    assert_eq!(code, 0, "{op} stopped at {step}: qemu-img check: {text}");
    let report = disk::check(&img).unwrap();
    assert!(report.is_clean(), "{op} at {step}: {report:?}");
    let after = disk::repair_leaks(&img).unwrap();
    assert!(after.is_clean(), "{after:?}");
    assert_eq!(qemu_check(&img).0, 0);
    // The image reads as before or as after the operation.
    let committed = step == "disk::internal::sync_header" || !stopped;
    let n = disk::list_snapshots(&img).unwrap().len();
    match op {
        "create" => assert_eq!(n, names_before + usize::from(committed)),
        "delete" => assert_eq!(n, names_before - usize::from(committed)),
        _ => assert_eq!(n, names_before),
    }
    let expect = if committed && op == "apply" {
        dir.path().join("e.raw")
    } else {
        before
    };
    assert!(same_content(&img, &expect), "{op} at {step}: content");
    // And the operation can be done (again) afterwards.
    match op {
        "create" if !committed => drop(disk::create_snapshot(&img, "new").unwrap()),
        "apply" => disk::apply_snapshot(&img, "d").unwrap(),
        "delete" if !committed => disk::delete_snapshot(&img, "e").unwrap(),
        _ => {}
    }
    assert_qemu_clean(&img);
    if op == "apply" {
        assert!(same_content(&img, &dir.path().join("d.raw")));
    }
}

macro_rules! crash_tests {
    ($($name:ident: $op:expr, $step:expr, $action:expr;)*) => {
        $(#[test] fn $name() { crash_during($op, STEPS[$step], $action); })*
        /// Every case above, as (operation, step).
        const CASES: &[(&str, usize)] = &[$(($op, $step)),*];
    };
}

crash_tests! {
    create_write_l2: "create", 0, "return";
    create_write_l1: "create", 1, "return";
    create_write_table: "create", 2, "return";
    create_write_refcounts: "create", 3, "return";
    create_sync_new: "create", 4, "return";
    create_write_header: "create", 5, "return";
    create_sync_header: "create", 6, "return";
    create_write_refcounts_panic: "create", 3, "panic";
    apply_write_l2: "apply", 0, "return";
    apply_write_l1: "apply", 1, "return";
    apply_write_refcounts: "apply", 3, "return";
    apply_sync_new: "apply", 4, "return";
    apply_write_header: "apply", 5, "return";
    apply_sync_header: "apply", 6, "return";
    apply_write_header_panic: "apply", 5, "panic";
    delete_write_l2: "delete", 0, "return";
    delete_write_l1: "delete", 1, "return";
    delete_write_table: "delete", 2, "return";
    delete_write_refcounts: "delete", 3, "return";
    delete_sync_new: "delete", 4, "return";
    delete_write_header: "delete", 5, "return";
    delete_sync_header: "delete", 6, "return";
}

#[test]
fn every_step_of_every_operation_has_a_case() {
    // apply keeps the snapshot table as it is: it never writes one.
    for op in ["create", "apply", "delete"] {
        for (i, step) in STEPS.iter().enumerate() {
            if op == "apply" && *step == "disk::internal::write_table" {
                continue;
            }
            assert!(CASES.contains(&(op, i)), "{op} has no crash case at {step}");
        }
    }
}

#[test]
fn apply_never_writes_a_snapshot_table() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = setup(dir.path());
    let step = "disk::internal::write_table";
    fail::cfg(step, "return").unwrap();
    let r = disk::apply_snapshot(&img, "e");
    fail::cfg(step, "off").unwrap();
    r.unwrap();
    assert!(same_content(&img, &dir.path().join("e.raw")));
}
