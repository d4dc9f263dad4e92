//! [`LocalStore`]: objects as files under one directory.
//!
//! Object `a/b/c` is the file `<dir>/a/b/c`. Directories are created mode 0700, files mode
//! 0600 whatever the umask: objects hold guest memory.
//!
//! - **put** writes a hidden temporary file `.tmp-<pid>-<n>` in the object's directory
//!   (objects of 1 MiB and more with direct I/O, as `dd oflag=direct` writes), then
//!   hard-links it to the object's name (`link` fails if the name exists: create-if-absent
//!   is atomic, and no reader ever sees a partly written object under its name) and removes
//!   the temporary name. It starts the kernel's write-back of the data at once
//!   (`sync_file_range`), so that [`ObjectStore::flush`] mostly waits for writes already
//!   under way, and remembers the file and every directory it created for that flush.
//! - **flush** `fdatasync`s every file put since the last flush, then `fsync`s their
//!   directories (deepest first, up to the store's directory and its parent).
//! - **replace** writes a temporary file, syncs it, renames it over the name and syncs the
//!   directory: durable and atomic when it returns.
//! - **delete** unlinks and syncs the directory.
//! - A store opened **read-only** creates and writes nothing: not even its directory (a
//!   missing directory is an empty store).
//!
//! After a crash, temporary files of dead processes are left behind; the next writable
//! [`LocalStore::open`] removes them. An object put but never flushed may be missing or
//! shorter than it was written; a later `put` of the same name with a different length
//! replaces it (names are content-addressed, so a length mismatch can only be such a torn
//! leftover).

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{check_name, Error, ErrorKind, ObjectMeta, ObjectStore, Result};

/// Objects at least this long are written with direct I/O.
const DIRECT_MIN: usize = 1 << 20;
/// Size of a direct-I/O buffer.
const DIRECT_BUFFER: usize = 8 << 20;
/// Alignment direct I/O needs (the page size; a multiple of every block size in use).
const ALIGN: usize = 4096;

/// Prefix of temporary file names (hidden: no object name starts with `.`).
const TMP_PREFIX: &str = ".tmp-";

/// A store of objects in a local directory. See the module documentation.
#[derive(Debug)]
pub struct LocalStore {
    dir: PathBuf,
    read_only: bool,
    /// Files put since the last flush, and directories whose entries changed.
    pending: Mutex<Pending>,
    counter: AtomicU64,
    /// Page-aligned buffers for direct writes, reused (fresh memory is slow to touch).
    buffers: Mutex<Vec<Vec<u8>>>,
}

#[derive(Debug, Default)]
struct Pending {
    files: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
}

