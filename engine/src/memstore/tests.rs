#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;

use journal::{Event, Journal, Mode, OpBegun, OpKind};
use store::{MemoryStore, ObjectStore};

use super::cut::{cut_all, PieceKind, StreamKind};
use super::format::{self, PAGE};
use super::*;

mod xl;

struct Fixture {
    _dir: tempfile::TempDir,
    journal: Journal,
    store: MemStore,
    objects: Arc<MemoryStore>,
}

/// A store on the in-memory object store (which can crash and fail on demand) with a real
/// journal.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    let objects = Arc::new(MemoryStore::new());
    let store = MemStore::with_objects(objects.clone(), &dir.path().join("memory"), DEFAULT_STATE);
    Fixture {
        _dir: dir,
        journal,
        store,
        objects,
    }
}

/// A store in a directory (the real thing).
fn local_fixture() -> (tempfile::TempDir, Journal, MemStore) {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    let store = MemStore::open(&dir.path().join("memory"), DEFAULT_STATE, false).unwrap();
    (dir, journal, store)
}

/// xorshift64*: fast, deterministic test data.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(super) fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    pub(super) fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Pages: 40% zero, 10% copies of earlier pages, 50% random.
pub(super) fn memory_like(rng: &mut Rng, pages: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE];
    for p in 0..pages {
        let r = rng.next() % 10;
        let at = p * PAGE;
        if r < 4 {
            continue;
        } else if r == 4 && p > 0 {
            let from = (rng.next() as usize % p) * PAGE;
            v.copy_within(from..from + PAGE, at);
        } else {
            rng.fill(&mut v[at..at + PAGE]);
        }
    }
    v
}

fn feed(data: &[u8], piece: usize) -> impl FnOnce(&mut dyn Write) -> Result<()> + '_ {
    move |w: &mut dyn Write| {
        for part in data.chunks(piece.max(1)) {
            w.write_all(part).map_err(|e| Error::Io {
                op: "feed",
                path: "<test>".into(),
                source: e,
            })?;
        }
        Ok(())
    }
}

impl Fixture {
    fn capture(&self, op: u64, parent: Option<&str>, data: &[u8]) -> Captured {
        self.store
            .capture(&self.journal, op, parent, feed(data, 1 << 20))
            .unwrap()
    }

    /// Captures, seals and commits; returns the seal.
    fn ingest(&mut self, op: u64, parent: Option<&str>, data: &[u8]) -> Sealed {
        let captured = self.capture(op, parent, data);
        let mut sealed = self.store.seal(captured).unwrap();
        let batch = std::mem::take(&mut sealed.batch);
        self.journal.commit(batch).unwrap();
        sealed
    }

    fn restore(&self, image: &str) -> Vec<u8> {
        let mut out = Vec::new();
        self.store
            .restore(&self.journal, image, &mut out, &mut |_| {})
            .unwrap();
        let staged = self.store.stage_image(&self.journal, image).unwrap();
        let mut again = Vec::new();
        staged.write_to(&mut again, &mut |_| {}).unwrap();
        assert_eq!(out, again, "staged and streamed restores agree");
        assert_eq!(
            self.store.verify(&self.journal, image).unwrap(),
            out.len() as u64
        );
        out
    }

    fn names(&self, prefix: &str) -> Vec<String> {
        self.objects
            .list(prefix)
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect()
    }

    /// Journals an operation that began and ended (rolled back), so gc knows it.
    fn ended_op(&mut self) -> u64 {
        let op = self.journal.next_seq();
        self.journal
            .append(Event::OpBegun(OpBegun {
                op,
                at: 0,
                kind: OpKind::Create,
                domain: "d".into(),
                snapshot: "s".into(),
                user: "u".into(),
                pid: 1,
                host: "sim".into(),
                prior_state: journal::DomainState::Running,
                steps: vec![],
                params: Default::default(),
            }))
            .unwrap();
        self.journal
            .append(Event::OpRolledBack {
                op,
                at: 0,
                reason: "test".into(),
            })
            .unwrap();
        op
    }
}

