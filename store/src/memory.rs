//! [`MemoryStore`]: objects in a map, for tests. It keeps what a flush made durable apart
//! from what was only put, so a test can [`MemoryStore::crash`] it (objects not flushed are
//! lost, as after a power cut) and make calls fail with a chosen kind
//! ([`MemoryStore::fail_writes`]).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::{check_name, Error, ErrorKind, ObjectMeta, ObjectStore, Result};

/// An in-memory object store (a test double that runs the same contract suite).
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    read_only: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Every object as readers see it.
    objects: BTreeMap<String, Vec<u8>>,
    /// What survives a crash: the objects as of the last flush (or replace/delete).
    durable: BTreeMap<String, Vec<u8>>,
    /// When set, every write fails with this kind.
    fail: Option<ErrorKind>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// A read-only store holding `objects`.
    pub fn read_only_with(objects: BTreeMap<String, Vec<u8>>) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner {
                durable: objects.clone(),
                objects,
                fail: None,
            }),
            read_only: true,
        }
    }

    /// Every object, as readers see it now.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        self.lock().objects.clone()
    }

    /// Loses everything not made durable by a flush, as a power cut would.
    pub fn crash(&self) {
        let mut inner = self.lock();
        inner.objects = inner.durable.clone();
    }

    /// From now on every write fails with `kind` (`None`: writes work again).
    pub fn fail_writes(&self, kind: Option<ErrorKind>) {
        self.lock().fail = kind;
    }

    /// Replaces an object's bytes behind the store's back (tests of damage detection).
    pub fn tamper(&self, name: &str, data: Option<Vec<u8>>) {
        let mut inner = self.lock();
        match data {
            Some(d) => {
                inner.objects.insert(name.to_string(), d.clone());
                inner.durable.insert(name.to_string(), d);
            }
            None => {
                inner.objects.remove(name);
                inner.durable.remove(name);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writable(&self, op: &'static str, name: &str) -> Result<MutexGuard<'_, Inner>> {
        check_name(name)?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                op,
                name,
                "the store was opened read-only".into(),
            ));
        }
        let inner = self.lock();
        if let Some(kind) = inner.fail {
            return Err(Error::new(kind, op, name, "injected failure".into()));
        }
        Ok(inner)
    }
}

impl ObjectStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn location(&self) -> String {
        "memory".into()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<bool> {
        let mut inner = self.writable("put", name)?;
        if inner
            .objects
            .get(name)
            .is_some_and(|old| old.len() == data.len())
        {
            return Ok(false);
        }
        inner.objects.insert(name.to_string(), data.to_vec());
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut inner = self.lock();
        if let Some(kind) = inner.fail {
            return Err(Error::new(kind, "flush", "", "injected failure".into()));
        }
        inner.durable = inner.objects.clone();
        Ok(())
    }

    fn replace(&self, name: &str, data: &[u8]) -> Result<()> {
        let mut inner = self.writable("replace", name)?;
        inner.objects.insert(name.to_string(), data.to_vec());
        inner.durable.insert(name.to_string(), data.to_vec());
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        check_name(name)?;
        Ok(self.lock().objects.get(name).cloned())
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_name(name)?;
        let inner = self.lock();
        let data = inner.objects.get(name).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, "read", name, "no such object".into())
        })?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(buf.len());
        match data.get(start..end) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::new(
                ErrorKind::Short,
                "read",
                name,
                format!("the object is {} bytes long, asked up to {end}", data.len()),
            )),
        }
    }

    fn len(&self, name: &str) -> Result<Option<u64>> {
        check_name(name)?;
        Ok(self.lock().objects.get(name).map(|d| d.len() as u64))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self
            .lock()
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                name: k.clone(),
                len: v.len() as u64,
            })
            .collect())
    }

    fn delete(&self, name: &str) -> Result<()> {
        let mut inner = self.writable("delete", name)?;
        inner.objects.remove(name);
        inner.durable.remove(name);
        Ok(())
    }
}
