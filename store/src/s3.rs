//! Objects in an S3 bucket (feature `s3`): Ceph's radosgw or any S3 endpoint, through the
//! `object_store` crate's S3 client on a small tokio runtime owned by the store.
//!
//! One object store is one bucket and one key prefix (several state directories can share a
//! bucket, each under its own prefix); an object `packs/ab…` is the key `PREFIX/packs/ab…`.
//!
//! - [`ObjectStore::put`] asks whether the key exists (`HEAD`), and if not sends a
//!   create-if-absent `PUT` (`If-None-Match: *`) in the background: up to [`MAX_IN_FLIGHT`]
//!   at once. A `412 Precondition Failed` (another host stored the same content-addressed
//!   object in the meantime) counts as done. [`ObjectStore::flush`] waits for every `PUT`
//!   sent; S3 acknowledges a `PUT` once the object is durable. Reads, `replace` and
//!   `delete` of a name first wait for this handle's `PUT` of it still on its way.
//! - [`ObjectStore::replace`] is one plain `PUT`: S3 replaces an object atomically.
//! - Large reads are split into [`READ_PART`]-sized ranged `GET`s sent together.
//! - Requests are path-style (`http://host:port/bucket/key`), as radosgw expects; plain
//!   `http://` endpoints are accepted (a test cluster on loopback). No checksum algorithm is
//!   configured (radosgw of Ceph 16 does not know the newer checksum headers).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    ObjectStore as _, ObjectStoreExt as _, PutMode, PutOptions, PutPayload, RetryConfig,
};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::{check_name, Error, ErrorKind, ObjectMeta, ObjectStore, Result};

/// `PUT`s sent and not yet acknowledged, at most.
pub const MAX_IN_FLIGHT: usize = 16;
/// Size of the ranged `GET`s a large read is split into.
pub const READ_PART: usize = 4 << 20;

/// How to reach a bucket.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http(s)://host:port` of the S3 endpoint.
    pub endpoint: String,
    /// The bucket; it must exist.
    pub bucket: String,
    /// The key prefix of this store's objects (empty: the bucket's root).
    pub prefix: String,
    /// The access key id.
    pub access_key: String,
    /// The secret access key.
    pub secret_key: String,
    /// The region signed into requests (radosgw accepts any).
    pub region: String,
    /// Seconds before a request fails (after its retries).
    pub timeout_secs: u32,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

/// Writes on their way, and the names this handle has put (of two concurrent puts of one
/// name through one handle exactly one reports that it wrote).
#[derive(Default)]
struct InFlight {
    writes: VecDeque<(String, JoinHandle<Result<()>>)>,
    put: HashSet<String>,
}

/// An object store in an S3 bucket (see the module documentation).
pub struct S3Store {
    runtime: Runtime,
    s3: Arc<AmazonS3>,
    config: S3Config,
    read_only: bool,
    pending: Mutex<InFlight>,
    failed: Mutex<Option<Error>>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location())
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Opens the bucket and checks that it can be listed. Fails with
    /// [`ErrorKind::Unavailable`] when the endpoint cannot be reached, refuses the keys or
    /// has no such bucket (the message says which).
    pub fn open(config: &S3Config, read_only: bool) -> Result<S3Store> {
        let location = format!("{}@{}", config.bucket, config.endpoint);
        if !config.prefix.is_empty() {
            check_name(&config.prefix)?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-store")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the S3 client for", &location, e))?;
        let timeout = std::time::Duration::from_secs(config.timeout_secs.into());
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: timeout,
            ..RetryConfig::default()
        };
        let options = object_store::ClientOptions::new()
            .with_allow_http(true)
            .with_timeout(timeout)
            .with_connect_timeout(timeout.min(std::time::Duration::from_secs(10)));
        let s3 = AmazonS3Builder::new()
            .with_endpoint(&config.endpoint)
            .with_bucket_name(&config.bucket)
            .with_access_key_id(&config.access_key)
            .with_secret_access_key(&config.secret_key)
            .with_region(&config.region)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_retry(retry)
            .with_client_options(options)
            .build()
            .map_err(|e| s3_error("open", &location, e))?;
        let store = S3Store {
            runtime,
            s3: Arc::new(s3),
            config: config.clone(),
            read_only,
            pending: Mutex::new(InFlight::default()),
            failed: Mutex::new(None),
        };
        // One listing request proves the endpoint, the keys and the bucket.
        let s3 = Arc::clone(&store.s3);
        let key = store.key("probe")?;
        store
            .runtime
            .block_on(async move { s3.list_with_delimiter(Some(&key)).await })
            .map_err(|e| s3_error("open", &location, e))?;
        Ok(store)
    }

    fn key(&self, name: &str) -> Result<Key> {
        check_name(name)?;
        Ok(if self.config.prefix.is_empty() {
            Key::from(name)
        } else {
            Key::from(format!("{}/{name}", self.config.prefix))
        })
    }

    fn writable(&self, op: &'static str, name: &str) -> Result<Key> {
        let key = self.key(name)?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                op,
                name,
                "the store was opened read-only".to_string(),
            ));
        }
        Ok(key)
    }

    fn head(&self, name: &str, key: &Key) -> Result<Option<u64>> {
        match self.runtime.block_on(self.s3.head(key)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error("stat", name, e)),
        }
    }

    fn drain(&self) -> Result<()> {
        let all: Vec<(String, JoinHandle<Result<()>>)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.writes.drain(..).collect()
        };
        let mut first = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take();
        for (name, task) in all {
            if let Err(e) = self.join(&name, task) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Waits for the writes of `name` still on their way (every write if `None`), so that
    /// this handle reads its own writes; failures are kept for the next flush.
    fn settle(&self, name: Option<&str>) {
        let mine: Vec<(String, JoinHandle<Result<()>>)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, others): (Vec<_>, Vec<_>) = pending
                .writes
                .drain(..)
                .partition(|(n, _)| name.is_none_or(|name| n == name));
            pending.writes = others.into();
            mine
        };
        for (n, task) in mine {
            if let Err(e) = self.join(&n, task) {
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                failed.get_or_insert(e);
            }
        }
    }

    fn join(&self, name: &str, task: JoinHandle<Result<()>>) -> Result<()> {
        match self.runtime.block_on(task) {
            Ok(result) => result,
            Err(e) => Err(Error::new(
                ErrorKind::Unavailable,
                "put",
                name,
                format!("the upload task ended: {e}"),
            )),
        }
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        let _ = self.drain();
    }
}