#[test]
fn round_trip_of_many_sizes() {
    let mut f = fixture();
    let mut rng = Rng(1);
    let sizes = [
        0,
        1,
        4095,
        4096,
        4097,
        10 * PAGE + 3,
        5 << 20,
        (9 << 20) + 17,
    ];
    for (i, n) in sizes.into_iter().enumerate() {
        let data = rng.bytes(n);
        let sealed = f.ingest(100 + i as u64, None, &data);
        assert_eq!(sealed.bytes, n as u64);
        assert_eq!(f.restore(&sealed.image), data, "size {n}");
    }
}

#[test]
fn zero_pages_are_never_stored() {
    let mut f = fixture();
    let sealed = f.ingest(1, None, &vec![0u8; 8 << 20]);
    assert_eq!(sealed.bytes_new, 0);
    assert!(f.names("packs/").is_empty(), "no pack for zeros");
    assert_eq!(f.restore(&sealed.image), vec![0u8; 8 << 20]);
}

#[test]
fn equal_pages_are_stored_once_and_writes_do_not_matter() {
    let f = fixture();
    let page = Rng(2).bytes(PAGE);
    let data: Vec<u8> = std::iter::repeat_n(&page[..], 300)
        .flatten()
        .copied()
        .collect();
    let a = f.capture(1, None, &data);
    assert_eq!(a.stats().bytes_new, PAGE as u64);
    let mut ids = BTreeSet::new();
    for piece in [1, 7, 4096, 1 << 20] {
        let c = f
            .store
            .capture(&f.journal, 2, None, feed(&data, piece))
            .unwrap();
        ids.insert(c.image());
    }
    assert_eq!(ids.len(), 1, "the image does not depend on write sizes");
    assert!(ids.contains(&a.image()));
}

/// The 5%-changed checkpoint: exactly the changed pages are stored, and what is written
/// (packs with their trailers, the manifest, the index records) stays within 1.3 × the
/// changed bytes.
#[test]
fn a_checkpoint_with_5_percent_of_pages_changed_stores_only_those() {
    let mut f = fixture();
    let mut rng = Rng(3);
    let pages = 4096; // 16 MiB
    let first = memory_like(&mut rng, pages);
    let a = f.ingest(1, None, &first);
    let mut second = first.clone();
    let mut changed = BTreeSet::new();
    while changed.len() < pages / 20 {
        changed.insert(rng.next() as usize % pages);
    }
    for p in &changed {
        rng.fill(&mut second[p * PAGE..(p + 1) * PAGE]);
    }
    let captured = f.capture(2, Some(&a.image), &second);
    let stats = captured.stats();
    assert_eq!(stats.bytes_new, (changed.len() * PAGE) as u64);
    assert_eq!(stats.pages_new, changed.len() as u64);
    let sealed = f.store.seal(captured).unwrap();
    let index_bytes = sealed.batch.table_bytes();
    let changed_bytes = (changed.len() * PAGE) as u64;
    let written = sealed.bytes_written + index_bytes;
    assert!(
        written * 10 <= changed_bytes * 13,
        "wrote {written} bytes for {changed_bytes} changed"
    );
    let manifest_len = f.objects.len(&sealed.manifest).unwrap().unwrap();
    assert!(
        manifest_len < 64 * changed.len() as u64 + 4096,
        "a delta manifest: {manifest_len}"
    );
    f.journal.commit(sealed.batch).unwrap();
    assert_eq!(f.restore(&sealed.image), second);
    assert_eq!(f.restore(&a.image), first);
}

#[test]
fn delta_chains_are_bounded_and_every_link_restores() {
    let mut f = fixture();
    let mut rng = Rng(4);
    let mut data = memory_like(&mut rng, 512);
    let mut images = Vec::new();
    let mut parent: Option<String> = None;
    for op in 1..=20u64 {
        let p = rng.next() as usize % 512;
        rng.fill(&mut data[p * PAGE..p * PAGE + 64]);
        let sealed = f.ingest(op, parent.as_deref(), &data);
        let m = manifest::decode(
            &sealed.manifest,
            &f.objects.get(&sealed.manifest).unwrap().unwrap(),
        )
        .unwrap();
        assert!(m.depth <= format::MAX_CHAIN);
        images.push((sealed.image.clone(), data.clone()));
        parent = Some(sealed.image);
    }
    for (image, data) in &images {
        assert_eq!(&f.restore(image), data);
    }
}

