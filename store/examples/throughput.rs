//! Write and read throughput of an object store backend, for comparison with `rados bench`
//! (`benches/store-vs-rados-bench.sh` runs both against the same cluster).
//!
//! ```text
//! throughput rados POOL NAMESPACE OBJECT_SIZE COUNT READERS
//! throughput s3 ENDPOINT BUCKET PREFIX OBJECT_SIZE COUNT READERS   (keys: DOMSNAP_S3_ACCESS_KEY/SECRET_KEY)
//! throughput local DIR OBJECT_SIZE COUNT READERS
//! ```
//!
//! Writes COUNT objects of OBJECT_SIZE random-looking bytes with `put` from one thread (the
//! backend keeps its writes in flight) and one `flush`, then reads them back with READERS
//! threads, each object checked; prints `write MB/s` and `read MB/s` (MB = 10^6 bytes, as
//! `rados bench` prints), then deletes the objects.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use store::ObjectStore;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: throughput rados POOL NS | s3 ENDPOINT BUCKET PREFIX | local DIR, \
                 then OBJECT_SIZE COUNT READERS";
    let (store, rest): (Arc<dyn ObjectStore>, &[String]) = match args.first().map(String::as_str) {
        #[cfg(feature = "rados")]
        Some("rados") if args.len() == 6 => {
            let config = store::RadosConfig::new(&args[1], &args[2]);
            (
                Arc::new(store::RadosStore::open(&config, false).unwrap()),
                &args[3..],
            )
        }
        #[cfg(feature = "s3")]
        Some("s3") if args.len() == 7 => {
            let var = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set"));
            let config = store::S3Config {
                endpoint: args[1].clone(),
                bucket: args[2].clone(),
                prefix: args[3].clone(),
                access_key: var("DOMSNAP_S3_ACCESS_KEY"),
                secret_key: var("DOMSNAP_S3_SECRET_KEY"),
                region: "us-east-1".into(),
                timeout_secs: 60,
            };
            (
                Arc::new(store::S3Store::open(&config, false).unwrap()),
                &args[4..],
            )
        }
        Some("local") if args.len() == 5 => (
            Arc::new(store::LocalStore::open(std::path::Path::new(&args[1]), false).unwrap()),
            &args[2..],
        ),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let size: usize = parse_size(&rest[0]);
    let count: usize = rest[1].parse().expect("COUNT");
    let readers: usize = rest[2].parse().expect("READERS");
    let object = |i: usize| -> Vec<u8> {
        let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (0..size / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect()
    };
    let objects: Vec<Vec<u8>> = (0..count).map(object).collect();
    let name = |i: usize| format!("bench/{i:06}");

    let t = Instant::now();
    for (i, o) in objects.iter().enumerate() {
        store.put(&name(i), o).unwrap();
    }
    store.flush().unwrap();
    let write = t.elapsed().as_secs_f64();

    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..readers {
            let (store, next, objects) = (Arc::clone(&store), Arc::clone(&next), &objects);
            scope.spawn(move || {
                let mut buf = vec![0u8; size];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    store.read_at(&name(i), 0, &mut buf).unwrap();
                    assert!(buf == objects[i], "object {i} read back wrong");
                }
            });
        }
    });
    let read = t.elapsed().as_secs_f64();
    let mb = (size * count) as f64 / 1e6;
    println!(
        "{} object {} B x {count}: write {:.1} MB/s ({write:.2} s), read {:.1} MB/s with {readers} readers ({read:.2} s)",
        store.kind(),
        size,
        mb / write,
        mb / read
    );
    for i in 0..count {
        store.delete(&name(i)).unwrap();
    }
}

fn parse_size(s: &str) -> usize {
    let (n, mult) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<usize>().expect("OBJECT_SIZE") * mult
}
