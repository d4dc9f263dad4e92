//! The one gate, on the deterministic in-process host: the `domain` commands are journaled
//! operations under the domain's lock; a domain with an unfinished operation accepts only
//! recovery; recovery never acts on a boot it did not record without `force`, refuses
//! operations of another host kind and unreadable ones, and each blocks only its domain.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use engine::{
    Access, CreateRequest, DomainAction, Engine, Error, ErrorKind, HistoryFilter, Quiet,
    RecoverMode, RevertRequest,
};
use journal::{DomainState, Event, Journal, Mode, OpBegun, OpKind, OpParams, Outcome};
use xen::sim::{FakeHost, FakeOp};
use xen::{DomainSpec, Host, RunState};

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
        for d in ["vm", "other"] {
            host.define(d, 1 << 20, &[8 << 20]).unwrap();
            host.start(d, false).unwrap();
        }
        Lab { dir, host }
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    fn engine(&self) -> Engine {
        Engine::open(
            &self.state_dir(),
            Box::new(self.host.clone()),
            Access::Write,
            None,
            Duration::from_secs(5),
            Box::new(Quiet),
        )
        .unwrap()
    }

    fn outcome(&self, engine: &Engine, op: u64) -> Outcome {
        engine.journal().op(op).unwrap().unwrap().outcome
    }

    fn last_op(&self, engine: &Engine) -> u64 {
        engine
            .history(&HistoryFilter::default())
            .unwrap()
            .last()
            .unwrap()
            .id
    }

    fn state(&self, d: &str) -> RunState {
        self.host.domain(d).unwrap().state
    }

    /// Journals an operation that was begun and never ended, as a crashed process leaves it.
    fn journal_open_op(&self, domain: &str, host: &str, steps: &[&str]) -> u64 {
        drop(self.engine());
        let mut journal = Journal::open(&self.state_dir().join("journal"), Mode::Primary).unwrap();
        let op = journal.next_seq();
        journal
            .append(Event::OpBegun(OpBegun {
                op,
                at: journal::now_millis(),
                kind: OpKind::Create,
                domain: domain.into(),
                snapshot: "s".into(),
                user: "test".into(),
                pid: 1,
                host: host.into(),
                prior_state: DomainState::Running,
                steps: steps.iter().map(ToString::to_string).collect(),
                params: OpParams::default(),
            }))
            .unwrap();
        op
    }
}

fn create(domain: &str, name: &str) -> CreateRequest {
    CreateRequest {
        domain: domain.into(),
        name: name.into(),
        ..CreateRequest::default()
    }
}

#[test]
fn domain_commands_are_journaled_operations() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    let spec = DomainSpec {
        memory_bytes: 1 << 20,
        disk_sizes: vec![4 << 20],
        workload: None,
    };
    let actions = [
        DomainAction::Define(spec.clone()),
        DomainAction::Start {
            paused: true,
            workload: None,
        },
        DomainAction::Unpause,
        DomainAction::Pause,
        DomainAction::Destroy,
        DomainAction::Start {
            paused: false,
            workload: None,
        },
        DomainAction::Shutdown,
        DomainAction::Undefine { snapshots: false },
    ];
    for action in &actions {
        engine.domain_command("new", action).unwrap();
    }
    assert!(matches!(
        lab.host.domain("new"),
        Err(xen::Error::NoSuchDomain(_))
    ));
    let history = engine
        .history(&HistoryFilter {
            domain: Some("new".into()),
            ..HistoryFilter::default()
        })
        .unwrap();
    let kinds: Vec<&str> = history.iter().map(|o| o.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["define", "start", "unpause", "pause", "destroy", "start", "shutdown", "undefine"]
    );
    assert!(
        history.iter().all(|o| o.outcome == "committed"),
        "{history:?}"
    );
    // Refused requests change nothing and leave no operation behind.
    let before = engine.history(&HistoryFilter::default()).unwrap().len();
    let e = engine
        .domain_command("vm", &DomainAction::Define(spec))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::User, "{e}");
    lab.host.destroy("other").unwrap();
    let e = engine
        .domain_command("other", &DomainAction::Pause)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::User, "{e}");
    let e = engine
        .domain_command("../x", &DomainAction::Destroy)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::User, "{e}");
    assert_eq!(
        engine.history(&HistoryFilter::default()).unwrap().len(),
        before
    );
}

#[test]
fn a_failed_domain_command_is_rolled_back_and_says_so() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    lab.host.destroy("vm").unwrap();
    lab.host.fail_next(FakeOp::Start, 1);
    let e = engine
        .domain_command(
            "vm",
            &DomainAction::Start {
                paused: false,
                workload: None,
            },
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Failure, "{e}");
    assert_eq!(
        lab.outcome(&engine, lab.last_op(&engine)),
        Outcome::RolledBack
    );
    assert_eq!(lab.state("vm"), RunState::Shutoff);
}

