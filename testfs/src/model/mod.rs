//! The file system itself, without FUSE: two trees of inodes.
//!
//! - **current**: what processes see — every write, create, rename, at once.
//! - **durable**: what a disk would hold after a power cut. A file's data, size and mode
//!   reach it only when the file is `fsync`ed or `fdatasync`ed; a directory's entries only
//!   when the directory is `fsync`ed (an entry made durable before its file's data is, names
//!   an empty file of that inode).
//!
//! [`Model::reboot`] makes current what was durable (the power cut), keeping inode numbers.
//! File data lives in 4 KiB blocks shared between the two trees (copy on write), so a fsync
//! costs one pointer copy per block of the file, not a copy of its data.
//!
//! Errors are `errno` values. Faults ([`Fault`]) make chosen calls on chosen paths fail; a
//! capacity makes writes beyond it fail with `ENOSPC`, as a full disk does.

mod durable;
mod io;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// An inode number; the root is 1.
pub type Ino = u64;
/// The root directory.
pub const ROOT: Ino = 1;
/// Block size of file data.
pub const BLOCK: u64 = 4096;

type Block = Arc<[u8; BLOCK as usize]>;

/// Result of a file system call: `Err(errno)`.
pub type Res<T> = Result<T, i32>;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Unix socket, fifo or device node (no data).
    Special,
}

#[derive(Debug, Clone)]
enum Data {
    File {
        size: u64,
        blocks: BTreeMap<u64, Block>,
    },
    Dir(BTreeMap<OsString, Ino>),
    Symlink(PathBuf),
    Special {
        rdev: u32,
        kind_bits: u32,
    },
}

#[derive(Debug, Clone)]
struct Node {
    data: Data,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    ctime: SystemTime,
    atime: SystemTime,
    /// Where it was last linked: (parent, name), for fault paths.
    at: (Ino, OsString),
}

impl Node {
    fn kind(&self) -> Kind {
        match self.data {
            Data::File { .. } => Kind::File,
            Data::Dir(_) => Kind::Dir,
            Data::Symlink(_) => Kind::Symlink,
            Data::Special { .. } => Kind::Special,
        }
    }

    /// The same inode with no data: what a durable directory entry names before the
    /// inode's own data was synced.
    fn empty_like(&self) -> Node {
        let mut n = self.clone();
        n.data = match &self.data {
            Data::File { .. } => Data::File {
                size: 0,
                blocks: BTreeMap::new(),
            },
            Data::Dir(_) => Data::Dir(BTreeMap::new()),
            other => other.clone(),
        };
        n
    }
}

/// Attributes of an inode.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// Kind.
    pub kind: Kind,
    /// File type bits of a special node (`S_IFSOCK`, `S_IFIFO`, …), else 0.
    pub kind_bits: u32,
    /// Size in bytes.
    pub size: u64,
    /// Blocks of 512 bytes in use.
    pub blocks: u64,
    /// Permission bits.
    pub perm: u16,
    /// Links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device of a special node.
    pub rdev: u32,
    /// Modified.
    pub mtime: SystemTime,
    /// Changed.
    pub ctime: SystemTime,
    /// Accessed.
    pub atime: SystemTime,
}

/// Which calls a [`Fault`] makes fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOn {
    /// `write`.
    Write,
    /// `write` that needs new space (a block not yet allocated): what a full disk refuses
    /// while rewrites in place still work.
    Grow,
    /// `fsync` / `fdatasync` of a file or a directory.
    Fsync,
    /// Creating a file, directory, node or link.
    Create,
    /// Every call that changes something.
    Change,
}

/// Makes calls on matching paths fail with an error.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Which calls.
    pub on: FaultOn,
    /// Paths (relative to the mount, `/`-separated) containing this.
    pub path: String,
    /// The error (`libc::ENOSPC`, `libc::EIO`, …).
    pub errno: i32,
    /// Matching calls let through before the first failure.
    pub skip: u32,
    /// Failures before the fault is spent (0: never spent).
    pub times: u32,
}

#[derive(Debug, Clone)]
struct Armed {
    fault: Fault,
    seen: u32,
    failed: u32,
}