impl LocalStore {
    /// Opens the store in `dir`. Writable: creates `dir` (mode 0700) if needed, and removes
    /// temporary files left by dead processes. Read-only: touches nothing.
    pub fn open(dir: &Path, read_only: bool) -> Result<LocalStore> {
        let store = LocalStore {
            dir: dir.to_path_buf(),
            read_only,
            pending: Mutex::new(Pending::default()),
            counter: AtomicU64::new(0),
            buffers: Mutex::new(Vec::new()),
        };
        if !read_only {
            let existed = dir.is_dir();
            mkdir(dir).map_err(|e| Error::io("create directory", "", e))?;
            if !existed {
                if let Some(parent) = dir.parent() {
                    sync_dir(parent).map_err(|e| Error::io("sync directory", "", e))?;
                }
            }
            store.remove_stale_temporaries(dir)?;
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of object `name` (checked).
    pub fn path_of(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.dir.join(name))
    }

    fn writable(&self, op: &'static str, name: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                op,
                name,
                format!("the store in {} was opened read-only", self.dir.display()),
            ));
        }
        Ok(())
    }

    /// Creates the directories of `path` below the store's directory; records new ones.
    fn make_parents(&self, path: &Path, name: &str) -> Result<()> {
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        if parent.is_dir() {
            return Ok(());
        }
        let mut missing = Vec::new();
        let mut at = parent;
        while at != self.dir && !at.is_dir() {
            missing.push(at.to_path_buf());
            match at.parent() {
                Some(p) => at = p,
                None => break,
            }
        }
        let mut pending = self.lock();
        for d in missing.iter().rev() {
            match mkdir(d) {
                Ok(()) => {}
                Err(e) => return Err(Error::io("create directory for", name, e)),
            }
            if let Some(p) = d.parent() {
                pending.dirs.insert(p.to_path_buf());
            }
            pending.dirs.insert(d.clone());
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn temp_path(&self, path: &Path) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dir = path.parent().unwrap_or(&self.dir);
        dir.join(format!("{TMP_PREFIX}{}-{n}", std::process::id()))
    }

    /// Writes `data` into a new temporary file beside `path`; returns its path and handle.
    fn write_temp(&self, path: &Path, name: &str, data: &[u8]) -> Result<(PathBuf, File)> {
        let tmp = self.temp_path(path);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io("create a temporary file for", name, e))?;
        let written = file
            .set_permissions(fs::Permissions::from_mode(0o600))
            .and_then(|()| file.write_all(data));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("write", name, e));
        }
        Ok((tmp, file))
    }

    /// Writes `data` into a new temporary file beside `path` with direct I/O (`O_DIRECT`:
    /// the data goes to the device as it is written, without filling the page cache, as
    /// `dd oflag=direct` does), through a reused page-aligned buffer; falls back to
    /// [`LocalStore::write_temp`] where the file system does not take direct I/O.
    fn write_temp_direct(&self, path: &Path, name: &str, data: &[u8]) -> Result<(PathBuf, File)> {
        if data.len() < DIRECT_MIN {
            return self.write_temp(path, name, data);
        }
        let tmp = self.temp_path(path);
        let file = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_DIRECT)
            .open(&tmp)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return self.write_temp(path, name, data);
            }
            Err(e) => return Err(Error::io("create a temporary file for", name, e)),
        };
        let mut buf = self
            .buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| vec![0u8; DIRECT_BUFFER + ALIGN]);
        let written = (|| -> std::io::Result<()> {
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            let start = buf.as_ptr().align_offset(ALIGN);
            let aligned = &mut buf[start..start + DIRECT_BUFFER];
            let mut at = 0usize;
            while at < data.len() {
                let n = (data.len() - at).min(DIRECT_BUFFER);
                aligned[..n].copy_from_slice(&data[at..at + n]);
                let padded = n.next_multiple_of(ALIGN);
                aligned[n..padded].fill(0);
                file.write_all_at(&aligned[..padded], at as u64)?;
                at += n;
            }
            file.set_len(data.len() as u64)
        })();
        self.buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buf);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("write", name, e));
        }
        Ok((tmp, file))
    }

    /// Removes `.tmp-<pid>-*` files of processes that no longer exist, in every directory.
    fn remove_stale_temporaries(&self, dir: &Path) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("list", "", e)),
        };
        let mut removed = false;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", "", e))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            let kind = entry.file_type().map_err(|e| Error::io("list", "", e))?;
            if kind.is_dir() && !file_name.starts_with('.') {
                self.remove_stale_temporaries(&entry.path())?;
            } else if let Some(rest) = file_name.strip_prefix(TMP_PREFIX) {
                let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(|pid| !process_alive(pid)) {
                    fs::remove_file(entry.path())
                        .map_err(|e| Error::io("remove a stale temporary file", "", e))?;
                    removed = true;
                }
            }
        }
        if removed {
            sync_dir(dir).map_err(|e| Error::io("sync directory", "", e))?;
        }
        Ok(())
    }

    fn walk(&self, dir: &Path, rel: &str, prefix: &str, out: &mut Vec<ObjectMeta>) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("list", prefix, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", prefix, e))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name.starts_with('.') {
                continue;
            }
            let name = if rel.is_empty() {
                file_name.to_string()
            } else {
                format!("{rel}/{file_name}")
            };
            let meta = entry.metadata().map_err(|e| Error::io("list", &name, e))?;
            if meta.is_dir() {
                let as_dir = format!("{name}/");
                if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                    self.walk(&entry.path(), &name, prefix, out)?;
                }
            } else if meta.is_file() && name.starts_with(prefix) && check_name(&name).is_ok() {
                out.push(ObjectMeta {
                    name,
                    len: meta.len(),
                });
            }
        }
        Ok(())
    }
}

