//! Objects in a Ceph RADOS pool, through librados (feature `rados`).
//!
//! One object store is one pool and one RADOS namespace (several state directories or test
//! runs can share a pool, each in its own namespace); object names are used as RADOS object
//! names unchanged.
//!
//! - [`ObjectStore::put`] checks whether the object exists (one `stat`), and if it does not,
//!   sends one write operation `create(exclusive) + write_full` asynchronously and returns:
//!   up to [`MAX_IN_FLIGHT`] writes are on their way at once, so a stream of puts keeps the
//!   cluster busy the way `rados bench` does. A write that finds the object created in the
//!   meantime (`EEXIST`: another host stored the same content-addressed object) counts as
//!   done. [`ObjectStore::flush`] waits until every write sent is acknowledged by the OSDs
//!   (RADOS acknowledges a write once it is durable on every replica) and reports the first
//!   failure, naming its object.
//! - Objects larger than [`MAX_SINGLE_WRITE`] (OSDs refuse writes above `osd_max_write_size`,
//!   90 MiB by default) are written as an exclusive create with the first part, then the
//!   other parts in order; a crash in between leaves a shorter object (the crate's contract
//!   allows that for an object not yet flushed), which the next put of that name rewrites
//!   (an existing object whose length differs from the data's is taken as torn). The pool's `osd_max_object_size` (128 MiB by
//!   default) bounds an object's size.
//! - [`ObjectStore::replace`] is one synchronous `write_full`: atomic in RADOS.
//! - Large reads are split into [`READ_PART`]-sized asynchronous reads sent together.
//! - [`ObjectStore::list`] walks the namespace's objects (a full listing, then filtered by
//!   prefix and sorted): meant for gc and verification, not for hot paths.
//!
//! Timeouts (`rados_mon_op_timeout`, `rados_osd_op_timeout`, `client_mount_timeout`) are set
//! so that an unreachable or full cluster is an error after a bounded time, never a hang.

use std::collections::{HashSet, VecDeque};
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};
use std::path::PathBuf;
use std::sync::Mutex;

use ceph::rados as ffi;

use crate::{check_name, Error, ErrorKind, ObjectMeta, ObjectStore, Result};

/// Writes sent and not yet acknowledged, at most (16, as `rados bench`'s default).
pub const MAX_IN_FLIGHT: usize = 16;
/// Largest object written with one write operation.
pub const MAX_SINGLE_WRITE: usize = 64 << 20;
/// Size of the parts a large read is split into.
pub const READ_PART: usize = 4 << 20;

const LIBRADOS_CREATE_EXCLUSIVE: c_int = 1;

/// How to reach a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RadosConfig {
    /// The `ceph.conf` to read; `None`: librados's defaults (`$CEPH_CONF`,
    /// `/etc/ceph/ceph.conf`, …).
    pub conf: Option<PathBuf>,
    /// The client name without `client.` (`admin` by default in Ceph).
    pub user: String,
    /// The pool; it must exist.
    pub pool: String,
    /// The RADOS namespace within the pool (empty: the default namespace).
    pub namespace: String,
    /// Seconds before a monitor or OSD operation, or the first connection, fails.
    pub timeout_secs: u32,
}

impl RadosConfig {
    /// A pool reached with the default configuration as `client.admin`, 30 s timeouts.
    pub fn new(pool: &str, namespace: &str) -> RadosConfig {
        RadosConfig {
            conf: None,
            user: "admin".to_string(),
            pool: pool.to_string(),
            namespace: namespace.to_string(),
            timeout_secs: 30,
        }
    }
}

/// A write sent and not yet reaped.
struct Pending {
    name: String,
    completion: ffi::rados_completion_t,
    op: ffi::rados_write_op_t,
}

// SAFETY: the completion and write op are librados handles that may be waited on and released
// from any thread; each is owned by exactly one `Pending`.
unsafe impl Send for Pending {}

