//! The RADOS backend against a real single-node Ceph (started by the test binary).
#![cfg(feature = "rados")]
#![allow(clippy::unwrap_used)]

#[path = "../../tests/ceph-lab/cluster.rs"]
mod ceph_lab;

use std::sync::Arc;

use store::contract::{self, Harness};
use store::{ErrorKind, ObjectStore, RadosConfig, RadosStore};

fn open(namespace: &str, read_only: bool) -> RadosStore {
    let c = ceph_lab::cluster();
    let config = RadosConfig {
        conf: Some(c.conf.clone()),
        ..RadosConfig::new(&c.pool, namespace)
    };
    RadosStore::open(&config, read_only).unwrap()
}

/// Each fresh store is a namespace of its own in the test pool.
#[derive(Default)]
struct Rados {
    last: Option<String>,
}

impl Harness for Rados {
    fn fresh(&mut self) -> Arc<dyn ObjectStore> {
        let ns = ceph_lab::unique_name("contract");
        self.last = Some(ns.clone());
        Arc::new(open(&ns, false))
    }
    fn read_only(&mut self) -> Arc<dyn ObjectStore> {
        Arc::new(open(self.last.as_ref().unwrap(), true))
    }
}

#[test]
fn rados_store_keeps_the_contract() {
    contract::run_all(&mut Rados::default());
}

#[test]
fn namespaces_of_one_pool_are_separate_stores() {
    let a = open(&ceph_lab::unique_name("a"), false);
    let b = open(&ceph_lab::unique_name("b"), false);
    assert!(a.put("packs/x", b"a's").unwrap());
    assert!(b.put("packs/x", b"b's").unwrap());
    a.flush().unwrap();
    b.flush().unwrap();
    assert_eq!(a.get("packs/x").unwrap().unwrap(), b"a's");
    assert_eq!(b.list("").unwrap().len(), 1);
    assert_eq!(a.kind(), "rados");
}

#[test]
fn large_objects_and_many_writes_in_flight() {
    let s = open(&ceph_lab::unique_name("large"), false);
    // 100 MiB: more than one write operation may carry.
    let big: Vec<u8> = (0..100u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert!(s.put("packs/big", &big).unwrap());
    for i in 0..40u32 {
        s.put(
            &format!("packs/small-{i:03}"),
            &i.to_le_bytes().repeat(1000),
        )
        .unwrap();
    }
    s.flush().unwrap();
    assert_eq!(s.get("packs/big").unwrap().unwrap(), big);
    let mut part = vec![0u8; 9 << 20];
    s.read_at("packs/big", (60 << 20) + 5, &mut part).unwrap();
    assert_eq!(part, big[(60 << 20) + 5..(69 << 20) + 5]);
    assert_eq!(s.list("packs/small-").unwrap().len(), 40);
    assert_eq!(
        s.get("packs/small-007").unwrap().unwrap(),
        7u32.to_le_bytes().repeat(1000)
    );
}

#[test]
fn a_missing_pool_or_an_unreachable_cluster_is_an_error() {
    let c = ceph_lab::cluster();
    let config = RadosConfig {
        conf: Some(c.conf.clone()),
        ..RadosConfig::new("no-such-pool", "x")
    };
    let e = RadosStore::open(&config, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    // A monitor address nobody listens on: refused after the timeout, not a hang.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ceph.conf");
    std::fs::write(
        &conf,
        "[global]\nmon host = 127.0.0.1:9\nauth client required = none\n",
    )
    .unwrap();
    let config = RadosConfig {
        conf: Some(conf),
        timeout_secs: 3,
        ..RadosConfig::new(&c.pool, "x")
    };
    let e = RadosStore::open(&config, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
}

#[test]
fn a_torn_object_is_rewritten_by_the_next_put() {
    let s = open(&ceph_lab::unique_name("torn"), false);
    let data: Vec<u8> = (0..1000u32).flat_map(|i| i.to_le_bytes()).collect();
    // What a crash between the parts of a multi-part write leaves: the first part only.
    s.replace("packs/p", &data[..1000]).unwrap();
    assert!(
        s.put("packs/p", &data).unwrap(),
        "the torn object is written again"
    );
    s.flush().unwrap();
    assert_eq!(s.get("packs/p").unwrap().unwrap(), data);
    assert!(!s.put("packs/p", &data).unwrap());
}

const CHILD: &str = "RADOS_KILL_TEST_NAMESPACE";

fn big_object() -> Vec<u8> {
    (0..100u32 << 20)
        .map(|i| (i.wrapping_mul(2246822519) >> 11) as u8)
        .collect()
}

/// Run as a child process by the test below: puts a 100 MiB object (two write operations)
/// into the namespace named by the environment, then waits to be killed.
#[test]
fn child_put() {
    if let Ok(ns) = std::env::var(CHILD) {
        let s = open(&ns, false);
        s.put("packs/big", &big_object()).unwrap();
        s.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
}

/// `kill -9` of a process in the middle of a large put: the object is missing, shorter or
/// whole, and the next put of it leaves it whole.
#[test]
fn a_put_killed_midway_is_repaired_by_the_next_put() {
    let data = big_object();
    for wait_for_object in [false, true] {
        let ns = ceph_lab::unique_name("kill");
        let c = ceph_lab::cluster();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_put", "--nocapture"])
            .env(CHILD, &ns)
            .env("DOMSNAP_TEST_CEPH", &c.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let s = open(&ns, false);
        if wait_for_object {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while s.len("packs/big").unwrap().is_none() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the child wrote nothing"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let left = s.len("packs/big").unwrap();
        assert!(left.is_none_or(|l| l <= data.len() as u64), "{left:?}");
        s.put("packs/big", &data).unwrap();
        s.flush().unwrap();
        assert!(
            s.get("packs/big").unwrap().unwrap() == data,
            "left {left:?}"
        );
    }
}
