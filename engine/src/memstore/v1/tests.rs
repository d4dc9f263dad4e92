//! A store written by the first release stays readable, releasable and collectable, beside
//! format-2 images.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::FileExt;

use journal::{Journal, Mode};

use crate::memstore::{MemStore, DEFAULT_STATE};

struct Fixture {
    dir: tempfile::TempDir,
    journal: Journal,
    store: MemStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    let store = MemStore::open(&dir.path().join("memory"), DEFAULT_STATE, false).unwrap();
    Fixture {
        dir,
        journal,
        store,
    }
}

fn data(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; n];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    // A quarter zeros, like memory.
    for c in v.chunks_mut(1 << 16).step_by(4) {
        c.fill(0);
    }
    v
}

impl Fixture {
    /// Ingests with the first release's writer and commits, as that release did.
    fn ingest_v1(&mut self, op: u64, bytes: &[u8]) -> String {
        let mut w = self.store.writer_v1(&self.journal, op).unwrap();
        w.write_all(bytes).unwrap();
        let done = w.finish().unwrap();
        self.journal.commit(done.batch).unwrap();
        done.image
    }

    fn restore(&self, image: &str) -> Vec<u8> {
        let mut out = Vec::new();
        self.store
            .restore(&self.journal, image, &mut out, &mut |_| {})
            .unwrap();
        let staged = self.store.stage_image(&self.journal, image).unwrap();
        let mut again = Vec::new();
        staged.write_to(&mut again, &mut |_| {}).unwrap();
        assert_eq!(out, again);
        out
    }
}

#[test]
fn format_1_images_stay_readable_releasable_and_collectable() {
    let mut f = fixture();
    let a_data = data(1, 3 << 20);
    let b_data = data(2, 2 << 20);
    let a = f.ingest_v1(1, &a_data);
    let b = f.ingest_v1(2, &b_data);
    assert_eq!(f.restore(&a), a_data);
    assert_eq!(f.store.verify(&f.journal, &b).unwrap(), b_data.len() as u64);
    assert_eq!(
        f.store.image(&f.journal, &a).unwrap(),
        Some(a_data.len() as u64)
    );
    let held: BTreeMap<String, u64> = [(a.clone(), 1), (b.clone(), 1)].into();
    assert_eq!(
        f.store.check(&f.journal, &held).unwrap(),
        Vec::<String>::new()
    );

    // A format-2 image beside them; a format-1 parent is no parent.
    let c_data = data(3, 1 << 20);
    let captured = f
        .store
        .capture(&f.journal, 3, Some(&a), |w: &mut dyn Write| {
            w.write_all(&c_data).unwrap();
            Ok::<(), crate::memstore::Error>(())
        })
        .unwrap();
    let sealed = f.store.seal(captured).unwrap();
    f.journal.commit(sealed.batch).unwrap();
    assert_eq!(f.restore(&sealed.image), c_data);
    let mut held = held;
    held.insert(sealed.image.clone(), 1);
    assert_eq!(
        f.store.check(&f.journal, &held).unwrap(),
        Vec::<String>::new()
    );

    // Releasing a gives its chunks up; gc frees its pack; b and c stay whole.
    let batch = f.store.release(&f.journal, &a).unwrap();
    f.journal.commit(batch).unwrap();
    held.remove(&a);
    let live: BTreeSet<String> = held.keys().cloned().collect();
    let report = f.store.collect(&mut f.journal, &live).unwrap();
    assert!(report.packs_removed >= 1, "{report:?}");
    assert!(!f.dir.path().join("memory/packs/op-1.pack").exists());
    assert_eq!(f.restore(&b), b_data);
    assert_eq!(f.restore(&sealed.image), c_data);
    assert_eq!(
        f.store.check(&f.journal, &held).unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn a_damaged_format_1_chunk_is_caught() {
    let mut f = fixture();
    let a = f.ingest_v1(1, &data(4, 1 << 20));
    let path = f.dir.path().join("memory/packs/op-1.pack");
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"X", 16 + 36 + 3).unwrap();
    let err = f.store.verify(&f.journal, &a).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    let mut out = Vec::new();
    assert!(f
        .store
        .restore(&f.journal, &a, &mut out, &mut |_| {})
        .unwrap_err()
        .is_corruption());
}
