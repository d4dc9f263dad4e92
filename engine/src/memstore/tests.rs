#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};

use journal::{Journal, Mode, Table};

use super::format::{self, ChunkEntry, ImageHead, PackEntry, Piece};
use super::*;

/// Failpoints are process-wide: a test that arms one runs alone.
static EXCLUSIVE: std::sync::RwLock<()> = std::sync::RwLock::new(());

enum Guard {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    Exclusive(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

struct Fixture {
    _guard: Guard,
    _dir: tempfile::TempDir,
    journal: Journal,
    store: MemStore,
    next_op: u64,
}

fn fixture() -> Fixture {
    let guard = Guard::Shared(EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner()));
    fixture_with(guard)
}

fn fixture_with(guard: Guard) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    let store = MemStore::open(&dir.path().join("memory")).unwrap();
    Fixture {
        _guard: guard,
        _dir: dir,
        journal,
        store,
        next_op: 1,
    }
}

/// xorshift64*: fast, deterministic test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut it = buf.chunks_exact_mut(8);
        for c in it.by_ref() {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        for b in it.into_remainder() {
            *b = self.next() as u8;
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
}

impl Fixture {
    /// Ingests `data` in odd-sized writes, commits the batch.
    fn ingest(&mut self, data: &[u8]) -> (String, u64) {
        let op = self.next_op;
        self.next_op += 1;
        let mut w = self.store.writer(&self.journal, op).unwrap();
        let sizes = [1usize, 4093, 100_003, 1 << 20, 7];
        let mut rest = data;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            w.write_all(&rest[..n]).unwrap();
            rest = &rest[n..];
            i += 1;
        }
        let done = w.finish().unwrap();
        assert_eq!(done.bytes, data.len() as u64);
        assert_eq!(done.image, blake3::hash(data).to_hex().to_string());
        self.journal.commit(done.batch).unwrap();
        (done.image, done.bytes_new)
    }

    fn restore(&self, image: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut last = 0;
        let n = self
            .store
            .restore(&self.journal, image, &mut out, &mut |p| {
                assert!(p >= last);
                last = p;
            })
            .unwrap();
        assert_eq!(n, out.len() as u64);
        assert_eq!(last, n);
        out
    }

    fn commit(&mut self, batch: journal::Batch) {
        self.journal.commit(batch).unwrap();
    }

    fn check(&self, held: &[(&str, u64)]) -> Vec<String> {
        let referenced: BTreeMap<String, u64> =
            held.iter().map(|(i, n)| (i.to_string(), *n)).collect();
        self.store.check(&self.journal, &referenced).unwrap()
    }

    fn pieces(&self, image: &str) -> Vec<Piece> {
        let id = format::parse_id(image).unwrap();
        let head: ImageHead = self
            .journal
            .get(Table::Images, &format::head_key(&id))
            .unwrap()
            .unwrap();
        (0..head.segments)
            .flat_map(|s| load_segment(&self.journal, image, &id, s).unwrap())
            .collect()
    }

    fn chunk(&self, id: &format::ChunkId) -> ChunkEntry {
        self.journal
            .get(Table::Chunks, &format::chunk_key(id))
            .unwrap()
            .unwrap()
    }

    fn pack_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.store.dir().join("packs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// Random data with zero runs, like a memory image.
fn memory_like(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = rng.bytes(n);
    let mut at = 0;
    while at < n {
        let run = (rng.next() % (600 << 10)) as usize;
        let zero = matches!(rng.next() % 3, 0);
        let end = (at + run).min(n);
        if zero {
            v[at..end].fill(0);
        }
        at = end;
    }
    v
}

#[test]
fn round_trip_of_many_sizes() {
    let mut f = fixture();
    let mut rng = Rng(7);
    for size in [
        0usize,
        1,
        4095,
        16 << 10,
        (64 << 10) + 13,
        (1 << 20) + 333,
        (5 << 20) + 1,
    ] {
        let data = memory_like(&mut rng, size);
        let (image, _) = f.ingest(&data);
        assert_eq!(f.restore(&image), data, "size {size}");
        assert_eq!(f.store.verify(&f.journal, &image).unwrap(), size as u64);
        let total: u64 = f.pieces(&image).iter().map(Piece::bytes).sum();
        assert_eq!(total, size as u64);
    }
    assert!(
        f.check(&[]).len() == 7,
        "every image is held once, none expected"
    );
}

#[test]
fn empty_image() {
    let mut f = fixture();
    let (image, new) = f.ingest(&[]);
    assert_eq!(new, 0);
    assert_eq!(image, blake3::hash(&[]).to_hex().to_string());
    assert!(f.restore(&image).is_empty());
    assert!(f.pack_files().is_empty());
    assert_eq!(f.check(&[(&image, 1)]), Vec::<String>::new());
}

#[test]
fn zero_image_stores_nothing() {
    let mut f = fixture();
    let data = vec![0u8; 8 << 20];
    let (image, new) = f.ingest(&data);
    assert_eq!(new, 0);
    assert!(f.pack_files().is_empty());
    assert_eq!(f.restore(&image), data);
    assert_eq!(f.pieces(&image), vec![Piece::Zero { len: 8 << 20 }]);
    assert_eq!(f.store.stats(&f.journal).unwrap().chunks, 0);
}

#[test]
fn second_ingest_of_same_or_slightly_changed_image_stores_little() {
    let mut f = fixture();
    let mut rng = Rng(11);
    let data = memory_like(&mut rng, 64 << 20);
    let (first, new1) = f.ingest(&data);
    assert!(
        new1 > 32 << 20,
        "first ingest stores the non-zero part: {new1}"
    );

    let (again, new2) = f.ingest(&data);
    assert_eq!(again, first);
    assert_eq!(new2, 0);
    assert_eq!(
        f.store.image(&f.journal, &first).unwrap(),
        Some((64 << 20, 2))
    );

    // 16 scattered pages change and 100 bytes are inserted near the start (the stream
    // shifts, as when an `xl save` header grows).
    let mut changed = data.clone();
    for i in 0..16 {
        let page = (rng.next() % (16 << 10)) as usize * 4096;
        rng.fill(&mut changed[page..page + 4096]);
        let _ = i;
    }
    changed.splice(1000..1000, rng.bytes(100));
    let (third, new3) = f.ingest(&changed);
    assert_ne!(third, first);
    assert!(new3 < 5 << 20, "17 changes stored {new3} bytes");
    assert_eq!(f.restore(&third), changed);
    assert_eq!(f.check(&[(&first, 2), (&third, 1)]), Vec::<String>::new());
}

#[test]
fn chunks_do_not_depend_on_how_the_stream_is_written() {
    let mut f = fixture();
    let data = memory_like(&mut Rng(21), (6 << 20) + 5);
    let (image, _) = f.ingest(&data);
    let mut w = f.store.writer(&f.journal, 100).unwrap();
    w.write_all(&data).unwrap();
    let once = w.finish().unwrap();
    assert_eq!(once.image, image);
    assert_eq!(once.bytes_new, 0);
    let mut w = f.store.writer(&f.journal, 101).unwrap();
    for b in data.chunks(65_537) {
        w.write_all(b).unwrap();
    }
    assert_eq!(w.finish().unwrap().bytes_new, 0);
    assert!(f.pack_files() == vec!["op-1.pack"]);
}

#[test]
fn repeats_within_one_image_are_stored_once() {
    let mut f = fixture();
    let block = Rng(3).bytes(1 << 20);
    let data: Vec<u8> = block.iter().copied().cycle().take(8 << 20).collect();
    let (image, new) = f.ingest(&data);
    assert!(new < 2 << 20, "stored {new}");
    assert_eq!(f.restore(&image), data);
    assert_eq!(f.check(&[(&image, 1)]), Vec::<String>::new());
}

#[test]
fn reference_counts_follow_add_ref_and_release() {
    let mut f = fixture();
    let block = Rng(5).bytes(1 << 20);
    let mut data = block.clone();
    data.extend_from_slice(&block);
    let (image, _) = f.ingest(&data);
    let pieces = f.pieces(&image);
    let Piece::Data { id: first, .. } = pieces[0] else {
        panic!("no data piece")
    };
    let occurrences = pieces
        .iter()
        .filter(|p| matches!(p, Piece::Data { id, .. } if *id == first))
        .count() as u64;
    assert_eq!(f.chunk(&first).refs, occurrences);
    assert!(occurrences >= 1);

    let b = f.store.add_ref(&f.journal, &image).unwrap();
    f.commit(b);
    assert_eq!(
        f.store.image(&f.journal, &image).unwrap(),
        Some((2 << 20, 2))
    );
    assert_eq!(f.check(&[(&image, 2)]), Vec::<String>::new());
    assert_eq!(
        f.chunk(&first).refs,
        occurrences,
        "holders do not change chunk counts"
    );

    let b = f.store.release(&f.journal, &image).unwrap();
    f.commit(b);
    assert_eq!(f.check(&[(&image, 1)]), Vec::<String>::new());
    let b = f.store.release(&f.journal, &image).unwrap();
    f.commit(b);
    assert_eq!(f.store.image(&f.journal, &image).unwrap(), None);
    assert_eq!(f.chunk(&first).refs, 0, "chunks stay until gc");
    assert_eq!(f.check(&[]), Vec::<String>::new());
    assert!(matches!(
        f.store.release(&f.journal, &image),
        Err(Error::NoSuchImage(_))
    ));
    assert!(matches!(
        f.store.add_ref(&f.journal, &image),
        Err(Error::NoSuchImage(_))
    ));
    assert!(matches!(
        f.store.verify(&f.journal, "not-hex"),
        Err(Error::NoSuchImage(_))
    ));
}

#[test]
fn gc_frees_exactly_the_unreferenced() {
    let mut f = fixture();
    let mut rng = Rng(9);
    let r1 = rng.bytes(8 << 20);
    let r2 = rng.bytes(1 << 20);
    let r3 = rng.bytes(2 << 20);
    let a: Vec<u8> = [r1.as_slice(), &r2].concat();
    let b: Vec<u8> = [r2.as_slice(), &r3].concat();
    let (ia, _) = f.ingest(&a);
    let (ib, _) = f.ingest(&b);
    assert_eq!(f.pack_files(), vec!["op-1.pack", "op-2.pack"]);

    // Nothing to collect yet.
    let report = f.store.gc(&mut f.journal).unwrap();
    assert_eq!(report, GcReport::default());

    let batch = f.store.release(&f.journal, &ia).unwrap();
    f.commit(batch);
    let before = f.store.stats(&f.journal).unwrap();
    assert!(before.dead_chunks > 0);
    let report = f.store.gc(&mut f.journal).unwrap();
    let after = f.store.stats(&f.journal).unwrap();
    assert_eq!(report.chunks_removed, before.dead_chunks);
    assert_eq!(after.dead_chunks, 0);
    assert_eq!(after.chunks, before.chunks - before.dead_chunks);
    assert_eq!(report.packs_rewritten, 1, "op-1 is mostly dead: {report:?}");
    assert_eq!(report.packs_removed, 1);
    assert_eq!(report.bytes_freed, before.pack_bytes - after.pack_bytes);
    assert!(report.bytes_freed > 7 << 20);
    assert_eq!(f.pack_files(), vec!["gc-0.pack", "op-2.pack"]);
    assert_eq!(f.restore(&ib), b);
    assert_eq!(f.check(&[(&ib, 1)]), Vec::<String>::new());
    assert!(matches!(
        f.store.verify(&f.journal, &ia),
        Err(Error::NoSuchImage(_))
    ));

    // A second gc finds nothing; releasing the last image empties the store.
    assert_eq!(f.store.gc(&mut f.journal).unwrap(), GcReport::default());
    let batch = f.store.release(&f.journal, &ib).unwrap();
    f.commit(batch);
    let report = f.store.gc(&mut f.journal).unwrap();
    assert_eq!(report.packs_removed, 2);
    assert!(f.pack_files().is_empty());
    assert_eq!(f.store.stats(&f.journal).unwrap(), Stats::default());
    assert_eq!(f.check(&[]), Vec::<String>::new());
}

#[test]
fn gc_removes_unnamed_packs_but_not_those_of_open_operations() {
    let mut f = fixture();
    let mut w = f.store.writer(&f.journal, 77).unwrap();
    w.write_all(&Rng(1).bytes(1 << 20)).unwrap();
    drop(w);
    assert_eq!(f.pack_files(), vec!["op-77.pack"]);
    assert_eq!(f.check(&[]).len(), 1, "an unnamed pack is reported");
    let report = f.store.gc(&mut f.journal).unwrap();
    assert_eq!(report.packs_removed, 1);
    assert!(f.pack_files().is_empty());
}

#[test]
fn abandon_deletes_an_uncommitted_pack_only() {
    let mut f = fixture();
    let data = Rng(2).bytes(1 << 20);
    let mut w = f.store.writer(&f.journal, 5).unwrap();
    w.write_all(&data).unwrap();
    drop(w);
    assert_eq!(f.pack_files(), vec!["op-5.pack"]);
    f.store.abandon(&f.journal, 5).unwrap();
    assert!(f.pack_files().is_empty());
    f.store.abandon(&f.journal, 5).unwrap();

    f.next_op = 6;
    let (image, _) = f.ingest(&data);
    f.store.abandon(&f.journal, 6).unwrap();
    assert_eq!(f.pack_files(), vec!["op-6.pack"]);
    assert_eq!(f.restore(&image), data);
    assert!(
        f.store.writer(&f.journal, 6).is_err(),
        "an op's pack is written once"
    );
}

#[test]
fn a_corrupt_byte_is_caught_before_it_is_restored() {
    let mut f = fixture();
    let data = Rng(4).bytes(2 << 20);
    let (image, _) = f.ingest(&data);
    let pieces = f.pieces(&image);
    let before: u64 = pieces[..2].iter().map(Piece::bytes).sum();
    let Piece::Data { id, .. } = pieces[2] else {
        panic!("random data has no zero piece")
    };
    let entry = f.chunk(&id);
    let path = f
        .store
        .dir()
        .join("packs")
        .join(format::pack_file_name(entry.pack));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, entry.offset + 5).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], entry.offset + 5)
        .unwrap();

    let hex = format::hex(&id);
    match f.store.verify(&f.journal, &image) {
        Err(Error::Corruption {
            chunk,
            offset,
            pack,
            ..
        }) => {
            assert_eq!(chunk, hex);
            assert_eq!(offset, entry.offset);
            assert_eq!(pack, path);
        }
        other => panic!("verify: {other:?}"),
    }
    let mut out = Vec::new();
    let r = f.store.restore(&f.journal, &image, &mut out, &mut |_| {});
    assert!(
        matches!(&r, Err(Error::Corruption { chunk, .. }) if *chunk == hex),
        "{r:?}"
    );
    assert!(r.as_ref().err().is_some_and(Error::is_corruption));
    assert_eq!(
        out.len() as u64,
        before,
        "nothing past the bad chunk is written"
    );
    assert_eq!(out[..], data[..before as usize]);
}