/// Defect: a chunk was reused although its pack was gone. Now a capture stores chunks of a
/// missing pack again, the new image restores, and the check names the pack.
#[test]
fn chunks_of_a_lost_pack_are_stored_again() {
    let mut f = fixture();
    let data = memory_like(&mut Rng(5), 1024);
    let a = f.ingest(1, None, &data);
    let packs = f.names("packs/");
    assert!(!packs.is_empty());
    f.objects.tamper(&packs[0], None);
    let problems = f.store.check(&f.journal, &Default::default()).unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.contains(&packs[0]) && p.contains("missing")),
        "{problems:?}"
    );
    assert!(f
        .store
        .verify(&f.journal, &a.image)
        .unwrap_err()
        .is_corruption());
    let b = f.ingest(2, Some(&a.image), &data);
    assert!(b.bytes_new > 0, "the lost chunks were stored again");
    assert_eq!(b.image, a.image, "same memory, same image");
    assert_eq!(f.restore(&b.image), data, "taking it again repaired it");
    // A pack cut short counts as lost too.
    let packs = f.names("packs/");
    let victim = &packs[packs.len() - 1];
    let mut bytes = f.objects.get(victim).unwrap().unwrap();
    bytes.truncate(bytes.len() / 2);
    f.objects.tamper(victim, Some(bytes));
    let problems = f.store.check(&f.journal, &Default::default()).unwrap();
    assert!(
        problems.iter().any(|p| p.contains(victim.as_str())),
        "{problems:?}"
    );
    let c = f.ingest(3, Some(&b.image), &data);
    assert!(c.bytes_new > 0);
}

#[test]
fn a_damaged_chunk_is_refused_before_anything_is_written() {
    let mut f = fixture();
    let data = Rng(6).bytes(64 * PAGE);
    let a = f.ingest(1, None, &data);
    let pack = f.names("packs/")[0].clone();
    let mut bytes = f.objects.get(&pack).unwrap().unwrap();
    bytes[format::PACK_HEADER + 5] ^= 1;
    f.objects.tamper(&pack, Some(bytes));
    let err = f.store.stage_image(&f.journal, &a.image).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    let mut out = Vec::new();
    let err = f
        .store
        .restore(&f.journal, &a.image, &mut out, &mut |_| {})
        .unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert!(out.is_empty(), "nothing of a bad first chunk was written");
}

#[test]
fn a_damaged_manifest_is_refused() {
    let mut f = fixture();
    let a = f.ingest(1, None, &Rng(7).bytes(8 * PAGE));
    let mut m = f.objects.get(&a.manifest).unwrap().unwrap();
    m[50] ^= 0x40;
    f.objects.tamper(&a.manifest, Some(m));
    let err = f.store.verify(&f.journal, &a.image).unwrap_err();
    assert!(matches!(err, Error::BadManifest { .. }), "{err}");
}

/// Nothing is durable before seal: a crash after capture loses the packs, and abandon
/// cleans up what is left; after seal, everything the batch names survives a crash.
#[test]
fn capture_is_not_durable_until_sealed() {
    let mut f = fixture();
    let data = Rng(8).bytes(2000 * PAGE);
    let c = f.capture(1, None, &data);
    assert!(!f.names("packs/").is_empty());
    f.objects.crash();
    assert!(
        f.names("packs/").is_empty(),
        "unflushed packs are lost in a crash"
    );
    drop(c);
    let c = f.capture(2, None, &data);
    f.store.abandon(&f.journal, 2).unwrap();
    assert!(
        f.names("").is_empty(),
        "abandon removes what the capture put"
    );
    drop(c);
    let sealed = f.ingest(3, None, &data);
    f.objects.crash();
    assert_eq!(f.restore(&sealed.image), data);
    f.store.abandon(&f.journal, 3).unwrap();
    assert_eq!(
        f.restore(&sealed.image),
        data,
        "abandon keeps what the index names"
    );
}

