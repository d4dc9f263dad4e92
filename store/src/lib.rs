//! Where domsnap keeps the objects of its memory image store: packs of chunks, checkpoint
//! manifests and the store's identity.
//!
//! An **object** is an immutable byte string under a **name**. Names are `/`-separated paths
//! of `[A-Za-z0-9._-]` components chosen by domsnap itself, never by users (see
//! [`check_name`]), for example `packs/<blake3 hex>`, `manifests/<state id>/<op>`,
//! `identity`. Most objects are content-addressed: written once, read many times, deleted
//! whole; [`ObjectStore::replace`] exists for the few small metadata objects that change.
//!
//! # Durability
//!
//! [`ObjectStore::put`] may return before the object is durable, so that the guest's pause
//! can end while the data is still on its way to disk; [`ObjectStore::flush`] returns once
//! every object put before it is durable (local: file and directory fsyncs; RADOS/S3: every
//! write acknowledged). Nothing may name an object (in the journal or in another object)
//! before a `flush` that covers it has returned. [`ObjectStore::replace`] is durable when it
//! returns. After a crash, an object that was put but not flushed may be missing, shorter, or
//! present in full — never a mix of two contents under one name.
//!
//! # Implementations
//!
//! - [`LocalStore`]: a directory of files (fsync discipline, 0600 files, 0700 directories).
//! - `MemoryStore` (feature `testing`): a map that can lose unflushed objects on demand, for
//!   tests.
//!
//! - `RadosStore` (feature `rados`): a pool (and namespace) of a Ceph cluster, through
//!   librados.
//! - `S3Store` (feature `s3`): a bucket (and key prefix) of an S3 endpoint such as Ceph's
//!   radosgw.
//!
//! Each implementation runs the same contract test suite, `contract` (feature `testing`);
//! `rados` and `s3` run it against a real single-node Ceph (`tests/ceph-lab/`).
#![warn(missing_docs)]

#[cfg(any(test, feature = "testing"))]
pub mod contract;
mod error;
mod local;
#[cfg(any(test, feature = "testing"))]
mod memory;
#[cfg(feature = "rados")]
mod rados;
#[cfg(feature = "s3")]
mod s3;
mod url;

pub use error::{Error, ErrorKind, Result};
pub use local::LocalStore;
#[cfg(any(test, feature = "testing"))]
pub use memory::MemoryStore;
#[cfg(feature = "rados")]
pub use rados::{RadosConfig, RadosStore};
#[cfg(feature = "s3")]
pub use s3::{S3Config, S3Store};
pub use url::open_location;

/// One object as [`ObjectStore::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectMeta {
    /// Its full name.
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
}

/// A store of immutable named objects (see the crate documentation for names and
/// durability).
///
/// Every method is safe to call from several threads at once. Methods are idempotent where
/// they say so; recovery after a crash relies on that.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Short name of the backend (`local`, `rados`, `s3`, `memory`), for messages and the
    /// journal.
    fn kind(&self) -> &'static str;

    /// Where the store is, for humans: a directory, `pool/namespace`, `bucket@endpoint`.
    fn location(&self) -> String;

    /// Whether the store was opened read-only: then every method that writes fails with
    /// [`ErrorKind::ReadOnly`] and nothing is written anywhere.
    fn read_only(&self) -> bool;

    /// Writes `data` as object `name` unless an object of that name and length exists
    /// already, in which case nothing is written and `Ok(false)` is returned (names of
    /// immutable objects derive from their content, so an existing object holds the same
    /// bytes; one of another length is a leftover torn by a crash before a flush, and is
    /// replaced). `Ok(true)` when this call wrote it. Durable only once a later
    /// [`ObjectStore::flush`] returns. Idempotent; of several concurrent puts of one name,
    /// one writes.
    fn put(&self, name: &str, data: &[u8]) -> Result<bool>;

    /// Makes every object put (by this handle) before the call durable.
    fn flush(&self) -> Result<()>;

    /// Atomically replaces (or creates) a small mutable object; durable when it returns.
    fn replace(&self, name: &str, data: &[u8]) -> Result<()>;

    /// The whole object, or `None` if there is no object of that name.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>>;

    /// Fills `buf` from `offset` of object `name`. [`ErrorKind::NotFound`] if the object does
    /// not exist, [`ErrorKind::Short`] if it ends before `offset + buf.len()`.
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// The length of object `name`, or `None` if it does not exist.
    fn len(&self, name: &str) -> Result<Option<u64>>;

    /// Every object whose name starts with `prefix`, sorted by name.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Deletes object `name`; durable when it returns. Idempotent: `Ok` if it does not exist.
    fn delete(&self, name: &str) -> Result<()>;
}

/// A shared store is a store.
impl<T: ObjectStore + ?Sized> ObjectStore for std::sync::Arc<T> {
    fn kind(&self) -> &'static str {
        (**self).kind()
    }
    fn location(&self) -> String {
        (**self).location()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<bool> {
        (**self).put(name, data)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn replace(&self, name: &str, data: &[u8]) -> Result<()> {
        (**self).replace(name, data)
    }
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        (**self).get(name)
    }
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(name, offset, buf)
    }
    fn len(&self, name: &str) -> Result<Option<u64>> {
        (**self).len(name)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        (**self).list(prefix)
    }
    fn delete(&self, name: &str) -> Result<()> {
        (**self).delete(name)
    }
}

/// Longest object name accepted.
pub const MAX_NAME_LEN: usize = 255;

/// Checks that `name` is an object name: 1–[`MAX_NAME_LEN`] bytes, `/`-separated
/// components of `[A-Za-z0-9._-]`, none empty, none starting with `.` (so no `.` or `..`,
/// and nothing that looks like a backend's temporary file).
pub fn check_name(name: &str) -> Result<()> {
    let why = if name.is_empty() || name.len() > MAX_NAME_LEN {
        Some("must be 1 to 255 bytes long")
    } else if name.split('/').any(|c| c.is_empty() || c.starts_with('.')) {
        Some("has an empty component or one starting with '.'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    {
        Some("may only hold A-Z a-z 0-9 . _ - and /")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Error::new(
            ErrorKind::InvalidName,
            "check name",
            name,
            why.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["identity", "packs/0a1b", "manifests/ab-12/34", "a.b_c-d"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "", "/a", "a/", "a//b", ".", "..", "a/../b", ".tmp", "a b", "a\0b", "é", &long,
        ] {
            let err = check_name(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::InvalidName, "{bad}");
        }
    }
}