impl Pending {
    /// Waits for the write, releases its handles, and returns its result.
    fn finish(self) -> Result<()> {
        // SAFETY: both handles are live (owned by self) and released exactly once here.
        let ret = unsafe {
            ffi::rados_aio_wait_for_complete(self.completion);
            let ret = ffi::rados_aio_get_return_value(self.completion);
            ffi::rados_aio_release(self.completion);
            ffi::rados_release_write_op(self.op);
            ret
        };
        match ret {
            r if r >= 0 || r == -libc::EEXIST => Ok(()),
            r => Err(errno_error("write", &self.name, r)),
        }
    }
}

/// Writes on their way, and the names this handle has put (so that of two concurrent puts
/// of one name through one handle exactly one reports that it wrote).
#[derive(Default)]
struct InFlight {
    writes: VecDeque<Pending>,
    put: HashSet<String>,
}

/// An object store in a RADOS pool (see the module documentation).
pub struct RadosStore {
    cluster: ffi::rados_t,
    ioctx: ffi::rados_ioctx_t,
    pool: String,
    namespace: String,
    read_only: bool,
    pending: Mutex<InFlight>,
    /// The first failure of a write reaped to make room, reported by the next flush.
    failed: Mutex<Option<Error>>,
}

// SAFETY: librados cluster and I/O context handles are thread-safe (librados serialises
// internally); the only mutable Rust state is behind mutexes.
unsafe impl Send for RadosStore {}
// SAFETY: as above.
unsafe impl Sync for RadosStore {}