#[test]
fn a_full_store_fails_the_capture_cleanly() {
    let f = fixture();
    f.objects.fail_writes(Some(store::ErrorKind::NoSpace));
    let err = f
        .store
        .capture(&f.journal, 1, None, feed(&Rng(9).bytes(20 << 20), 1 << 20))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Store(e) if e.kind() == store::ErrorKind::NoSpace),
        "{err:?}"
    );
}

#[test]
fn gc_keeps_live_images_and_their_chains_and_deletes_the_rest() {
    let mut f = fixture();
    let mut rng = Rng(10);
    let first = memory_like(&mut rng, 2048);
    let op = f.ended_op();
    let a = f.ingest(op, None, &first);
    let mut second = first.clone();
    rng.fill(&mut second[..100 * PAGE]);
    let op = f.ended_op();
    let b = f.ingest(op, Some(&a.image), &second);
    let other = rng.bytes(64 * PAGE);
    let op = f.ended_op();
    let c = f.ingest(op, None, &other);
    // Only b is live: a's manifest stays (b is a delta on it), c goes.
    let live: BTreeSet<String> = [b.image.clone()].into();
    let report = f.store.collect(&mut f.journal, &live).unwrap();
    assert!(report.packs_removed >= 1, "{report:?}");
    assert!(report.unknown.is_empty(), "{report:?}");
    assert_eq!(f.restore(&b.image), second);
    assert!(f.store.verify(&f.journal, &c.image).is_err());
    assert!(
        f.objects.get(&a.manifest).unwrap().is_some(),
        "the chain's base stays"
    );
    assert!(f
        .store
        .check(&f.journal, &Default::default())
        .unwrap()
        .is_empty());
    // Nothing live: everything goes.
    f.store.collect(&mut f.journal, &BTreeSet::new()).unwrap();
    assert!(f.names("").is_empty(), "{:?}", f.names(""));
    assert_eq!(f.store.stats(&f.journal).unwrap(), Stats::default());
}

#[test]
fn gc_rewrites_mostly_dead_packs() {
    let mut f = fixture();
    let mut rng = Rng(11);
    let data = rng.bytes(1024 * PAGE);
    let op = f.ended_op();
    let a = f.ingest(op, None, &data);
    let mut small = vec![0u8; 1024 * PAGE];
    small[..100 * PAGE].copy_from_slice(&data[..100 * PAGE]);
    let op = f.ended_op();
    let b = f.ingest(op, None, &small);
    let live: BTreeSet<String> = [b.image.clone()].into();
    let report = f.store.collect(&mut f.journal, &live).unwrap();
    assert_eq!(report.packs_rewritten, 1, "{report:?}");
    assert!(report.bytes_freed > 800 * PAGE as u64, "{report:?}");
    assert_eq!(f.restore(&b.image), small);
    assert!(f.store.verify(&f.journal, &a.image).is_err());
    assert!(f
        .store
        .check(&f.journal, &Default::default())
        .unwrap()
        .is_empty());
}

/// gc deletes only what the journal can account for.
#[test]
fn gc_reports_objects_the_journal_does_not_know_and_keeps_them() {
    let mut f = fixture();
    let data = Rng(12).bytes(64 * PAGE);
    // An operation the journal never saw (op 999) left a pack and a manifest.
    let c = f.capture(999, None, &data);
    let sealed = f.store.seal(c).unwrap();
    drop(sealed.batch);
    let foreign = "manifests/ffffffffffffffffffffffffffffffff/3";
    f.objects.put(foreign, b"someone else's").unwrap();
    let before = f.names("");
    let report = f.store.collect(&mut f.journal, &BTreeSet::new()).unwrap();
    assert_eq!(f.names(""), before, "nothing unknown is deleted");
    assert_eq!(report.unknown.len(), before.len(), "{report:?}");
    // Once the journal knows the operation ended, its leftovers go.
    let op = f.ended_op();
    let c = f.capture(op, None, &Rng(13).bytes(64 * PAGE));
    let s = f.store.seal(c).unwrap();
    drop(s.batch);
    f.store.collect(&mut f.journal, &BTreeSet::new()).unwrap();
    assert_eq!(f.names(""), before);
}