#[test]
fn a_short_pack_is_corruption() {
    let mut f = fixture();
    let data = Rng(6).bytes(1 << 20);
    let (image, _) = f.ingest(&data);
    let path = f.store.dir().join("packs/op-1.pack");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    assert!(f
        .store
        .verify(&f.journal, &image)
        .unwrap_err()
        .is_corruption());
    let problems = f.check(&[(&image, 1)]);
    assert!(
        problems.iter().any(|p| p.contains("bytes long")),
        "{problems:?}"
    );
}

#[test]
fn guest_memory_files_are_private() {
    let mut f = fixture();
    f.ingest(&Rng(8).bytes(100_000));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(f.store.dir()), 0o700);
    assert_eq!(mode(&f.store.dir().join("packs")), 0o700);
    assert_eq!(mode(&f.store.dir().join("packs/op-1.pack")), 0o600);
}

/// Produces `len` bytes without holding them: zero runs and random runs.
struct Generator {
    rng: Rng,
    left: u64,
    at: u64,
}

impl Read for Generator {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left).min(1 << 20) as usize;
        // Alternate 32 MiB of zeros and 32 MiB of random data.
        if matches!((self.at >> 25) % 2, 0) {
            buf[..n].fill(0);
        } else {
            self.rng.fill(&mut buf[..n]);
        }
        self.left -= n as u64;
        self.at += n as u64;
        Ok(n)
    }
}