impl ObjectStore for LocalStore {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<bool> {
        let path = self.path_of(name)?;
        self.writable("put", name)?;
        if let Ok(meta) = fs::metadata(&path) {
            if meta.len() == data.len() as u64 {
                return Ok(false);
            }
        }
        self.make_parents(&path, name)?;
        let (tmp, file) = self.write_temp_direct(&path, name, data)?;
        start_writeback(&file);
        let linked = match fs::hard_link(&tmp, &path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                match fs::metadata(&path) {
                    // Someone else put it meanwhile.
                    Ok(meta) if meta.len() == data.len() as u64 => Ok(false),
                    // A torn leftover of a crash: replace it.
                    _ => fs::rename(&tmp, &path)
                        .map(|()| true)
                        .map_err(|e| Error::io("rename into place", name, e)),
                }
            }
            Err(e) => Err(Error::io("link into place", name, e)),
        };
        let _ = fs::remove_file(&tmp);
        let wrote = linked?;
        if wrote {
            let mut pending = self.lock();
            pending.files.insert(path.clone());
            if let Some(parent) = path.parent() {
                pending.dirs.insert(parent.to_path_buf());
            }
        }
        Ok(wrote)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let pending = std::mem::take(&mut *self.lock());
        let result = (|| {
            for path in &pending.files {
                let name = self.name_of(path);
                match File::open(path) {
                    Ok(f) => f.sync_data().map_err(|e| Error::io("sync", &name, e))?,
                    // Deleted since it was put: nothing to make durable.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("open for sync", &name, e)),
                }
            }
            // Deepest directories first, so that a directory's own entry is synced after
            // its contents.
            let mut dirs: Vec<&PathBuf> = pending.dirs.iter().collect();
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in dirs {
                match sync_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("sync directory", &self.name_of(dir), e)),
                }
            }
            Ok(())
        })();
        if result.is_err() {
            // Try again at the next flush.
            let mut again = self.lock();
            again.files.extend(pending.files);
            again.dirs.extend(pending.dirs);
        }
        result
    }

    fn replace(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path_of(name)?;
        self.writable("replace", name)?;
        self.make_parents(&path, name)?;
        let (tmp, file) = self.write_temp(&path, name, data)?;
        let done = file
            .sync_all()
            .map_err(|e| Error::io("sync", name, e))
            .and_then(|()| fs::rename(&tmp, &path).map_err(|e| Error::io("rename", name, e)));
        if let Err(e) = done {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let parent = path.parent().unwrap_or(&self.dir);
        sync_dir(parent).map_err(|e| Error::io("sync directory of", name, e))?;
        // New directories on the way must be durable too.
        self.flush()
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path_of(name)?;
        match fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", name, e)),
        }
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let path = self.path_of(name)?;
        let file = File::open(&path).map_err(|e| Error::io("open", name, e))?;
        file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::new(
                    ErrorKind::Short,
                    "read",
                    name,
                    format!(
                        "the object ends before {} (asked {} bytes at {offset})",
                        offset + buf.len() as u64,
                        buf.len()
                    ),
                )
            } else {
                Error::io("read", name, e)
            }
        })
    }

    fn len(&self, name: &str) -> Result<Option<u64>> {
        let path = self.path_of(name)?;
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", name, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        // Start at the deepest directory the prefix names completely.
        let (start, rel) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[..i]),
            None => ("", ""),
        };
        if !start.is_empty() && check_name(start).is_err() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        self.walk(&self.dir.join(start), rel, prefix, &mut out)?;
        out.sort();
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path_of(name)?;
        self.writable("delete", name)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("delete", name, e)),
        }
        self.lock().files.remove(&path);
        let parent = path.parent().unwrap_or(&self.dir);
        sync_dir(parent).map_err(|e| Error::io("sync directory of", name, e))
    }
}

impl LocalStore {
    fn name_of(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| path.display().to_string())
    }
}

fn mkdir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Asks the kernel to start writing `file`'s dirty pages now, without waiting.
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads the descriptor, which `file` keeps open for the
    // duration of the call. Failure is harmless: flush syncs the file anyway.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return true;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