#[test]
fn undefine_refuses_a_domain_with_snapshots_unless_asked_to_delete_them() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    engine.create(&create("vm", "a")).unwrap();
    engine.create(&create("vm", "b")).unwrap();
    engine.domain_command("vm", &DomainAction::Destroy).unwrap();
    let ops = engine.history(&HistoryFilter::default()).unwrap().len();
    let e = engine
        .domain_command("vm", &DomainAction::Undefine { snapshots: false })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::User, "{e}");
    assert!(e.to_string().contains("--snapshots"), "{e}");
    assert_eq!(engine.list("vm").unwrap().len(), 2);
    assert_eq!(
        engine.history(&HistoryFilter::default()).unwrap().len(),
        ops
    );
    assert!(lab.host.domain("vm").is_ok());

    engine
        .domain_command("vm", &DomainAction::Undefine { snapshots: true })
        .unwrap();
    assert!(lab.host.domain("vm").is_err());
    assert!(engine.catalog("vm").unwrap().snapshots.is_empty());
    // The memory images went with them: nothing holds them, gc frees them, verify is clean.
    engine.gc().unwrap();
    let stats = engine.memory_stats().unwrap();
    assert_eq!(stats.images, 0, "{stats:?}");
    let report = engine.verify(None, true).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn a_paused_domain_stays_paused_when_a_checkpoint_fails_the_way_xl_save_does() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    engine.domain_command("vm", &DomainAction::Pause).unwrap();
    // Like `xl save` when it fails: the domain was let run for the save and is running now.
    lab.host.fail_next(FakeOp::SaveMemoryResuming, 1);
    let e = engine.create(&create("vm", "cp")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Failure, "{e}");
    assert_eq!(
        lab.outcome(&engine, lab.last_op(&engine)),
        Outcome::RolledBack
    );
    assert_eq!(lab.state("vm"), RunState::Paused, "restored to paused");
}

#[test]
fn an_operation_recovery_abandons_releases_its_memory_image() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    // Every data step done, the resume fails: left open for the next command.
    lab.host.fail_next(FakeOp::Unpause, 1);
    assert!(engine.create(&create("vm", "s")).is_err());
    let op = lab.last_op(&engine);
    assert_eq!(engine.memory_stats().unwrap().images, 1);
    drop(engine);
    // The domain vanishes from the host meanwhile (removed outside domsnap).
    lab.host.destroy("vm").unwrap();
    lab.host.undefine_domain("vm").unwrap();
    let mut engine = lab.engine();
    assert_eq!(lab.outcome(&engine, op), Outcome::Failed);
    // Nothing holds its image any more: gc frees it.
    engine.gc().unwrap();
    assert_eq!(engine.memory_stats().unwrap().images, 0);
    let report = engine.verify(None, true).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn recovery_never_replaces_a_boot_started_after_the_interruption_without_force() {
    let lab = Lab::new();
    let mut engine = lab.engine();
    lab.host.step("vm", 7).unwrap();
    engine.create(&create("vm", "seven")).unwrap();
    lab.host.step("vm", 5).unwrap();
    lab.host.fail_next(FakeOp::RestoreMemory, 1);
    assert!(engine
        .revert(&RevertRequest {
            domain: "vm".into(),
            name: "seven".into(),
            state: None,
        })
        .is_err());
    let op = lab.last_op(&engine);
    drop(engine);
    // Someone boots the domain by hand (outside domsnap) and it runs on.
    lab.host.start("vm", false).unwrap();
    lab.host.step("vm", 3).unwrap();
    let boot = lab.host.domain("vm").unwrap().instance;
    let counter = lab.host.memory_counter("vm").unwrap();

    let mut engine = lab.engine();
    let report = engine
        .recover(RecoverMode::Requested { force: false })
        .unwrap();
    assert!(report[0].open, "{report:?}");
    assert!(report[0].result.contains("--force"), "{report:?}");
    assert_eq!(lab.outcome(&engine, op), Outcome::NeedsRecovery);
    let info = lab.host.domain("vm").unwrap();
    assert_eq!((info.state, info.instance), (RunState::Running, boot));
    assert_eq!(lab.host.memory_counter("vm").unwrap(), counter);

    engine
        .recover(RecoverMode::Requested { force: true })
        .unwrap();
    assert_eq!(lab.outcome(&engine, op), Outcome::RolledForward);
    assert_eq!(lab.host.memory_counter("vm").unwrap(), 7);
    assert_ne!(lab.host.domain("vm").unwrap().instance, boot);
}

#[test]
fn an_operation_of_another_host_kind_blocks_its_domain_only() {
    let lab = Lab::new();
    let op = lab.journal_open_op("vm", "xen", &["save-memory", "snapshot-disk:xvda"]);
    let mut engine = lab.engine();
    assert_eq!(lab.outcome(&engine, op), Outcome::Open, "left alone");
    let e = engine.create(&create("vm", "x")).unwrap_err();
    assert!(
        matches!(e, Error::Unfinished { op: o, .. } if o == op),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::NeedsRecovery);
    engine.create(&create("other", "fine")).unwrap();
    let report = engine
        .recover(RecoverMode::Requested { force: false })
        .unwrap();
    let entry = report.iter().find(|r| r.op == op).unwrap();
    assert!(
        entry.open && entry.result.contains("--host xen"),
        "{entry:?}"
    );
}

#[test]
fn an_unreadable_step_is_corruption_that_blocks_its_domain_only() {
    let lab = Lab::new();
    let op = lab.journal_open_op("vm", "fake", &["save-memory", "snapshot-disk-v9:xvda"]);
    let mut engine = lab.engine();
    // Never rolled forward as if the unknown step were not there.
    assert_eq!(lab.outcome(&engine, op), Outcome::Open);
    let report = engine
        .recover(RecoverMode::Requested { force: false })
        .unwrap();
    let entry = report.iter().find(|r| r.op == op).unwrap();
    assert!(entry.open, "{entry:?}");
    assert!(
        entry.result.contains(&format!("operation {op}"))
            && entry.result.contains("snapshot-disk-v9:xvda"),
        "{entry:?}"
    );
    assert_eq!(
        engine.create(&create("vm", "x")).unwrap_err().kind(),
        ErrorKind::NeedsRecovery
    );
    engine.create(&create("other", "fine")).unwrap();
    assert!(!engine.verify(None, false).unwrap().is_clean());
}