/// An error of the S3 client, by kind.
fn s3_error(op: &'static str, name: &str, e: object_store::Error) -> Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => ErrorKind::NotFound,
        _ => ErrorKind::Unavailable,
    };
    Error::new(kind, op, name, e.to_string())
}

impl ObjectStore for S3Store {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn location(&self) -> String {
        format!(
            "{}/{}@{}",
            self.config.bucket, self.config.prefix, self.config.endpoint
        )
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<bool> {
        let key = self.writable("put", name)?;
        if self.head(name, &key)?.is_some() {
            return Ok(false);
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !pending.put.insert(name.to_string()) {
            return Ok(false);
        }
        while pending.writes.len() >= MAX_IN_FLIGHT {
            let Some((oldest, task)) = pending.writes.pop_front() else {
                break;
            };
            if let Err(e) = self.join(&oldest, task) {
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                failed.get_or_insert(e);
            }
        }
        let s3 = Arc::clone(&self.s3);
        let payload = PutPayload::from(data.to_vec());
        let owned = name.to_string();
        let task = self.runtime.spawn(async move {
            let options = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match s3.put_opts(&key, payload, options).await {
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
                Err(object_store::Error::Precondition { .. }) => Ok(()),
                Err(e) => Err(s3_error("put", &owned, e)),
            }
        });
        pending.writes.push_back((name.to_string(), task));
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        self.drain()
    }

    fn replace(&self, name: &str, data: &[u8]) -> Result<()> {
        let key = self.writable("replace", name)?;
        self.settle(Some(name));
        let payload = PutPayload::from(data.to_vec());
        self.runtime
            .block_on(self.s3.put(&key, payload))
            .map(|_| ())
            .map_err(|e| s3_error("replace", name, e))
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let key = self.key(name)?;
        self.settle(Some(name));
        let s3 = Arc::clone(&self.s3);
        let result = self.runtime.block_on(async move {
            let got = s3.get(&key).await?;
            got.bytes().await
        });
        match result {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error("read", name, e)),
        }
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let key = self.key(name)?;
        self.settle(Some(name));
        // The length first: a range past the end is an error whose kind S3 does not tell.
        let Some(len) = self.head(name, &key)? else {
            return Err(Error::new(ErrorKind::NotFound, "read", name, String::new()));
        };
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > len) {
            return Err(Error::new(
                ErrorKind::Short,
                "read",
                name,
                format!(
                    "{} bytes at offset {offset} asked for, the object is {len} bytes long",
                    buf.len()
                ),
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let tasks: Vec<_> = buf
            .chunks(READ_PART)
            .enumerate()
            .map(|(i, part)| {
                let s3 = Arc::clone(&self.s3);
                let key = key.clone();
                let start = offset + (i * READ_PART) as u64;
                let range = start..start + part.len() as u64;
                self.runtime
                    .spawn(async move { s3.get_range(&key, range).await })
            })
            .collect();
        let mut first_error = None;
        for (part, task) in buf.chunks_mut(READ_PART).zip(tasks) {
            let got = match self.runtime.block_on(task) {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(e)) => {
                    first_error.get_or_insert(s3_error("read", name, e));
                    continue;
                }
                Err(e) => {
                    first_error.get_or_insert(Error::new(
                        ErrorKind::Unavailable,
                        "read",
                        name,
                        e.to_string(),
                    ));
                    continue;
                }
            };
            if got.len() != part.len() {
                first_error.get_or_insert(Error::new(
                    ErrorKind::Short,
                    "read",
                    name,
                    format!("{} of {} bytes came back", got.len(), part.len()),
                ));
                continue;
            }
            part.copy_from_slice(&got);
        }
        first_error.map_or(Ok(()), Err)
    }

    fn len(&self, name: &str) -> Result<Option<u64>> {
        let key = self.key(name)?;
        self.settle(Some(name));
        self.head(name, &key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        use futures_util::TryStreamExt as _;
        self.settle(None);
        // S3 lists by path segment: list the directory part of `prefix`, then filter.
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let root = match (self.config.prefix.as_str(), dir) {
            ("", "") => None,
            ("", d) => Some(Key::from(d)),
            (p, "") => Some(Key::from(p)),
            (p, d) => Some(Key::from(format!("{p}/{d}"))),
        };
        let s3 = Arc::clone(&self.s3);
        let all = self
            .runtime
            .block_on(async move { s3.list(root.as_ref()).try_collect::<Vec<_>>().await })
            .map_err(|e| s3_error("list", prefix, e))?;
        let strip = if self.config.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.config.prefix)
        };
        let mut out: Vec<ObjectMeta> = all
            .into_iter()
            .filter_map(|m| {
                let name = m.location.as_ref().strip_prefix(&strip)?.to_string();
                name.starts_with(prefix)
                    .then_some(ObjectMeta { name, len: m.size })
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let key = self.writable("delete", name)?;
        self.settle(Some(name));
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put
            .remove(name);
        match self.runtime.block_on(self.s3.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error("delete", name, e)),
        }
    }
}
