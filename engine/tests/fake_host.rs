//! The engine on a deterministic in-process host (`xen::sim::FakeHost`): real journal,
//! real chunk store, real qcow2 disks; the host's failures injected one at a time, and the
//! guest's counter advanced only by the test, so every expected value is exact.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use engine::{
    Access, CreateRequest, DeleteRequest, Engine, ErrorKind, HistoryFilter, Quiet, RecoverMode,
    RevertRequest,
};
use journal::Outcome;
use xen::sim::{FakeHost, FakeOp};
use xen::{DiskKind, Host, RunState};

struct Lab {
    dir: tempfile::TempDir,
    host: Arc<FakeHost>,
}

impl Lab {
    fn new() -> Lab {
        // As the domsnap binary does at start: RocksDB creates the journal's files with the
        // process's umask, and `verify` reports files others may read.
        // SAFETY: umask only sets the process's file mode creation mask.
        unsafe {
            libc::umask(0o077);
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("disks")).unwrap();
        let host = Arc::new(FakeHost::new(&dir.path().join("disks")));
        host.define("vm", 1 << 20, &[8 << 20, 8 << 20]).unwrap();
        host.start("vm", false).unwrap();
        Lab { dir, host }
    }

    /// Opens the engine (which recovers whatever is open).
    fn engine(&self) -> Engine {
        Engine::open(
            &self.dir.path().join("state"),
            Box::new(self.host.clone()),
            Access::Write,
            None,
            Duration::from_secs(5),
            Box::new(Quiet),
        )
        .unwrap()
    }

    fn last_outcome(&self, engine: &Engine) -> Outcome {
        let ops = engine.history(&HistoryFilter::default()).unwrap();
        let last = ops.last().unwrap();
        engine.journal().op(last.id).unwrap().unwrap().outcome
    }

    fn state(&self) -> RunState {
        self.host.domain("vm").unwrap().state
    }
}

fn create(name: &str) -> CreateRequest {
    CreateRequest {
        domain: "vm".into(),
        name: name.into(),
        ..CreateRequest::default()
    }
}

fn revert(name: &str) -> RevertRequest {
    RevertRequest {
        domain: "vm".into(),
        name: name.into(),
        state: None,
    }
}

#[test]
fn revert_brings_back_the_exact_counter_of_the_checkpoint() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    lab.host.step("vm", 10).unwrap();
    engine.create(&create("ten")).unwrap();
    assert_eq!(lab.state(), RunState::Running);
    lab.host.step("vm", 15).unwrap();
    assert_eq!(lab.host.memory_counter("vm").unwrap(), 25);
    engine.revert(&revert("ten")).unwrap();
    assert_eq!(lab.state(), RunState::Running);
    assert_eq!(lab.host.memory_counter("vm").unwrap(), 10);
    assert_eq!(lab.last_outcome(&engine), Outcome::Committed);
}

#[test]
fn a_failing_disk_snapshot_rolls_the_create_back_and_resumes_the_domain() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    lab.host.step("vm", 3).unwrap();
    // xvda succeeds, xvdb fails: xvda's snapshot must be undone.
    engine.create(&create("ok")).unwrap();
    lab.host.fail_next(FakeOp::CreateDiskSnapshot, 1);
    let err = engine.create(&create("broken")).unwrap_err();
    assert!(err.to_string().contains("snapshot-disk:xvda"), "{err}");
    assert!(err.to_string().contains("rolled back"), "{err}");
    assert_eq!(lab.last_outcome(&engine), Outcome::RolledBack);
    assert_eq!(lab.state(), RunState::Running, "never left paused");
    for t in ["xvda", "xvdb"] {
        assert_eq!(lab.host.disk_snapshots("vm", t).unwrap().len(), 1, "{t}");
    }
    let report = engine.verify(None, true).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn a_failing_resume_is_finished_by_recovery() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    lab.host.fail_next(FakeOp::Unpause, 1);
    assert!(engine.create(&create("s")).is_err());
    assert_eq!(lab.state(), RunState::Paused);
    drop(engine);
    // Every data step had finished: recovery resumes the domain and commits.
    let engine = lab.engine();
    assert_eq!(lab.state(), RunState::Running);
    assert_eq!(lab.last_outcome(&engine), Outcome::RolledForward);
    assert_eq!(engine.list("vm").unwrap().len(), 1);
}

#[test]
fn a_revert_that_fails_after_the_domain_stopped_needs_recovery_and_is_rolled_forward_by_it() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    lab.host.step("vm", 7).unwrap();
    engine.create(&create("seven")).unwrap();
    lab.host.step("vm", 5).unwrap();
    lab.host.fail_next(FakeOp::RestoreMemory, 1);
    let err = engine.revert(&revert("seven")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NeedsRecovery, "{err}");
    assert!(err.to_string().contains("domsnap recover"), "{err}");
    assert_eq!(lab.state(), RunState::Shutoff);
    drop(engine);
    // The next start leaves it alone; the domain accepts nothing but recovery.
    let mut engine = lab.engine();
    assert_eq!(lab.last_outcome(&engine), Outcome::NeedsRecovery);
    assert_eq!(lab.state(), RunState::Shutoff);
    let refused = engine.create(&create("other")).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::NeedsRecovery, "{refused}");
    let report = engine
        .recover(RecoverMode::Requested { force: false })
        .unwrap();
    assert!(report.iter().all(|r| !r.open), "{report:?}");
    assert_eq!(lab.last_outcome(&engine), Outcome::RolledForward);
    assert_eq!(lab.state(), RunState::Running);
    assert_eq!(lab.host.memory_counter("vm").unwrap(), 7);
}