#[test]
fn an_xl_save_stream_is_cut_into_its_pages_and_restored_byte_for_byte() {
    let mut f = fixture();
    let mut rng = Rng(14);
    let memory = memory_like(&mut rng, 3000);
    let stream = xl::stream(&memory, "{\"name\":\"web1\"}", 1);
    let (pieces, cutter) = cut_all(&stream);
    assert_eq!(cutter.kind(), StreamKind::Xl, "{:?}", cutter.gave_up());
    assert_eq!(cutter.gave_up(), None);
    let pages = pieces.iter().filter(|p| p.2 == PieceKind::Page).count();
    assert_eq!(pages, 3000 - xl::XTAB_PER_STREAM);
    let a = f.ingest(1, None, &stream);
    assert_eq!(f.restore(&a.image), stream);
    // A second save: 50 pages dirtied, a longer config (every offset shifts), other
    // TSC and vCPU records: only the dirtied pages and a few small records are new.
    let mut memory2 = memory.clone();
    for _ in 0..50 {
        let p = (rng.next() % 3000) as usize;
        rng.fill(&mut memory2[p * PAGE..(p + 1) * PAGE]);
    }
    let stream2 = xl::stream(&memory2, "{\"name\":\"web1\",\"memory\":128}", 2);
    let c = f.capture(2, Some(&a.image), &stream2);
    let stats = c.stats();
    assert!(stats.pages_new <= 50, "{stats:?}");
    assert!(
        stats.bytes_new < 60 * PAGE as u64,
        "stored {} bytes for 50 dirtied pages",
        stats.bytes_new
    );
    let sealed = f.store.seal(c).unwrap();
    f.journal.commit(sealed.batch).unwrap();
    assert_eq!(f.restore(&sealed.image), stream2);
}

/// Mutated streams (bytes flipped, fields changed, truncated): the cutter never panics,
/// covers every byte with pieces ≤ CHUNK_MAX, and the store restores each exactly.
#[test]
fn damaged_xl_streams_fall_back_and_still_round_trip() {
    let mut f = fixture();
    let mut rng = Rng(15);
    let memory = memory_like(&mut rng, 1500);
    let good = xl::stream(&memory, "{}", 1);
    let mut fell_back = 0;
    for round in 0..60u64 {
        let mut s = good.clone();
        match round % 4 {
            0 => {
                for _ in 0..(1 + rng.next() % 4) {
                    let at = rng.next() as usize % s.len();
                    s[at] = rng.next() as u8;
                }
            }
            1 => s.truncate(rng.next() as usize % s.len()),
            2 => {
                // A header or length field set to something large.
                let at = (rng.next() as usize % (s.len() / 8)) * 8;
                s[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            }
            _ => {
                let at = rng.next() as usize % s.len();
                s.insert(at, 0x5a);
            }
        }
        let (pieces, cutter) = cut_all(&s);
        assert_eq!(pieces.iter().map(|p| p.1).sum::<usize>(), s.len());
        assert!(pieces.iter().all(|p| p.1 >= 1 && p.1 <= format::CHUNK_MAX));
        if cutter.kind() == StreamKind::Opaque {
            fell_back += 1;
        }
        if round % 6 == 0 {
            let sealed = f.ingest(100 + round, None, &s);
            assert_eq!(f.restore(&sealed.image), s, "round {round}");
        }
    }
    assert!(
        fell_back > 10,
        "mutations make the parser give up: {fell_back}"
    );
}

#[test]
fn the_local_store_keeps_guest_memory_private() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, mut journal, store) = local_fixture();
    let data = Rng(16).bytes(300 * PAGE);
    let c = store
        .capture(&journal, 1, None, feed(&data, 1 << 20))
        .unwrap();
    let s = store.seal(c).unwrap();
    journal.commit(s.batch).unwrap();
    let mut out = Vec::new();
    store
        .restore(&journal, &s.image, &mut out, &mut |_| {})
        .unwrap();
    assert_eq!(out, data);
    for entry in walk(&dir.path().join("memory")) {
        let mode = std::fs::metadata(&entry).unwrap().permissions().mode() & 0o777;
        let want = if entry.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{}", entry.display());
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