impl std::fmt::Debug for RadosStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RadosStore")
            .field("pool", &self.pool)
            .field("namespace", &self.namespace)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl RadosStore {
    /// Connects to the cluster and opens the pool. Fails with [`ErrorKind::Unavailable`] when
    /// the cluster cannot be reached within the timeout or the pool does not exist.
    pub fn open(config: &RadosConfig, read_only: bool) -> Result<RadosStore> {
        let location = format!("{}/{}", config.pool, config.namespace);
        let cstr = |what: &str, s: &str| {
            CString::new(s).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidName,
                    "connect to",
                    &location,
                    format!("{what} holds a NUL byte"),
                )
            })
        };
        let user = cstr("the user name", &config.user)?;
        let pool = cstr("the pool name", &config.pool)?;
        let namespace = cstr("the namespace", &config.namespace)?;
        let conf = match &config.conf {
            Some(p) => Some(cstr("the configuration path", &p.to_string_lossy())?),
            None => None,
        };
        let mut cluster: ffi::rados_t = std::ptr::null_mut();
        // SAFETY: `cluster` is a valid out-pointer; `user` is a NUL-terminated string.
        let r = unsafe { ffi::rados_create(&mut cluster, user.as_ptr()) };
        if r < 0 {
            return Err(errno_error("create a cluster handle for", &location, r));
        }
        // From here on `Handle` shuts the cluster handle down if anything fails.
        let handle = Handle(cluster);
        let conf_result = match &conf {
            // SAFETY: the handle is live and not yet connected; the path is NUL-terminated.
            Some(p) => unsafe { ffi::rados_conf_read_file(cluster, p.as_ptr()) },
            // SAFETY: as above; a null path reads librados's default locations.
            None => unsafe { ffi::rados_conf_read_file(cluster, std::ptr::null()) },
        };
        if conf_result < 0 && conf.is_some() {
            return Err(errno_error(
                "read the Ceph configuration for",
                &location,
                conf_result,
            ));
        }
        let secs = config.timeout_secs.to_string();
        for option in [
            "rados_mon_op_timeout",
            "rados_osd_op_timeout",
            "client_mount_timeout",
        ] {
            set_option(cluster, option, &secs, &location)?;
        }
        // SAFETY: the handle is live and configured.
        let r = unsafe { ffi::rados_connect(cluster) };
        if r < 0 {
            return Err(errno_error("connect to the cluster of", &location, r));
        }
        let mut ioctx: ffi::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: the handle is connected; `pool` is NUL-terminated; `ioctx` an out-pointer.
        let r = unsafe { ffi::rados_ioctx_create(cluster, pool.as_ptr(), &mut ioctx) };
        if r < 0 {
            return Err(errno_error("open the pool of", &location, r));
        }
        // SAFETY: `ioctx` is live; librados copies the namespace string.
        unsafe { ffi::rados_ioctx_set_namespace(ioctx, namespace.as_ptr()) };
        std::mem::forget(handle);
        Ok(RadosStore {
            cluster,
            ioctx,
            pool: config.pool.clone(),
            namespace: config.namespace.clone(),
            read_only,
            pending: Mutex::new(InFlight::default()),
            failed: Mutex::new(None),
        })
    }

    fn writable(&self, op: &'static str, name: &str) -> Result<()> {
        check_name(name)?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                op,
                name,
                "the store was opened read-only".to_string(),
            ));
        }
        Ok(())
    }

    /// The object's length, `None` if it does not exist.
    fn stat(&self, name: &CStr, display: &str) -> Result<Option<u64>> {
        let mut size = 0u64;
        let mut mtime: libc::time_t = 0;
        // SAFETY: ioctx is live; `name` NUL-terminated; out-pointers valid.
        let r = unsafe { ffi::rados_stat(self.ioctx, name.as_ptr(), &mut size, &mut mtime) };
        match r {
            r if r >= 0 => Ok(Some(size)),
            r if r == -libc::ENOENT => Ok(None),
            r => Err(errno_error("stat", display, r)),
        }
    }

    /// Sends `op` asynchronously for object `name` and tracks it, waiting for the oldest
    /// write first when [`MAX_IN_FLIGHT`] are on their way.
    fn send(
        &self,
        pending: &mut InFlight,
        name: &str,
        cname: &CStr,
        op: ffi::rados_write_op_t,
    ) -> Result<()> {
        while pending.writes.len() >= MAX_IN_FLIGHT {
            let Some(oldest) = pending.writes.pop_front() else {
                break;
            };
            if let Err(e) = oldest.finish() {
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                failed.get_or_insert(e);
            }
        }
        let mut completion: ffi::rados_completion_t = std::ptr::null_mut();
        // SAFETY: out-pointer valid; no callbacks.
        let r = unsafe {
            ffi::rados_aio_create_completion(std::ptr::null_mut(), None, None, &mut completion)
        };
        if r < 0 {
            // SAFETY: `op` is live and owned here.
            unsafe { ffi::rados_release_write_op(op) };
            return Err(errno_error("write", name, r));
        }
        // SAFETY: op, ioctx and completion are live; the object name is NUL-terminated and
        // librados copies it; the op's data was copied into it when it was built.
        let r = unsafe {
            ffi::rados_aio_write_op_operate(
                op,
                self.ioctx,
                completion,
                cname.as_ptr(),
                std::ptr::null_mut(),
                0,
            )
        };
        if r < 0 {
            // SAFETY: the operation was not sent: both handles are still ours.
            unsafe {
                ffi::rados_aio_release(completion);
                ffi::rados_release_write_op(op);
            }
            return Err(errno_error("write", name, r));
        }
        pending.writes.push_back(Pending {
            name: name.to_string(),
            completion,
            op,
        });
        Ok(())
    }

    /// Waits for every write sent; the first failure, if any.
    fn drain(&self) -> Result<()> {
        let all: Vec<Pending> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.writes.drain(..).collect()
        };
        let mut first = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take();
        for p in all {
            if let Err(e) = p.finish() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for RadosStore {
    fn drop(&mut self) {
        let _ = self.drain();
        // SAFETY: no write is in flight any more; the I/O context is destroyed before the
        // cluster handle (the other order crashes librados), each exactly once.
        unsafe {
            ffi::rados_ioctx_destroy(self.ioctx);
            ffi::rados_shutdown(self.cluster);
        }
    }
}

/// Shuts a cluster handle down unless forgotten.
struct Handle(ffi::rados_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle is live and has no I/O context.
        unsafe { ffi::rados_shutdown(self.0) };
    }
}

fn set_option(cluster: ffi::rados_t, option: &str, value: &str, location: &str) -> Result<()> {
    let (o, v) = (
        CString::new(option).expect("option names hold no NUL"),
        CString::new(value).expect("numbers hold no NUL"),
    );
    // SAFETY: the handle is live and not connected; both strings are NUL-terminated.
    let r = unsafe { ffi::rados_conf_set(cluster, o.as_ptr(), v.as_ptr()) };
    if r < 0 {
        return Err(errno_error("configure the cluster handle for", location, r));
    }
    Ok(())
}