#[test]
fn a_revert_whose_destroy_fails_is_finished_by_recover() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    engine.create(&create("s")).unwrap();
    lab.host.step("vm", 4).unwrap();
    lab.host.fail_next(FakeOp::Destroy, 1);
    // The destroy step began, so the rule says forward: only `recover` finishes it.
    assert!(engine.revert(&revert("s")).is_err());
    drop(engine);
    let mut engine = lab.engine();
    assert_eq!(lab.last_outcome(&engine), Outcome::NeedsRecovery);
    engine
        .recover(RecoverMode::Requested { force: false })
        .unwrap();
    assert_eq!(lab.last_outcome(&engine), Outcome::RolledForward);
    assert_eq!(lab.host.memory_counter("vm").unwrap(), 0);
}

#[test]
fn a_failing_delete_is_finished_by_recovery() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    engine.create(&create("a")).unwrap();
    engine.create(&create("b")).unwrap();
    lab.host.fail_next(FakeOp::DeleteDiskSnapshot, 1);
    assert!(engine
        .delete(&DeleteRequest {
            domain: "vm".into(),
            name: "a".into(),
            children: false,
        })
        .is_err());
    drop(engine);
    let engine = lab.engine();
    assert_eq!(lab.last_outcome(&engine), Outcome::RolledForward);
    let names: Vec<String> = engine
        .list("vm")
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["b"]);
    assert_eq!(lab.host.disk_snapshots("vm", "xvda").unwrap().len(), 1);
    let report = engine.verify(None, true).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn disks_that_cannot_be_snapshotted_are_refused_before_anything_changes() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    lab.host.destroy("vm").unwrap();
    let xvdb = lab.host.domain("vm").unwrap().disks[1].path.clone();
    let raw = DiskKind::Unsupported {
        reason: "a raw image file: raw files have no snapshots".into(),
    };
    lab.host.set_disk("vm", "xvdb", xvdb.clone(), raw).unwrap();
    let err = engine.create(&create("s")).unwrap_err();
    assert!(matches!(err, engine::Error::Refused(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("xvdb") && text.contains("raw image file"),
        "{text}"
    );
    assert!(engine
        .history(&HistoryFilter::default())
        .unwrap()
        .is_empty());
    assert!(lab.host.disk_snapshots("vm", "xvda").unwrap().is_empty());
    // an LVM thin disk takes internal snapshots, but no external ones
    lab.host
        .set_disk("vm", "xvdb", xvdb.clone(), DiskKind::LvmThin)
        .unwrap();
    let err = engine
        .create(&CreateRequest {
            external: true,
            ..create("e")
        })
        .unwrap_err();
    assert!(err.to_string().contains("LVM thin volume"), "{err}");
    assert!(engine
        .history(&HistoryFilter::default())
        .unwrap()
        .is_empty());
}

#[test]
fn revert_refuses_a_disk_moved_since_the_snapshot_and_changes_nothing() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    lab.host.step("vm", 3).unwrap();
    engine.create(&create("s")).unwrap();
    lab.host.step("vm", 2).unwrap();
    lab.host.destroy("vm").unwrap();
    let xvdb = lab.host.domain("vm").unwrap().disks[1].path.clone();
    let moved = xvdb.with_file_name("moved.qcow2");
    std::fs::copy(&xvdb, &moved).unwrap();
    lab.host
        .set_disk("vm", "xvdb", moved.clone(), DiskKind::Qcow2)
        .unwrap();
    lab.host.start("vm", false).unwrap();
    let ops = engine.history(&HistoryFilter::default()).unwrap().len();
    let err = engine.revert(&revert("s")).unwrap_err();
    assert!(matches!(err, engine::Error::Refused(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("xvdb") && text.contains("moved.qcow2"),
        "{text}"
    );
    assert_eq!(
        engine.history(&HistoryFilter::default()).unwrap().len(),
        ops
    );
    assert_eq!(lab.state(), RunState::Running);
    assert_eq!(lab.host.memory_counter("vm").unwrap(), 5);
    // back on its image: the revert goes through
    lab.host.destroy("vm").unwrap();
    lab.host
        .set_disk("vm", "xvdb", xvdb, DiskKind::Qcow2)
        .unwrap();
    engine.revert(&revert("s")).unwrap();
    assert_eq!(lab.host.memory_counter("vm").unwrap(), 3);
}