/// The two trees and everything else the file system keeps.
#[derive(Debug)]
pub struct Model {
    cur: HashMap<Ino, Node>,
    dur: HashMap<Ino, Node>,
    next: Ino,
    opens: HashMap<Ino, u32>,
    /// Bytes of file data in the current tree at most (`None`: unlimited).
    pub capacity: Option<u64>,
    used_blocks: u64,
    faults: Vec<Armed>,
    /// Every call fails with `EIO` (between the moment of a power cut and the reboot; the
    /// FUSE binding makes callers wait instead until [`Model::draining`]).
    pub frozen: bool,
    /// The processes of a power cut are dead: frozen calls may fail now.
    pub draining: bool,
    /// Faults that fired, as `(call, path, errno)`.
    pub fired: Vec<(FaultOn, String, i32)>,
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn valid_name(name: &OsStr) -> Res<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    if b.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    Ok(())
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    /// An empty file system: the root directory, durable.
    pub fn new() -> Model {
        let root = Node {
            data: Data::Dir(BTreeMap::new()),
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: now(),
            ctime: now(),
            atime: now(),
            at: (ROOT, OsString::new()),
        };
        let mut cur = HashMap::new();
        cur.insert(ROOT, root.clone());
        let mut dur = HashMap::new();
        dur.insert(ROOT, root);
        Model {
            cur,
            dur,
            next: ROOT + 1,
            opens: HashMap::new(),
            capacity: None,
            used_blocks: 0,
            faults: Vec::new(),
            frozen: false,
            draining: false,
            fired: Vec::new(),
        }
    }

    /// Arms a fault.
    pub fn inject(&mut self, fault: Fault) {
        self.faults.push(Armed {
            fault,
            seen: 0,
            failed: 0,
        });
    }

    /// Disarms every fault.
    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// The path of an inode from the root, as last linked (`""` for the root).
    pub fn path(&self, ino: Ino) -> String {
        let mut parts = Vec::new();
        let mut i = ino;
        for _ in 0..256 {
            if i == ROOT {
                break;
            }
            let Some(n) = self.cur.get(&i).or_else(|| self.dur.get(&i)) else {
                break;
            };
            parts.push(n.at.1.to_string_lossy().to_string());
            i = n.at.0;
        }
        parts.reverse();
        parts.join("/")
    }

    fn check(&mut self, on: FaultOn, ino: Ino, name: Option<&OsStr>) -> Res<()> {
        if self.frozen {
            return Err(libc::EIO);
        }
        if self.faults.is_empty() {
            return Ok(());
        }
        let mut path = self.path(ino);
        if let Some(n) = name {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(&n.to_string_lossy());
        }
        for a in &mut self.faults {
            let f = &a.fault;
            let applies = f.on == on
                || (f.on == FaultOn::Change && !matches!(on, FaultOn::Fsync | FaultOn::Grow));
            if !applies || !path.contains(&f.path) || (f.times > 0 && a.failed >= f.times) {
                continue;
            }
            a.seen += 1;
            if a.seen > f.skip {
                a.failed += 1;
                self.fired.push((on, path.clone(), f.errno));
                return Err(f.errno);
            }
        }
        Ok(())
    }

