//! Memory image store: ingest (fresh and all-dedup) and restore of a 256 MiB image, beside a
//! plain file copy of the same bytes measured in the same run, so the ratio shows.
//!
//! After the criterion groups it prints a summary (medians of a few runs, and the ratios)
//! and a chunking measurement: bytes newly stored by a second save with a few changed
//! pages, for FastCDC (the store) and for page-aligned fixed 64 KiB chunks, on a raw memory
//! file and on an `xl save`-like stream whose header grew by 3 bytes.
//!
//! `cargo bench -p benches --bench memstore`
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::HashSet;
use std::fs::File;
use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, Criterion, SamplingMode, Throughput};
use engine::memstore::MemStore;
use journal::{Journal, Mode};

const IMAGE: usize = 256 << 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Random bytes with a quarter in zero runs, like a guest's memory.
fn memory_like(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut v = vec![0u8; n];
    rng.fill(&mut v);
    let mut at = 0;
    while at < n {
        let run = (rng.next() % (1 << 20)) as usize;
        let end = (at + run).min(n);
        if matches!(rng.next() % 4, 0) {
            v[at..end].fill(0);
        }
        at = end;
    }
    v
}

struct Store {
    _dir: tempfile::TempDir,
    journal: Journal,
    store: MemStore,
    op: u64,
}

fn store() -> Store {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let journal = Journal::open(&dir.path().join("journal"), Mode::Primary).unwrap();
    let store = MemStore::open(&dir.path().join("memory")).unwrap();
    Store {
        _dir: dir,
        journal,
        store,
        op: 1,
    }
}

/// Benchmarks write to the target directory's disk, not to a tmpfs /tmp.
fn bench_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("memstore-bench");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Store {
    /// Ingests `data`; commits when `commit`. Returns bytes newly stored.
    fn ingest(&mut self, data: &[u8], commit: bool) -> (String, u64) {
        let mut w = self.store.writer(&self.journal, self.op).unwrap();
        self.op += 1;
        std::io::copy(&mut Cursor::new(data), &mut w).unwrap();
        let done = w.finish().unwrap();
        if commit {
            self.journal.commit(done.batch).unwrap();
        } else {
            self.store.abandon(&self.journal, self.op - 1).unwrap();
        }
        (done.image, done.bytes_new)
    }
}

fn copy_to_file(data: &[u8], path: &Path) {
    let mut f = File::create(path).unwrap();
    std::io::copy(&mut Cursor::new(data), &mut f).unwrap();
    f.sync_all().unwrap();
}

fn copy_file(from: &Path, to: &Path) {
    let mut src = File::open(from).unwrap();
    let mut dst = File::create(to).unwrap();
    std::io::copy(&mut src, &mut dst).unwrap();
}