struct HashSink(blake3::Hasher, u64);

impl Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_1_gib_stream_is_ingested_and_restored_without_buffering() {
    let mut f = fixture();
    let len = 1u64 << 30;
    let mut source = Generator {
        rng: Rng(12),
        left: len,
        at: 0,
    };
    let mut w = f.store.writer(&f.journal, 1).unwrap();
    assert_eq!(std::io::copy(&mut source, &mut w).unwrap(), len);
    let done = w.finish().unwrap();
    assert_eq!(done.bytes, len);
    // Half the stream is zeros; only chunks straddling a zero/random edge add to the rest.
    assert!(
        done.bytes_new >= len / 2 && done.bytes_new < len / 2 + (16 << 20),
        "{}",
        done.bytes_new
    );
    f.commit(done.batch);
    let mut sink = HashSink(blake3::Hasher::new(), 0);
    f.store
        .restore(&f.journal, &done.image, &mut sink, &mut |_| {})
        .unwrap();
    assert_eq!(sink.1, len);
    assert_eq!(sink.0.finalize().to_hex().to_string(), done.image);
}

#[test]
fn index_records_round_trip() {
    let id = *blake3::hash(b"x").as_bytes();
    let entry = ChunkEntry {
        pack: format::GC_PACK | 3,
        offset: 52,
        len: 65536,
        refs: 2,
    };
    let head = ImageHead {
        bytes: 1 << 40,
        refs: 1,
        segments: 2,
        pieces: 70_000,
    };
    let pieces = vec![Piece::Data { id, len: 9 }, Piece::Zero { len: 1 << 33 }];
    let pack = PackEntry {
        bytes: 100,
        chunks: 2,
    };
    fn rt<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
        let bytes = journal::record::encode(v).unwrap();
        assert_eq!(
            &journal::record::decode::<T>(&bytes, || "t".into()).unwrap(),
            v
        );
    }
    rt(&entry);
    rt(&head);
    rt(&pieces);
    rt(&pack);
    for p in [7u64, format::GC_PACK, format::GC_PACK | 12] {
        assert_eq!(format::parse_pack_name(&format::pack_file_name(p)), Some(p));
    }
    assert_eq!(format::parse_pack_name("op-x.pack"), None);
    assert_eq!(format::pack_file_name(7), "op-7.pack");
}