    fn node(&self, ino: Ino) -> Res<&Node> {
        self.cur.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: Ino) -> Res<&mut Node> {
        self.cur.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn entries(&self, dir: Ino) -> Res<&BTreeMap<OsString, Ino>> {
        match &self.node(dir)?.data {
            Data::Dir(e) => Ok(e),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: Ino) -> Res<&mut BTreeMap<OsString, Ino>> {
        match &mut self.node_mut(dir)?.data {
            Data::Dir(e) => Ok(e),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn nlink(&self, ino: Ino) -> u32 {
        // Counted, not kept: links are few and this stays right through every rename.
        let mut n = 0;
        for node in self.cur.values() {
            if let Data::Dir(e) = &node.data {
                n += e.values().filter(|i| **i == ino).count() as u32;
            }
        }
        n
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: Ino) -> Res<Attr> {
        if self.frozen {
            return Err(libc::EIO);
        }
        let n = self.node(ino)?;
        let (size, blocks, rdev, kind_bits) = match &n.data {
            Data::File { size, blocks } => (*size, blocks.len() as u64 * (BLOCK / 512), 0, 0),
            Data::Dir(e) => (e.len() as u64, 0, 0, 0),
            Data::Symlink(t) => (t.as_os_str().len() as u64, 0, 0, 0),
            Data::Special { rdev, kind_bits } => (0, 0, *rdev, *kind_bits),
        };
        let nlink = match n.data {
            Data::Dir(_) => 2,
            _ => self.nlink(ino).max(u32::from(ino == ROOT)),
        };
        Ok(Attr {
            ino,
            kind: n.kind(),
            kind_bits,
            size,
            blocks,
            perm: (n.mode & 0o7777) as u16,
            nlink,
            uid: n.uid,
            gid: n.gid,
            rdev,
            mtime: n.mtime,
            ctime: n.ctime,
            atime: n.atime,
        })
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Res<Attr> {
        if self.frozen {
            return Err(libc::EIO);
        }
        let ino = *self.entries(parent)?.get(name).ok_or(libc::ENOENT)?;
        self.getattr(ino)
    }

    fn add(
        &mut self,
        parent: Ino,
        name: &OsStr,
        data: Data,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Res<Attr> {
        valid_name(name)?;
        self.check(FaultOn::Create, parent, Some(name))?;
        if self.entries(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        let t = now();
        self.cur.insert(
            ino,
            Node {
                data,
                mode: mode & 0o7777,
                uid,
                gid,
                mtime: t,
                ctime: t,
                atime: t,
                at: (parent, name.to_os_string()),
            },
        );
        self.entries_mut(parent)?.insert(name.to_os_string(), ino);
        let p = self.node_mut(parent)?;
        p.mtime = t;
        p.ctime = t;
        self.getattr(ino)
    }

    /// Creates an empty regular file.
    pub fn create(
        &mut self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Res<Attr> {
        let data = Data::File {
            size: 0,
            blocks: BTreeMap::new(),
        };
        self.add(parent, name, data, mode, uid, gid)
    }

    /// Creates a node: a regular file, or a socket, fifo or device (`mode` has the type).
    pub fn mknod(
        &mut self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> Res<Attr> {
        let kind_bits = mode & libc::S_IFMT;
        if kind_bits == libc::S_IFREG || kind_bits == 0 {
            return self.create(parent, name, mode, uid, gid);
        }
        self.add(
            parent,
            name,
            Data::Special { rdev, kind_bits },
            mode,
            uid,
            gid,
        )
    }

    /// Creates a directory.
    pub fn mkdir(&mut self, parent: Ino, name: &OsStr, mode: u32, uid: u32, gid: u32) -> Res<Attr> {
        self.add(parent, name, Data::Dir(BTreeMap::new()), mode, uid, gid)
    }

    /// Creates a symbolic link.
    pub fn symlink(
        &mut self,
        parent: Ino,
        name: &OsStr,
        target: &std::path::Path,
        uid: u32,
        gid: u32,
    ) -> Res<Attr> {
        self.add(
            parent,
            name,
            Data::Symlink(target.to_path_buf()),
            0o777,
            uid,
            gid,
        )
    }

    /// The target of a symbolic link.
    pub fn readlink(&self, ino: Ino) -> Res<PathBuf> {
        match &self.node(ino)?.data {
            Data::Symlink(t) => Ok(t.clone()),
            _ => Err(libc::EINVAL),
        }
    }

    /// Adds a hard link.
    pub fn link(&mut self, ino: Ino, parent: Ino, name: &OsStr) -> Res<Attr> {
        valid_name(name)?;
        self.check(FaultOn::Create, parent, Some(name))?;
        if self.node(ino)?.kind() == Kind::Dir {
            return Err(libc::EPERM);
        }
        if self.entries(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        self.entries_mut(parent)?.insert(name.to_os_string(), ino);
        let n = self.node_mut(ino)?;
        n.ctime = now();
        n.at = (parent, name.to_os_string());
        self.getattr(ino)
    }

    /// Removes an inode nobody links or holds open any more.
    fn maybe_free(&mut self, ino: Ino) {
        if self.opens.get(&ino).copied().unwrap_or(0) > 0 || self.nlink(ino) > 0 {
            return;
        }
        if let Some(Node {
            data: Data::File { blocks, .. },
            ..
        }) = self.cur.remove(&ino)
        {
            self.used_blocks -= blocks.len() as u64;
        }
    }

    /// Removes a name of a non-directory.
    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> Res<()> {
        self.check(FaultOn::Change, parent, Some(name))?;
        let ino = *self.entries(parent)?.get(name).ok_or(libc::ENOENT)?;
        if self.node(ino)?.kind() == Kind::Dir {
            return Err(libc::EISDIR);
        }
        self.entries_mut(parent)?.remove(name);
        self.maybe_free(ino);
        Ok(())
    }

    /// Removes an empty directory.
    pub fn rmdir(&mut self, parent: Ino, name: &OsStr) -> Res<()> {
        self.check(FaultOn::Change, parent, Some(name))?;
        let ino = *self.entries(parent)?.get(name).ok_or(libc::ENOENT)?;
        if !self.entries(ino)?.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.entries_mut(parent)?.remove(name);
        self.maybe_free(ino);
        Ok(())
    }

    /// Renames; `noreplace` fails if the target exists.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        noreplace: bool,
    ) -> Res<()> {
        valid_name(newname)?;
        self.check(FaultOn::Change, parent, Some(name))?;
        let ino = *self.entries(parent)?.get(name).ok_or(libc::ENOENT)?;
        if let Some(&old) = self.entries(newparent)?.get(newname) {
            if noreplace {
                return Err(libc::EEXIST);
            }
            if old == ino {
                return Ok(());
            }
            match (self.node(ino)?.kind(), self.node(old)?.kind()) {
                (Kind::Dir, Kind::Dir) if !self.entries(old)?.is_empty() => {
                    return Err(libc::ENOTEMPTY)
                }
                (Kind::Dir, Kind::Dir) => {}
                (Kind::Dir, _) => return Err(libc::ENOTDIR),
                (_, Kind::Dir) => return Err(libc::EISDIR),
                _ => {}
            }
        }
        // A directory may not move into itself.
        let mut up = newparent;
        for _ in 0..256 {
            if up == ino {
                return Err(libc::EINVAL);
            }
            if up == ROOT {
                break;
            }
            up = self.node(up)?.at.0;
        }
        self.entries_mut(parent)?.remove(name);
        let replaced = self
            .entries_mut(newparent)?
            .insert(newname.to_os_string(), ino);
        let n = self.node_mut(ino)?;
        n.ctime = now();
        n.at = (newparent, newname.to_os_string());
        if let Some(old) = replaced {
            self.maybe_free(old);
        }
        Ok(())
    }

    /// Changes attributes; `size` truncates or extends.
    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &mut self,
        ino: Ino,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Res<Attr> {
        self.check(FaultOn::Change, ino, None)?;
        if let Some(size) = size {
            self.truncate(ino, size)?;
        }
        let n = self.node_mut(ino)?;
        if let Some(m) = mode {
            n.mode = m & 0o7777;
        }
        if let Some(u) = uid {
            n.uid = u;
        }
        if let Some(g) = gid {
            n.gid = g;
        }
        if let Some(t) = atime {
            n.atime = t;
        }
        if let Some(t) = mtime {
            n.mtime = t;
        }
        n.ctime = now();
        self.getattr(ino)
    }

    /// Counts an open handle of `ino`.
    pub fn open(&mut self, ino: Ino) -> Res<()> {
        if self.frozen {
            return Err(libc::EIO);
        }
        self.node(ino)?;
        *self.opens.entry(ino).or_default() += 1;
        Ok(())
    }

    /// Drops an open handle of `ino`.
    pub fn release(&mut self, ino: Ino) {
        if let Some(n) = self.opens.get_mut(&ino) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.opens.remove(&ino);
                self.maybe_free(ino);
            }
        }
    }

    /// Entries of a directory: (inode, kind, name), `.` and `..` first.
    pub fn readdir(&self, ino: Ino) -> Res<Vec<(Ino, Kind, OsString)>> {
        if self.frozen {
            return Err(libc::EIO);
        }
        let node = self.node(ino)?;
        let Data::Dir(entries) = &node.data else {
            return Err(libc::ENOTDIR);
        };
        let mut out = vec![
            (ino, Kind::Dir, OsString::from(".")),
            (node.at.0, Kind::Dir, OsString::from("..")),
        ];
        for (name, child) in entries {
            let kind = self.cur.get(child).map_or(Kind::File, Node::kind);
            out.push((*child, kind, name.clone()));
        }
        Ok(out)
    }

    /// (total blocks, free blocks) of [`BLOCK`] bytes, for `statfs`.
    pub fn statfs(&self) -> (u64, u64) {
        let total = self.capacity.map_or(1 << 24, |c| c / BLOCK);
        (total, total.saturating_sub(self.used_blocks))
    }

    /// Inodes in the current tree (for tests of this crate).
    pub fn inodes(&self) -> usize {
        self.cur.len()
    }
}
