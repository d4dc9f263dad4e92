//! Opening a journal: creating versus opening an existing one, the writer lock, the
//! identity, and read-only opens that write nothing.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use journal::*;

fn begun(op: OpId) -> Event {
    Event::OpBegun(OpBegun {
        op,
        at: now_millis(),
        kind: OpKind::Delete,
        domain: "d".into(),
        snapshot: "s".into(),
        user: "root".into(),
        pid: 1,
        host: "sim".into(),
        prior_state: DomainState::Shutoff,
        steps: vec![],
        params: OpParams::default(),
    })
}

/// Every file under `dir`: length, mode and modification time.
fn listing(dir: &Path) -> BTreeMap<String, (u64, u32, SystemTime)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let m = entry.metadata().unwrap();
        out.insert(
            entry.file_name().to_string_lossy().into_owned(),
            (m.len(), m.permissions().mode(), m.modified().unwrap()),
        );
    }
    out
}

#[test]
fn create_records_the_identity_and_refuses_an_existing_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    assert!(!Journal::exists(&path));
    let id = JournalIdentity {
        state: StateId::random().unwrap(),
        first_seq: 1,
    };
    {
        let j = Journal::create(&path, WriterLock::acquire(&path).unwrap(), id).unwrap();
        assert_eq!(j.identity(), Some(id));
        assert_eq!(j.next_seq(), 1);
    }
    assert!(Journal::exists(&path));
    let again = Journal::create(&path, WriterLock::acquire(&path).unwrap(), id);
    assert!(matches!(again, Err(Error::Exists(_))), "{again:?}");
    let j = Journal::open_writer(&path, WriterLock::acquire(&path).unwrap()).unwrap();
    assert_eq!(j.identity(), Some(id));
    drop(j);
    let r = Journal::open_read_only(&path).unwrap();
    assert_eq!(r.identity(), Some(id));
}

#[test]
fn a_missing_journal_is_reported_and_never_created_by_opening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let w = Journal::open_writer(&path, WriterLock::acquire(&path).unwrap());
    assert!(matches!(w, Err(Error::Missing(_))), "{w:?}");
    let r = Journal::open_read_only(&path);
    assert!(matches!(r, Err(Error::Missing(_))), "{r:?}");
    assert!(!path.exists(), "no directory was created");
}

#[test]
fn a_journal_that_replaces_a_lost_one_starts_above_the_ids_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let id = JournalIdentity {
        state: StateId::random().unwrap(),
        first_seq: 1000,
    };
    let mut j = Journal::create(&path, WriterLock::acquire(&path).unwrap(), id).unwrap();
    assert_eq!(j.next_seq(), 1000);
    assert!(
        j.append(begun(1)).is_err(),
        "ids below the first are refused"
    );
    j.append(begun(1000)).unwrap();
    assert_eq!(j.ops().unwrap()[0].op, 1000);
    assert!(j.verify().unwrap().is_empty(), "{:?}", j.verify());
    drop(j);
    let j = Journal::open(&path, Mode::Primary).unwrap();
    assert_eq!(j.next_seq(), 1001);
    assert!(j.verify().unwrap().is_empty());
}

#[test]
fn an_identity_is_set_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let mut j = Journal::open(&path, Mode::Primary).unwrap();
    let had = j.identity().unwrap();
    let other = JournalIdentity::fresh().unwrap();
    assert!(j.set_identity(other).is_err());
    assert_eq!(j.identity(), Some(had));
}

#[test]
fn a_second_writer_is_busy_by_the_lock_file_and_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let j = Journal::open(&path, Mode::Primary).unwrap();
    match WriterLock::acquire(&path) {
        Err(Error::Busy(who)) => assert!(
            who.contains(&format!("pid {}", std::process::id())),
            "{who}"
        ),
        other => panic!("expected busy, got {other:?}"),
    }
    assert!(matches!(
        Journal::open(&path, Mode::Primary),
        Err(Error::Busy(_))
    ));
    drop(j);
    Journal::open(&path, Mode::Primary).unwrap();
}

#[test]
fn read_only_opens_write_nothing_in_the_journal_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    {
        let mut j = Journal::open(&path, Mode::Primary).unwrap();
        for _ in 0..3 {
            let op = j.next_seq();
            j.append(begun(op)).unwrap();
        }
    }
    let (before, parent_before) = (listing(&path), listing(dir.path()));
    // RocksDB rotates its info log at every open, a read-only one too, unless told not to.
    std::thread::sleep(std::time::Duration::from_millis(20));
    for _ in 0..3 {
        let r = Journal::open_read_only(&path).unwrap();
        assert_eq!(r.open_ops().unwrap().len(), 3);
        assert_eq!(r.mode(), Mode::ReadOnly);
    }
    assert_eq!(listing(&path), before, "the journal directory changed");
    assert_eq!(
        listing(dir.path()),
        parent_before,
        "a file appeared beside it"
    );
}

#[test]
fn readers_open_beside_a_busy_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let mut j = Journal::open(&path, Mode::Primary).unwrap();
    let reader_path = path.clone();
    let readers = std::thread::spawn(move || {
        for _ in 0..100 {
            let r = Journal::open_read_only(&reader_path).unwrap();
            r.ops().unwrap();
        }
    });
    while !readers.is_finished() {
        let op = j.next_seq();
        j.append(begun(op)).unwrap();
    }
    readers.join().unwrap();
}

#[test]
fn an_empty_journal_reads_as_nothing_and_leaves_nothing_behind() {
    let j = Journal::empty().unwrap();
    let dir = j.path().to_path_buf();
    assert!(dir.is_dir());
    assert_eq!(j.mode(), Mode::ReadOnly);
    assert_eq!(j.identity(), None);
    assert!(j.ops().unwrap().is_empty());
    assert!(j.catalog().unwrap().domains.is_empty());
    drop(j);
    assert!(!dir.exists());
}

#[test]
fn readers_see_every_committed_event_while_writers_come_and_go() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    drop(Journal::open(&path, Mode::Primary).unwrap());
    // Each writer opens the journal (recovering the previous writer's log into a new table
    // file and deleting the log), appends, and closes.
    let committed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, committed, done) = (path.clone(), committed.clone(), done.clone());
        std::thread::spawn(move || {
            for _ in 0..40 {
                let mut j = Journal::open(&path, Mode::Primary).unwrap();
                let op = j.next_seq();
                j.append(begun(op)).unwrap();
                committed.store(op, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut opens = 0;
    while !done.load(Ordering::SeqCst) {
        let at_least = committed.load(Ordering::SeqCst);
        let r = Journal::open_read_only(&path).unwrap();
        let seen = r.next_seq() - 1;
        assert!(
            seen >= at_least,
            "a reader saw {seen} events, {at_least} were committed"
        );
        opens += 1;
    }
    writer.join().unwrap();
    assert!(opens > 0);
}