fn benches(c: &mut Criterion) {
    let data = memory_like(1, IMAGE);
    let scratch = tempfile::tempdir_in(bench_dir()).unwrap();
    let mut g = c.benchmark_group("memstore-256MiB");
    g.throughput(Throughput::Bytes(IMAGE as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(15));

    g.bench_function("file-copy+sync (baseline for ingest)", |b| {
        b.iter(|| copy_to_file(&data, &scratch.path().join("copy")))
    });
    g.bench_function("ingest-fresh", |b| {
        b.iter_batched(
            store,
            |mut s| s.ingest(&data, true),
            BatchSize::PerIteration,
        )
    });
    let mut warm = store();
    let (image, _) = warm.ingest(&data, true);
    g.bench_function("ingest-all-dedup", |b| b.iter(|| warm.ingest(&data, false)));

    let source = scratch.path().join("source");
    copy_to_file(&data, &source);
    g.bench_function("file-to-file copy (baseline for restore)", |b| {
        b.iter(|| copy_file(&source, &scratch.path().join("copy2")))
    });
    g.bench_function("restore-to-file", |b| {
        b.iter(|| {
            let mut f = File::create(scratch.path().join("restored")).unwrap();
            warm.store
                .restore(&warm.journal, &image, &mut f, &mut |_| {})
                .unwrap()
        })
    });
    g.finish();
}

fn median(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[2]
}

fn summary() {
    let data = memory_like(1, IMAGE);
    let scratch = tempfile::tempdir_in(bench_dir()).unwrap();
    let gib = IMAGE as f64 / f64::from(1u32 << 30);
    let copy = median(|| copy_to_file(&data, &scratch.path().join("copy")));
    let fresh = median(|| {
        let mut s = store();
        s.ingest(&data, true);
    });
    let mut warm = store();
    let (image, _) = warm.ingest(&data, true);
    let dedup = median(|| {
        warm.ingest(&data, false);
    });
    let source = scratch.path().join("source");
    copy_to_file(&data, &source);
    let fcopy = median(|| copy_file(&source, &scratch.path().join("copy2")));
    let restore = median(|| {
        let mut f = File::create(scratch.path().join("restored")).unwrap();
        warm.store
            .restore(&warm.journal, &image, &mut f, &mut |_| {})
            .unwrap();
    });
    println!("\nsummary, 256 MiB memory-like image (25% zero runs), medians of 5:");
    let line = |name: &str, t: f64, base: f64| {
        println!(
            "  {name:<34} {:>7.3} s  {:>6.2} GiB/s  {:>5.2}x the copy's time",
            t,
            gib / t,
            t / base
        )
    };
    line("file copy + sync", copy, copy);
    line("ingest, fresh (incl. commit)", fresh, copy);
    line("ingest, all dedup", dedup, copy);
    line("file-to-file copy (page cache)", fcopy, fcopy);
    line("restore to a file (verified)", restore, fcopy);
    chunking();
}

/// Bytes newly stored by fixed, page-aligned 64 KiB chunks for `new` after `old`.
fn fixed_new_bytes(old: &[u8], new: &[u8]) -> u64 {
    let known: HashSet<[u8; 32]> = old
        .chunks(64 << 10)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    new.chunks(64 << 10)
        .filter(|c| c.iter().any(|&b| b != 0))
        .filter(|c| !known.contains(blake3::hash(c).as_bytes()))
        .map(|c| c.len() as u64)
        .sum()
}

/// An `xl save`-like stream: a header of `header` bytes (the domain config), then batches
/// of 1024 pages, each behind a record header and its 8-byte-per-page frame list.
fn xl_stream(memory: &[u8], header: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(memory.len() + memory.len() / 400 + header);
    out.extend(std::iter::repeat_n(b'x', header));
    for (batch, pages) in memory.chunks(1024 * 4096).enumerate() {
        out.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&((pages.len() / 4096) as u64).to_le_bytes());
        for p in 0..pages.len() / 4096 {
            out.extend_from_slice(&((batch * 1024 + p) as u64).to_le_bytes());
        }
        out.extend_from_slice(pages);
    }
    out
}

fn chunking() {
    let size = 64 << 20;
    let old = memory_like(2, size);
    let mut new = old.clone();
    let mut rng = Rng(3);
    for _ in 0..16 {
        let page = (rng.next() % (size as u64 / 4096)) as usize * 4096;
        rng.fill(&mut new[page..page + 4096]);
    }
    let cdc = |a: &[u8], b: &[u8]| {
        let mut s = store();
        s.ingest(a, true);
        s.ingest(b, true).1
    };
    println!("\nchunking: bytes newly stored by a second save of 64 MiB with 16 changed pages:");
    let mib = |n: u64| n as f64 / f64::from(1u32 << 20);
    println!(
        "  raw memory file:                    FastCDC {:>7.2} MiB   fixed 64 KiB {:>7.2} MiB",
        mib(cdc(&old, &new)),
        mib(fixed_new_bytes(&old, &new))
    );
    let (a, b) = (xl_stream(&old, 1000), xl_stream(&new, 1000));
    println!(
        "  xl stream, same header length:      FastCDC {:>7.2} MiB   fixed 64 KiB {:>7.2} MiB",
        mib(cdc(&a, &b)),
        mib(fixed_new_bytes(&a, &b))
    );
    let b = xl_stream(&new, 1003);
    println!(
        "  xl stream, header 3 bytes longer:   FastCDC {:>7.2} MiB   fixed 64 KiB {:>7.2} MiB",
        mib(cdc(&a, &b)),
        mib(fixed_new_bytes(&a, &b))
    );
}

criterion_group!(memstore, benches);

fn main() {
    memstore();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
