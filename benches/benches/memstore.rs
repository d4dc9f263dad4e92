//! Memory image store: capture + seal of a 256 MiB memory-like image (fresh, unchanged
//! against its parent, 5% of pages changed), and a staged restore, beside a plain file
//! copy of the same bytes measured in the same run, so the ratio shows.
//!
//! Stores are built outside the timed part and dropped after it (criterion drops what a
//! batched routine returns after timing), so set-up and teardown are not counted.
//!
//! `cargo bench -p benches --bench memstore`
#![allow(missing_docs, clippy::unwrap_used)]

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, Criterion, SamplingMode, Throughput};
use engine::memstore::{Error, MemStore, DEFAULT_STATE};
use journal::{Journal, Mode};

const PAGE: usize = 4096;
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

/// Pages: 40% zero, 10% copies of other pages, 50% random.
fn memory_like(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = Rng(seed);
    let pages = n / PAGE;
    let mut v = vec![0u8; n];
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

/// `data` with 5% of its pages overwritten at random.
fn changed(data: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut v = data.to_vec();
    let pages = v.len() / PAGE;
    for _ in 0..pages / 20 {
        let p = rng.next() as usize % pages;
        rng.fill(&mut v[p * PAGE..(p + 1) * PAGE]);
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
    let store = MemStore::open(&dir.path().join("memory"), DEFAULT_STATE, false).unwrap();
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
    /// Captures, seals and commits `data`; returns the image and the bytes newly stored.
    fn ingest(&mut self, data: &[u8], parent: Option<&str>) -> (String, u64) {
        let op = self.op;
        self.op += 1;
        let captured = self
            .store
            .capture(&self.journal, op, parent, |w: &mut dyn Write| {
                for part in data.chunks(1 << 20) {
                    w.write_all(part).map_err(|e| Error::Io {
                        op: "feed",
                        path: "<bench>".into(),
                        source: e,
                    })?;
                }
                Ok::<(), Error>(())
            })
            .unwrap();
        let sealed = self.store.seal(captured).unwrap();
        self.journal.commit(sealed.batch).unwrap();
        (sealed.image, sealed.bytes_new)
    }

    fn restore_to(&self, image: &str, path: &Path) {
        let staged = self.store.stage_image(&self.journal, image).unwrap();
        let mut f = File::create(path).unwrap();
        staged.write_to(&mut f, &mut |_| {}).unwrap();
    }
}

fn copy_to_file(data: &[u8], path: &Path) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn benches(c: &mut Criterion) {
    let data = memory_like(1, IMAGE);
    let data2 = changed(&data, 2);
    let scratch = tempfile::tempdir_in(bench_dir()).unwrap();
    let mut g = c.benchmark_group("memstore-256MiB");
    g.throughput(Throughput::Bytes(IMAGE as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(15));

    g.bench_function("file-copy+sync (baseline)", |b| {
        b.iter(|| copy_to_file(&data, &scratch.path().join("copy")))
    });
    g.bench_function("capture+seal, fresh", |b| {
        b.iter_batched(
            store,
            |mut s| {
                s.ingest(&data, None);
                s
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("capture+seal, 5% of pages changed", |b| {
        b.iter_batched(
            || {
                let mut s = store();
                let (image, _) = s.ingest(&data, None);
                (s, image)
            },
            |(mut s, image)| {
                s.ingest(&data2, Some(&image));
                s
            },
            BatchSize::PerIteration,
        )
    });
    let mut warm = store();
    let (image, _) = warm.ingest(&data, None);
    g.bench_function("stage+restore to a file", |b| {
        b.iter(|| warm.restore_to(&image, &scratch.path().join("restored")))
    });
    g.finish();
}

fn median(mut f: impl FnMut() -> f64) -> f64 {
    let mut times: Vec<f64> = (0..5).map(|_| f()).collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[2]
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn summary() {
    let data = memory_like(1, IMAGE);
    let data2 = changed(&data, 2);
    let scratch = tempfile::tempdir_in(bench_dir()).unwrap();
    let copy = median(|| timed(|| copy_to_file(&data, &scratch.path().join("copy"))));
    let fresh = median(|| {
        let mut s = store();
        let t = timed(|| {
            s.ingest(&data, None);
        });
        drop(s);
        t
    });
    let mut new_bytes = 0;
    let delta = median(|| {
        let mut s = store();
        let (image, _) = s.ingest(&data, None);
        timed(|| new_bytes = s.ingest(&data2, Some(&image)).1)
    });
    let mut warm = store();
    let (image, _) = warm.ingest(&data, None);
    let restore = median(|| timed(|| warm.restore_to(&image, &scratch.path().join("restored"))));
    let gib = IMAGE as f64 / f64::from(1u32 << 30);
    println!(
        "\nsummary, 256 MiB memory-like image (40% zero pages, 10% duplicates), medians of 5:"
    );
    let line = |name: &str, t: f64| {
        println!(
            "  {name:<38} {t:>7.3} s  {:>6.2} GiB/s  {:>5.2}x the copy",
            gib / t,
            t / copy
        )
    };
    line("file copy + fsync", copy);
    line("capture + seal + commit, fresh", fresh);
    line("capture + seal + commit, 5% changed", delta);
    line("stage + restore to a file", restore);
    println!("  5% changed: {new_bytes} bytes newly stored");
}

criterion_group!(memstore, benches);

fn main() {
    memstore();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