/// An error from a negative errno returned by librados (its kind follows from the errno:
/// `ENOENT`, `ENOSPC`/`EDQUOT`, `EROFS`, else unavailable).
fn errno_error(op: &'static str, name: &str, ret: c_int) -> Error {
    Error::io(op, name, std::io::Error::from_raw_os_error(-ret))
}

fn object_name(name: &str) -> Result<CString> {
    check_name(name)?;
    // check_name admits no NUL byte.
    CString::new(name).map_err(|_| {
        Error::new(
            ErrorKind::InvalidName,
            "check name",
            name,
            "holds a NUL byte".to_string(),
        )
    })
}

impl ObjectStore for RadosStore {
    fn kind(&self) -> &'static str {
        "rados"
    }

    fn location(&self) -> String {
        format!("{}/{}", self.pool, self.namespace)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<bool> {
        self.writable("put", name)?;
        let cname = object_name(name)?;
        // An object of this name holds the same bytes (names of immutable objects derive from
        // their content) unless a crash cut a multi-part write short: then it is rewritten.
        let torn = match self.stat(&cname, name)? {
            Some(len) if len == data.len() as u64 => return Ok(false),
            Some(_) => true,
            None => false,
        };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !pending.put.insert(name.to_string()) {
            return Ok(false);
        }
        let first = data.len().min(MAX_SINGLE_WRITE);
        // SAFETY: a fresh write op; librados copies `data` into the op's buffer list, so the
        // slice need not outlive the call.
        let op = unsafe {
            let op = ffi::rados_create_write_op();
            if torn {
                ffi::rados_write_op_truncate(op, data.len() as u64);
            } else {
                ffi::rados_write_op_create(op, LIBRADOS_CREATE_EXCLUSIVE, std::ptr::null());
            }
            if data.len() <= MAX_SINGLE_WRITE {
                ffi::rados_write_op_write_full(op, data.as_ptr() as *const c_char, data.len());
            } else {
                ffi::rados_write_op_write(op, data.as_ptr() as *const c_char, first, 0);
            }
            op
        };
        self.send(&mut pending, name, &cname, op)?;
        let mut offset = first;
        while offset < data.len() {
            let part = &data[offset..(offset + MAX_SINGLE_WRITE).min(data.len())];
            // SAFETY: as above; writes to one object from one client are applied in order.
            let op = unsafe {
                let op = ffi::rados_create_write_op();
                ffi::rados_write_op_write(
                    op,
                    part.as_ptr() as *const c_char,
                    part.len(),
                    offset as u64,
                );
                op
            };
            self.send(&mut pending, name, &cname, op)?;
            offset += part.len();
        }
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        self.drain()
    }

    fn replace(&self, name: &str, data: &[u8]) -> Result<()> {
        self.writable("replace", name)?;
        let cname = object_name(name)?;
        if data.len() > MAX_SINGLE_WRITE {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "replace",
                name,
                format!("{} bytes is too large for a mutable object", data.len()),
            ));
        }
        // SAFETY: a fresh write op, run synchronously and released here; data is copied.
        let r = unsafe {
            let op = ffi::rados_create_write_op();
            ffi::rados_write_op_write_full(op, data.as_ptr() as *const c_char, data.len());
            let r = ffi::rados_write_op_operate(
                op,
                self.ioctx,
                cname.as_ptr(),
                std::ptr::null_mut(),
                0,
            );
            ffi::rados_release_write_op(op);
            r
        };
        if r < 0 {
            return Err(errno_error("replace", name, r));
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let cname = object_name(name)?;
        let Some(len) = self.stat(&cname, name)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len as usize];
        match self.read_at(name, 0, &mut buf) {
            Ok(()) => Ok(Some(buf)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cname = object_name(name)?;
        if buf.is_empty() {
            return match self.stat(&cname, name)? {
                None => Err(Error::new(ErrorKind::NotFound, "read", name, String::new())),
                Some(len) if len < offset => Err(short(name, offset, 0, len)),
                Some(_) => Ok(()),
            };
        }
        // Every part is sent first, then each is waited for: parts are read in parallel.
        let mut sent: Vec<(ffi::rados_completion_t, usize, usize)> = Vec::new();
        let mut result = Ok(());
        for (i, part) in buf.chunks_mut(READ_PART).enumerate() {
            let mut completion: ffi::rados_completion_t = std::ptr::null_mut();
            // SAFETY: out-pointer valid; no callbacks.
            let r = unsafe {
                ffi::rados_aio_create_completion(std::ptr::null_mut(), None, None, &mut completion)
            };
            if r < 0 {
                result = Err(errno_error("read", name, r));
                break;
            }
            let part_offset = offset + (i * READ_PART) as u64;
            // SAFETY: `part` stays borrowed (through `buf`) until every completion sent here
            // has been waited for below, before this function returns.
            let r = unsafe {
                ffi::rados_aio_read(
                    self.ioctx,
                    cname.as_ptr(),
                    completion,
                    part.as_mut_ptr() as *mut c_char,
                    part.len(),
                    part_offset,
                )
            };
            if r < 0 {
                // SAFETY: not sent: the completion is still ours.
                unsafe { ffi::rados_aio_release(completion) };
                result = Err(errno_error("read", name, r));
                break;
            }
            sent.push((completion, i * READ_PART, part.len()));
        }
        let mut got_end = None;
        for (completion, at, want) in sent {
            // SAFETY: each completion was sent above and is waited for and released once.
            let r = unsafe {
                ffi::rados_aio_wait_for_complete(completion);
                let r = ffi::rados_aio_get_return_value(completion);
                ffi::rados_aio_release(completion);
                r
            };
            if result.is_err() {
                continue;
            }
            if r < 0 {
                result = Err(errno_error("read", name, r));
            } else if (r as usize) < want && got_end.is_none() {
                got_end = Some(at + r as usize);
            }
        }
        result?;
        if let Some(end) = got_end {
            let len = offset + end as u64;
            return Err(short(name, offset, buf.len(), len));
        }
        Ok(())
    }

    fn len(&self, name: &str) -> Result<Option<u64>> {
        let cname = object_name(name)?;
        self.stat(&cname, name)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut ctx: ffi::rados_list_ctx_t = std::ptr::null_mut();
        // SAFETY: ioctx live; out-pointer valid.
        let r = unsafe { ffi::rados_nobjects_list_open(self.ioctx, &mut ctx) };
        if r < 0 {
            return Err(errno_error("list", prefix, r));
        }
        let mut names = Vec::new();
        let result = loop {
            let mut entry: *const c_char = std::ptr::null();
            // SAFETY: ctx is live; librados stores a pointer to a NUL-terminated name, valid
            // until the next call, into `entry`. (The crate declares the out-parameters with
            // one pointer level too many; the ABI is the same pointer.)
            let r = unsafe {
                ffi::rados_nobjects_list_next(
                    ctx,
                    &mut entry as *mut *const c_char as *mut *mut *const c_char,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if r == -libc::ENOENT {
                break Ok(());
            }
            if r < 0 {
                break Err(errno_error("list", prefix, r));
            }
            // SAFETY: set by the successful call above.
            let name = unsafe { CStr::from_ptr(entry) }
                .to_string_lossy()
                .into_owned();
            if name.starts_with(prefix) {
                names.push(name);
            }
        };
        // SAFETY: ctx opened above, closed once.
        unsafe { ffi::rados_nobjects_list_close(ctx) };
        result?;
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            // Skip names this store would not have written; a racing delete drops one.
            let Ok(cname) = object_name(&name) else {
                continue;
            };
            if let Some(len) = self.stat(&cname, &name)? {
                out.push(ObjectMeta { name, len });
            }
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.writable("delete", name)?;
        let cname = object_name(name)?;
        // SAFETY: ioctx live; name NUL-terminated.
        let r = unsafe { ffi::rados_remove(self.ioctx, cname.as_ptr()) };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put
            .remove(name);
        match r {
            r if r >= 0 || r == -libc::ENOENT => Ok(()),
            r => Err(errno_error("delete", name, r)),
        }
    }
}

fn short(name: &str, offset: u64, want: usize, len: u64) -> Error {
    Error::new(
        ErrorKind::Short,
        "read",
        name,
        format!("{want} bytes at offset {offset} asked for, the object is {len} bytes long"),
    )
}
