#![allow(clippy::unwrap_used)]
use journal::*;

fn begun(op: OpId, domain: &str, snapshot: &str) -> Event {
    Event::OpBegun(OpBegun {
        op,
        at: now_millis(),
        kind: OpKind::Create,
        domain: domain.into(),
        snapshot: snapshot.into(),
        user: "root".into(),
        pid: 1,
        host: "sim".into(),
        prior_state: DomainState::Running,
        steps: vec!["snapshot-disk:xvda".into()],
        params: OpParams::default(),
    })
}

fn meta(domain: &str, name: &str, parent: Option<&str>, op: OpId) -> SnapshotMeta {
    SnapshotMeta {
        domain: domain.into(),
        name: name.into(),
        parent: parent.map(Into::into),
        kind: SnapshotKind::DiskOnly,
        created: now_millis(),
        op,
        domain_state: DomainState::Shutoff,
        memory_image: None,
        memory_bytes: 0,
        disks: vec![],
        description: None,
        crash_consistent: false,
    }
}

fn create(j: &mut Journal, domain: &str, name: &str, parent: Option<&str>) -> OpId {
    let op = j.next_seq();
    j.append(begun(op, domain, name)).unwrap();
    j.append(Event::OpCommitted {
        op,
        at: now_millis(),
        change: CatalogChange::Created(meta(domain, name, parent, op)),
    })
    .unwrap();
    op
}

#[test]
fn events_projections_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let op;
    {
        let mut j = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
        create(&mut j, "web01", "a", None);
        create(&mut j, "web01", "b", Some("a"));
        create(&mut j, "db", "x", None);
        op = j.next_seq();
        j.append(begun(op, "web01", "c")).unwrap();
        assert_eq!(j.open_ops().unwrap(), vec![op]);
    }
    let mut j = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    assert_eq!(j.next_seq(), op + 1, "sequence continues after reopen");
    let c = j.domain_catalog("web01").unwrap();
    assert_eq!(c.current.as_deref(), Some("b"));
    assert_eq!(c.snapshots["b"].parent.as_deref(), Some("a"));
    assert_eq!(j.domain_seqs("db").unwrap().len(), 2);
    assert_eq!(j.open_ops().unwrap(), vec![op]);
    j.append(Event::OpRolledBack {
        op,
        at: now_millis(),
        reason: "test".into(),
    })
    .unwrap();
    assert!(j.open_ops().unwrap().is_empty());
    assert_eq!(j.op(op).unwrap().unwrap().outcome, Outcome::RolledBack);
    assert_eq!(j.op_events(op).unwrap().len(), 2);
    assert!(j.verify().unwrap().is_empty());
}

#[test]
fn recovery_forward_is_reported_as_rolled_forward() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    let op = j.next_seq();
    j.append(begun(op, "d", "s")).unwrap();
    let mut batch = Batch::new();
    batch
        .event(Event::RecoveryDecided {
            op,
            at: 1,
            decision: Decision::Forward,
            reason: "all data steps done".into(),
        })
        .event(Event::OpCommitted {
            op,
            at: 2,
            change: CatalogChange::Created(meta("d", "s", None, op)),
        });
    j.commit(batch).unwrap();
    assert_eq!(j.op(op).unwrap().unwrap().outcome, Outcome::RolledForward);
    assert!(j.verify().unwrap().is_empty());
}

#[test]
fn verify_finds_a_tampered_catalog_and_rebuild_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    create(&mut j, "web01", "a", None);
    create(&mut j, "web01", "b", Some("a"));
    let mut bad = j.domain_catalog("web01").unwrap();
    bad.snapshots.remove("a");
    j.tamper_catalog("web01", &bad).unwrap();
    let problems = j.verify().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("web01"));
    j.rebuild_projections().unwrap();
    assert!(j.verify().unwrap().is_empty());
    assert!(j
        .domain_catalog("web01")
        .unwrap()
        .snapshots
        .contains_key("a"));
}

#[test]
fn readers_work_beside_the_writer_and_a_second_writer_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    create(&mut j, "web01", "a", None);
    let r = Journal::open(&dir.path().join("journal"), Mode::ReadOnly).unwrap();
    assert!(r
        .domain_catalog("web01")
        .unwrap()
        .snapshots
        .contains_key("a"));
    assert!(matches!(
        Journal::open(&dir.path().join("journal"), Mode::Primary),
        Err(Error::Busy(_))
    ));
    drop(r);
    drop(j);
    Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
}

#[test]
fn engine_tables_commit_with_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    let op = j.next_seq();
    let mut batch = Batch::new();
    batch.event(begun(op, "d", "s"));
    batch.put(Table::Chunks, b"k1", &7u64).unwrap();
    batch.put(Table::Chunks, b"k2", &8u64).unwrap();
    batch.put(Table::Images, b"k1", &9u64).unwrap();
    j.commit(batch).unwrap();
    let all: Vec<(Vec<u8>, u64)> = j.scan(Table::Chunks, b"k").unwrap();
    assert_eq!(all, vec![(b"k1".to_vec(), 7), (b"k2".to_vec(), 8)]);
    let mut batch = Batch::new();
    batch.delete(Table::Chunks, b"k1");
    j.commit(batch).unwrap();
    assert_eq!(j.get::<u64>(Table::Chunks, b"k1").unwrap(), None);
    assert_eq!(j.get::<u64>(Table::Images, b"k1").unwrap(), Some(9));
}

#[test]
fn op_begun_must_carry_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    assert!(j.append(begun(99, "d", "s")).is_err());
    assert_eq!(j.last_seq().unwrap(), 0, "nothing written");
}
