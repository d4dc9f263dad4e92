//! Bundles exported to and imported from a real Ceph: a RADOS pool and radosgw's S3, as
//! two hosts would share them (the test binary starts a single-node cluster).
#![allow(clippy::unwrap_used)]

#[path = "../../tests/ceph-lab/cluster.rs"]
mod ceph_lab;

use bundle::SnapshotInfo;
use store::{ObjectStore, RadosConfig, RadosStore, S3Config, S3Store};

fn info(name: &str) -> SnapshotInfo {
    SnapshotInfo {
        name: name.into(),
        description: String::new(),
        created: 1,
        kind: "checkpoint".into(),
        crash_consistent: false,
        run_state: "paused".into(),
        memory_size: 64 << 20,
    }
}

fn rados(ns: &str) -> RadosStore {
    let c = ceph_lab::cluster();
    let config = RadosConfig {
        conf: Some(c.conf.clone()),
        ..RadosConfig::new(&c.pool, ns)
    };
    RadosStore::open(&config, false).unwrap()
}

fn s3(prefix: &str) -> S3Store {
    let c = ceph_lab::cluster();
    S3Store::open(
        &S3Config {
            endpoint: c.s3_endpoint.clone(),
            bucket: c.s3_bucket.clone(),
            prefix: prefix.into(),
            access_key: c.s3_access_key.clone(),
            secret_key: c.s3_secret_key.clone(),
            region: "us-east-1".into(),
            timeout_secs: 30,
        },
        false,
    )
    .unwrap()
}

/// 64 MiB of memory: a quarter zero, the rest distinct pages.
fn memory(seed: u64) -> Vec<u8> {
    let mut m = vec![0u8; 64 << 20];
    for (i, page) in m.chunks_mut(4096).enumerate() {
        if i % 4 != 0 {
            for (k, w) in page.chunks_mut(8).enumerate() {
                w.copy_from_slice(&((i * 512 + k) as u64 ^ seed).to_le_bytes());
            }
        }
    }
    m
}

/// Host A exports through one handle, host B (a handle of its own) imports: the memory
/// comes back byte for byte; a second export sends only what changed.
fn round_trip(a: &dyn ObjectStore, b: &dyn ObjectStore) {
    let mem = memory(0);
    let mut r: &[u8] = &mem;
    let first = bundle::export(a, "web", info("s1"), Some(&mut r), &[], "host-a").unwrap();
    assert_eq!(first.bytes_sent, 48 << 20, "{first:?}");
    let mut got = Vec::new();
    let mut opened = bundle::open(b, "web", "s1").unwrap();
    opened.verify().unwrap();
    opened.read_memory(&mut got).unwrap();
    assert!(got == mem, "the imported memory differs");

    let mut mem2 = mem.clone();
    mem2[5 * 4096..6 * 4096].fill(7);
    let mut r: &[u8] = &mem2;
    let second = bundle::export(a, "web", info("s2"), Some(&mut r), &[], "host-a").unwrap();
    assert_eq!(second.bytes_sent, 4096, "{second:?}");
    let mut got = Vec::new();
    bundle::open(b, "web", "s2")
        .unwrap()
        .read_memory(&mut got)
        .unwrap();
    assert!(got == mem2, "the second import differs");
    assert_eq!(bundle::list(b).unwrap().len(), 2);
}

#[test]
fn bundles_through_rados() {
    let ns = ceph_lab::unique_name("bundle");
    round_trip(&rados(&ns), &rados(&ns));
}

#[test]
fn bundles_through_s3() {
    let prefix = ceph_lab::unique_name("bundle");
    round_trip(&s3(&prefix), &s3(&prefix));
}
