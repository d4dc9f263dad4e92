//! The object store contract, run against every backend of this crate.
#![allow(clippy::unwrap_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use store::contract::{self, Harness};
use store::{ErrorKind, LocalStore, MemoryStore, ObjectStore};

#[derive(Default)]
struct Local {
    dirs: Vec<tempfile::TempDir>,
}

impl Harness for Local {
    fn fresh(&mut self) -> Arc<dyn ObjectStore> {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("store"), false).unwrap();
        self.dirs.push(dir);
        Arc::new(store)
    }
    fn read_only(&mut self) -> Arc<dyn ObjectStore> {
        let dir = self.dirs.last().unwrap().path().join("store");
        Arc::new(LocalStore::open(&dir, true).unwrap())
    }
}

#[derive(Default)]
struct Memory {
    last: Option<Arc<MemoryStore>>,
}

impl Harness for Memory {
    fn fresh(&mut self) -> Arc<dyn ObjectStore> {
        let s = Arc::new(MemoryStore::new());
        self.last = Some(Arc::clone(&s));
        s
    }
    fn read_only(&mut self) -> Arc<dyn ObjectStore> {
        let objects = self.last.as_ref().unwrap().snapshot();
        Arc::new(MemoryStore::read_only_with(objects))
    }
}

#[test]
fn local_store_keeps_the_contract() {
    contract::run_all(&mut Local::default());
}

#[test]
fn memory_store_keeps_the_contract() {
    contract::run_all(&mut Memory::default());
}

/// Every file and directory the local store makes is private, whatever the umask.
#[test]
fn local_store_files_are_private() {
    // SAFETY: umask only changes this process's file mode mask.
    let old = unsafe { libc_umask(0o022) };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let s = LocalStore::open(&root, false).unwrap();
    s.put("packs/ab/cd", b"secret").unwrap();
    s.replace("identity", b"id").unwrap();
    s.flush().unwrap();
    // SAFETY: as above.
    unsafe { libc_umask(old) };
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("packs")), 0o700);
    assert_eq!(mode(&root.join("packs/ab")), 0o700);
    assert_eq!(mode(&root.join("packs/ab/cd")), 0o600);
    assert_eq!(mode(&root.join("identity")), 0o600);
}

unsafe fn libc_umask(mask: u32) -> u32 {
    extern "C" {
        fn umask(mask: u32) -> u32;
    }
    // SAFETY: umask has no preconditions.
    unsafe { umask(mask) }
}

/// A read-only store on a missing directory is empty and creates nothing.
#[test]
fn read_only_local_store_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("absent");
    let s = LocalStore::open(&root, true).unwrap();
    assert!(s.list("").unwrap().is_empty());
    assert_eq!(s.get("x").unwrap(), None);
    assert_eq!(s.put("x", b"1").unwrap_err().kind(), ErrorKind::ReadOnly);
    assert!(!root.exists());
}

/// A torn leftover (shorter than the object put again) is replaced; temporary files of
/// dead processes are removed at the next writable open and never listed.
#[test]
fn local_store_repairs_torn_objects_and_removes_stale_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let s = LocalStore::open(&root, false).unwrap();
    s.put("packs/p", b"0123456789").unwrap();
    s.flush().unwrap();
    std::fs::write(root.join("packs/p"), b"0123").unwrap();
    assert!(
        s.put("packs/p", b"0123456789").unwrap(),
        "torn object rewritten"
    );
    assert_eq!(s.get("packs/p").unwrap(), Some(b"0123456789".to_vec()));
    // A pid that cannot exist (above pid_max) and our own.
    let stale = root.join("packs/.tmp-2147483647-0");
    let ours = root.join(format!("packs/.tmp-{}-99", std::process::id()));
    std::fs::write(&stale, b"x").unwrap();
    std::fs::write(&ours, b"x").unwrap();
    assert_eq!(s.list("").unwrap().len(), 1);
    drop(s);
    let _s = LocalStore::open(&root, false).unwrap();
    assert!(
        !stale.exists(),
        "a dead process's temporary file is removed"
    );
    assert!(ours.exists(), "a live process's temporary file is kept");
}

/// The memory fake loses what was not flushed when it crashes.
#[test]
fn memory_store_crash_loses_unflushed_objects() {
    let s = MemoryStore::new();
    s.put("a", b"1").unwrap();
    s.flush().unwrap();
    s.put("b", b"2").unwrap();
    s.replace("c", b"3").unwrap();
    s.crash();
    let names: Vec<String> = s.list("").unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["a", "c"]);
    s.fail_writes(Some(ErrorKind::NoSpace));
    assert_eq!(s.put("d", b"4").unwrap_err().kind(), ErrorKind::NoSpace);
}