#[test]
fn zero_detection() {
    assert!(format::is_zero(&[]));
    assert!(format::is_zero(&[0; 1000]));
    for i in [0, 63, 64, 999] {
        let mut v = vec![0u8; 1000];
        v[i] = 1;
        assert!(!format::is_zero(&v), "{i}");
    }
}

#[cfg(feature = "failpoints")]
mod failpoints {
    use super::*;

    fn fixture() -> Fixture {
        fixture_with(Guard::Exclusive(
            EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    #[test]
    fn crash_after_pack_sync_leaves_a_pack_that_abandon_removes() {
        let f = fixture();
        let scenario = fail::FailScenario::setup();
        fail::cfg("engine::memstore::after-pack-sync", "return").unwrap();
        let mut w = f.store.writer(&f.journal, 1).unwrap();
        w.write_all(&Rng(1).bytes(1 << 20)).unwrap();
        assert!(w.finish().is_err());
        scenario.teardown();
        assert_eq!(f.pack_files(), vec!["op-1.pack"]);
        f.store.abandon(&f.journal, 1).unwrap();
        assert!(f.pack_files().is_empty());
        assert_eq!(f.check(&[]), Vec::<String>::new());
    }

    #[test]
    fn crash_after_gc_commit_converges_on_the_next_gc() {
        let mut f = fixture();
        let mut rng = Rng(2);
        let keep = rng.bytes(256 << 10);
        let a = [rng.bytes(4 << 20), keep.clone()].concat();
        let (ia, _) = f.ingest(&a);
        let (ib, _) = f.ingest(&keep);
        let batch = f.store.release(&f.journal, &ia).unwrap();
        f.commit(batch);
        let scenario = fail::FailScenario::setup();
        fail::cfg("engine::memstore::gc::after-commit", "return").unwrap();
        assert!(f.store.gc(&mut f.journal).is_err());
        scenario.teardown();
        // Reopen, as after a crash.
        let Fixture {
            _guard,
            _dir,
            journal,
            store,
            ..
        } = f;
        drop(journal);
        drop(store);
        let mut f = Fixture {
            _guard,
            journal: Journal::open(&_dir.path().join("journal"), Mode::Primary).unwrap(),
            store: MemStore::open(&_dir.path().join("memory")).unwrap(),
            _dir,
            next_op: 3,
        };
        assert_eq!(f.restore(&ib), keep);
        f.store.gc(&mut f.journal).unwrap();
        assert_eq!(f.check(&[(&ib, 1)]), Vec::<String>::new());
        assert_eq!(f.restore(&ib), keep);
    }
}
