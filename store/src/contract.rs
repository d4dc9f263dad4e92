//! The contract every [`ObjectStore`] keeps, as one test suite run against every
//! implementation (feature `testing`).
//!
//! A backend's tests implement [`Harness`] and call [`run_all`] (or run the [`CHECKS`] one
//! by one, to see each as its own test). A check panics with the check's name and what it
//! found.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::{ErrorKind, ObjectStore};

/// What the suite needs from a backend.
pub trait Harness {
    /// A new, empty, writable store.
    fn fresh(&mut self) -> Arc<dyn ObjectStore>;
    /// A read-only handle on the objects of the store the last [`Harness::fresh`] returned
    /// (for local: the same directory opened read-only).
    fn read_only(&mut self) -> Arc<dyn ObjectStore>;
}

/// A check of the contract.
pub type Check = fn(&mut dyn Harness);

/// Every check, by name.
pub const CHECKS: &[(&str, Check)] = &[
    ("put_then_read", put_then_read),
    ("put_is_create_if_absent", put_is_create_if_absent),
    ("missing_objects", missing_objects),
    ("ranged_reads", ranged_reads),
    ("names_are_checked", names_are_checked),
    ("list_by_prefix", list_by_prefix),
    ("replace_and_delete", replace_and_delete),
    ("flush", flush),
    ("concurrent_puts", concurrent_puts),
    ("read_only_writes_nothing", read_only_writes_nothing),
    ("large_and_empty_objects", large_and_empty_objects),
];

/// Runs every check.
pub fn run_all(h: &mut dyn Harness) {
    for (name, check) in CHECKS {
        eprintln!("object store contract: {name}");
        check(h);
    }
}

fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn put_then_read(h: &mut dyn Harness) {
    let s = h.fresh();
    let data = bytes(1, 10_000);
    assert!(s.put("packs/aa", &data).unwrap(), "first put writes");
    assert_eq!(s.get("packs/aa").unwrap().as_deref(), Some(&data[..]));
    assert_eq!(s.len("packs/aa").unwrap(), Some(10_000));
    assert!(s.put("top", b"x").unwrap());
    assert_eq!(s.get("top").unwrap(), Some(b"x".to_vec()));
    assert!(s.put("a/b/c/d", b"deep").unwrap());
    assert_eq!(s.get("a/b/c/d").unwrap(), Some(b"deep".to_vec()));
    s.flush().unwrap();
}

fn put_is_create_if_absent(h: &mut dyn Harness) {
    let s = h.fresh();
    assert!(s.put("o", b"first").unwrap());
    assert!(
        !s.put("o", b"other").unwrap(),
        "a second put of a name writes nothing"
    );
    assert_eq!(s.get("o").unwrap(), Some(b"first".to_vec()));
}

fn missing_objects(h: &mut dyn Harness) {
    let s = h.fresh();
    assert_eq!(s.get("nope").unwrap(), None);
    assert_eq!(s.len("nope").unwrap(), None);
    let mut buf = [0u8; 4];
    let err = s.read_at("nope", 0, &mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(err.name(), "nope");
    s.delete("nope").unwrap();
    assert!(s.list("").unwrap().is_empty());
}

fn ranged_reads(h: &mut dyn Harness) {
    let s = h.fresh();
    let data = bytes(7, 5000);
    s.put("r", &data).unwrap();
    for (off, len) in [(0, 1), (0, 5000), (1234, 100), (4999, 1), (5000, 0)] {
        let mut buf = vec![0u8; len];
        s.read_at("r", off as u64, &mut buf).unwrap();
        assert_eq!(buf, data[off..off + len], "read of {len} at {off}");
    }
    for (off, len) in [(4990, 11), (5000, 1), (1 << 40, 1)] {
        let mut buf = vec![0u8; len];
        let err = s.read_at("r", off, &mut buf).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::Short,
            "read of {len} at {off}: {err}"
        );
    }
}

fn names_are_checked(h: &mut dyn Harness) {
    let s = h.fresh();
    for bad in [
        "", "/a", "a/", "a//b", "..", "a/../b", ".tmp-1-1", "a b", "é",
    ] {
        let kinds = [
            s.put(bad, b"x").map(|_| ()).unwrap_err().kind(),
            s.replace(bad, b"x").unwrap_err().kind(),
            s.get(bad).map(|_| ()).unwrap_err().kind(),
            s.len(bad).map(|_| ()).unwrap_err().kind(),
            s.read_at(bad, 0, &mut [0u8; 1]).unwrap_err().kind(),
            s.delete(bad).unwrap_err().kind(),
        ];
        assert!(
            kinds.iter().all(|k| *k == ErrorKind::InvalidName),
            "{bad:?}: {kinds:?}"
        );
    }
    assert!(s.list("").unwrap().is_empty(), "nothing was written");
}

