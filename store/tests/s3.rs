//! The S3 backend against a real radosgw (of the single-node Ceph the test binary starts).
#![cfg(feature = "s3")]
#![allow(clippy::unwrap_used)]

#[path = "../../tests/ceph-lab/cluster.rs"]
mod ceph_lab;

use std::sync::Arc;

use store::contract::{self, Harness};
use store::{ErrorKind, ObjectStore, S3Config, S3Store};

fn config(prefix: &str) -> S3Config {
    let c = ceph_lab::cluster();
    S3Config {
        endpoint: c.s3_endpoint.clone(),
        bucket: c.s3_bucket.clone(),
        prefix: prefix.to_string(),
        access_key: c.s3_access_key.clone(),
        secret_key: c.s3_secret_key.clone(),
        region: "us-east-1".to_string(),
        timeout_secs: 30,
    }
}

fn open(prefix: &str, read_only: bool) -> S3Store {
    S3Store::open(&config(prefix), read_only).unwrap()
}

/// Each fresh store is a key prefix of its own in the test bucket.
#[derive(Default)]
struct S3 {
    last: Option<String>,
}

impl Harness for S3 {
    fn fresh(&mut self) -> Arc<dyn ObjectStore> {
        let prefix = ceph_lab::unique_name("contract");
        self.last = Some(prefix.clone());
        Arc::new(open(&prefix, false))
    }
    fn read_only(&mut self) -> Arc<dyn ObjectStore> {
        Arc::new(open(self.last.as_ref().unwrap(), true))
    }
}

#[test]
fn s3_store_keeps_the_contract() {
    contract::run_all(&mut S3::default());
}

#[test]
fn prefixes_of_one_bucket_are_separate_stores_and_large_reads_are_split() {
    let a = open(&ceph_lab::unique_name("a"), false);
    let b = open(&ceph_lab::unique_name("b"), false);
    assert_eq!(a.kind(), "s3");
    let big: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert!(a.put("packs/x", &big).unwrap());
    assert!(b.put("packs/x", b"b's").unwrap());
    a.flush().unwrap();
    b.flush().unwrap();
    assert_eq!(a.get("packs/x").unwrap().unwrap(), big);
    let mut part = vec![0u8; 9 << 20];
    a.read_at("packs/x", (5 << 20) + 3, &mut part).unwrap();
    assert_eq!(part, big[(5 << 20) + 3..(14 << 20) + 3]);
    assert_eq!(b.get("packs/x").unwrap().unwrap(), b"b's");
    assert_eq!(b.list("").unwrap().len(), 1);
    assert_eq!(b.list("pa").unwrap().len(), 1);
    assert_eq!(b.list("packs/y").unwrap().len(), 0);
}

#[test]
fn a_missing_bucket_wrong_keys_or_no_endpoint_is_an_error() {
    let e = S3Store::open(
        &S3Config {
            bucket: "no-such-bucket".into(),
            ..config("x")
        },
        false,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("no-such-bucket"), "{e}");
    let e = S3Store::open(
        &S3Config {
            secret_key: "wrong".into(),
            ..config("x")
        },
        false,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let e = S3Store::open(
        &S3Config {
            endpoint: "http://127.0.0.1:9".into(),
            timeout_secs: 3,
            ..config("x")
        },
        false,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
}