fn list_by_prefix(h: &mut dyn Harness) {
    let s = h.fresh();
    let names = [
        "packs/ab01",
        "packs/ab02",
        "packs/b",
        "packsx",
        "manifests/s1/1",
        "manifests/s1/22",
        "manifests/s2/3",
        "identity",
    ];
    for (i, n) in names.iter().enumerate() {
        s.put(n, &bytes(i as u8, i + 1)).unwrap();
    }
    let list = |p: &str| -> Vec<(String, u64)> {
        s.list(p)
            .unwrap()
            .into_iter()
            .map(|m| (m.name, m.len))
            .collect()
    };
    let all = list("");
    let mut sorted: Vec<(String, u64)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), i as u64 + 1))
        .collect();
    sorted.sort();
    assert_eq!(all, sorted, "list of everything, sorted, with lengths");
    let names_of = |p: &str| -> Vec<String> { list(p).into_iter().map(|(n, _)| n).collect() };
    assert_eq!(names_of("packs/ab"), ["packs/ab01", "packs/ab02"]);
    assert_eq!(names_of("packs/"), ["packs/ab01", "packs/ab02", "packs/b"]);
    assert_eq!(
        names_of("packs"),
        ["packs/ab01", "packs/ab02", "packs/b", "packsx"]
    );
    assert_eq!(
        names_of("manifests/s1/"),
        ["manifests/s1/1", "manifests/s1/22"]
    );
    assert_eq!(names_of("manifests/s1/2"), ["manifests/s1/22"]);
    assert!(names_of("zzz").is_empty());
    assert!(names_of("packs/c/").is_empty());
}

fn replace_and_delete(h: &mut dyn Harness) {
    let s = h.fresh();
    s.replace("identity", b"one").unwrap();
    assert_eq!(s.get("identity").unwrap(), Some(b"one".to_vec()));
    s.replace("identity", b"two, longer").unwrap();
    assert_eq!(s.get("identity").unwrap(), Some(b"two, longer".to_vec()));
    s.replace("identity", b"3").unwrap();
    assert_eq!(s.get("identity").unwrap(), Some(b"3".to_vec()));
    s.replace("meta/x/y", b"nested").unwrap();
    assert_eq!(s.get("meta/x/y").unwrap(), Some(b"nested".to_vec()));
    s.put("p", b"data").unwrap();
    s.delete("p").unwrap();
    assert_eq!(s.get("p").unwrap(), None);
    s.delete("p").unwrap();
    assert!(
        s.put("p", b"again").unwrap(),
        "a deleted name can be put again"
    );
    assert_eq!(s.get("p").unwrap(), Some(b"again".to_vec()));
    let names: Vec<String> = s.list("").unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["identity", "meta/x/y", "p"]);
}

fn flush(h: &mut dyn Harness) {
    let s = h.fresh();
    s.flush().unwrap();
    for i in 0..20u8 {
        s.put(&format!("f/{i}"), &bytes(i, 100)).unwrap();
    }
    s.delete("f/3").unwrap();
    s.flush().unwrap();
    s.flush().unwrap();
    assert_eq!(s.list("f/").unwrap().len(), 19);
}

fn concurrent_puts(h: &mut dyn Harness) {
    let s = h.fresh();
    let data = bytes(9, 100_000);
    let wrote: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let s = Arc::clone(&s);
                let data = &data;
                scope.spawn(move || {
                    s.put(&format!("own/{t}"), &bytes(t as u8, 1000)).unwrap();
                    s.put("shared", data).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        wrote.iter().filter(|w| **w).count(),
        1,
        "exactly one put wrote"
    );
    assert_eq!(s.get("shared").unwrap().as_deref(), Some(&data[..]));
    for t in 0..8u8 {
        assert_eq!(s.get(&format!("own/{t}")).unwrap(), Some(bytes(t, 1000)));
    }
    s.flush().unwrap();
    let names: BTreeSet<String> = s.list("").unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(names.len(), 9, "no temporary object shows: {names:?}");
}

fn read_only_writes_nothing(h: &mut dyn Harness) {
    let s = h.fresh();
    s.put("kept", b"kept").unwrap();
    s.flush().unwrap();
    let ro = h.read_only();
    assert!(ro.read_only());
    assert_eq!(ro.get("kept").unwrap(), Some(b"kept".to_vec()));
    let mut buf = [0u8; 2];
    ro.read_at("kept", 2, &mut buf).unwrap();
    assert_eq!(&buf, b"pt");
    assert_eq!(ro.list("").unwrap().len(), 1);
    let kinds = [
        ro.put("new", b"x").map(|_| ()).unwrap_err().kind(),
        ro.replace("kept", b"x").unwrap_err().kind(),
        ro.delete("kept").unwrap_err().kind(),
    ];
    assert!(kinds.iter().all(|k| *k == ErrorKind::ReadOnly), "{kinds:?}");
    ro.flush().unwrap();
    assert_eq!(s.get("kept").unwrap(), Some(b"kept".to_vec()));
    assert_eq!(s.get("new").unwrap(), None);
}

fn large_and_empty_objects(h: &mut dyn Harness) {
    let s = h.fresh();
    let big = bytes(3, 9 << 20);
    assert!(s.put("big", &big).unwrap());
    assert!(s.put("empty", b"").unwrap());
    s.flush().unwrap();
    assert_eq!(s.len("big").unwrap(), Some(9 << 20));
    assert_eq!(s.get("big").unwrap().as_deref(), Some(&big[..]));
    assert_eq!(s.get("empty").unwrap(), Some(Vec::new()));
    assert_eq!(s.len("empty").unwrap(), Some(0));
    let mut tail = vec![0u8; 4096];
    s.read_at("big", (9 << 20) - 4096, &mut tail).unwrap();
    assert_eq!(tail, big[(9 << 20) - 4096..]);
}
