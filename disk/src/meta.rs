//! Reading an image's metadata and changing it in one atomic step.
//!
//! # How a change is made crash-safe
//!
//! A [`Txn`] starts from the on-disk refcounts (remembering which clusters were free,
//! `was_free`) and keeps the refcounts the image will have after the change (`new`).
//! Everything the change writes (L2 table copies, L1 tables, the snapshot table, and a
//! complete new refcount table with new refcount blocks) goes into *fresh* clusters:
//! clusters whose refcount is 0 both before and after, so no structure the current header
//! reaches is ever overwritten. Where the active L1 table needs an L2 table with other
//! COPIED flags, it may instead point to an existing table that already holds exactly those
//! entries (apply: the old active table; delete: the deleted snapshot's table); that table
//! is not written either, and only refcounts (themselves written fresh) change. The steps
//! are:
//!
//! 1. write the fresh clusters as the change is computed, adjacent writes of a group merged
//!    (`disk::internal::write_l2`, `write_l1`, `write_table` failpoints precede each
//!    group), then the refcount blocks and table (`write_refcounts`);
//! 2. `fdatasync` (`disk::internal::sync_new`);
//! 3. write header bytes 24..96 — L1 table, refcount table, snapshot table, size and feature
//!    fields — in one write inside the first sector (`disk::internal::write_header`): the
//!    commit point;
//! 4. `fdatasync` (`disk::internal::sync_header`).
//!
//! A crash before step 3 leaves the old image untouched (the fresh clusters have refcount 0
//! and nothing refers to them); after it, the new image is complete. The old L1 table, old
//! snapshot table and old refcount structures are freed by the same switch, because the new
//! refcounts already count them as free. Existing clusters are never modified in place, so
//! neither leaks nor corruptions can result from a crash.

use crate::error::{io, Error, Result};
use crate::format::{Header, COMPRESSED, MAX_SNAPSHOT_TABLE_BYTES, OFFSET_MASK};
use crate::table;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// An image file opened for metadata work.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
    pub header: Header,
}

impl Image {
    /// Makes what the image holds now durable (`fdatasync`): an answer read from it, such as
    /// "this snapshot exists", may rest on writes an interrupted process never synced.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io("fdatasync", &self.path))
    }

    /// Opens and parses the header. `writable` also checks that this crate may modify it and
    /// locks it against QEMU and other writers (see `lock`) until dropped.
    pub fn open(path: &Path, writable: bool) -> Result<Image> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io("open image", path))?;
        let len = file.metadata().map_err(io("stat image", path))?.len();
        // The header and its extensions lie in the first cluster: read 64 KiB, and the rest
        // of the cluster only for larger clusters.
        let mut first = vec![0u8; len.min(1 << 16) as usize];
        file.read_exact_at(&mut first, 0)
            .map_err(io("read header", path))?;
        if first.len() >= 24 {
            let bits = crate::format::be32(&first, 20);
            if (17..=21).contains(&bits) {
                let want = len.min(1 << bits) as usize;
                let have = first.len();
                first.resize(want, 0);
                file.read_exact_at(&mut first[have..], have as u64)
                    .map_err(io("read header", path))?;
            }
        }
        let header = Header::parse(path, &first, len)?;
        if writable {
            header.check_writable(path)?;
            crate::lock::exclusive(&file, path)?;
        }
        Ok(Image {
            path: path.to_path_buf(),
            file,
            len,
            header,
        })
    }

    pub fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    pub fn corrupt(&self, what: impl Into<String>) -> Error {
        Error::Corruption {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// Reads `len` bytes at `off`, refusing anything past the end of the file (so that no
    /// length read from the image can cause a huge allocation).
    pub fn read(&self, off: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(self.corrupt(format!("{what} at {off:#x} (+{len}) beyond end of file")));
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, off)
            .map_err(io("read metadata", &self.path))?;
        Ok(buf)
    }

    pub fn read_u64s(&self, off: u64, n: u64, what: &str) -> Result<Vec<u64>> {
        let b = self.read(off, n * 8, what)?;
        Ok(b.chunks_exact(8)
            .map(|c| crate::format::be64(c, 0))
            .collect())
    }

    /// Reads an L1 table (active or a snapshot's).
    pub fn read_l1(&self, off: u64, n: u32) -> Result<Vec<u64>> {
        let l1 = self.read_u64s(off, u64::from(n), "L1 table")?;
        for e in &l1 {
            let o = e & crate::format::OFFSET_MASK;
            if !o.is_multiple_of(self.cs()) || o >= self.len {
                return Err(self.corrupt(format!("L1 entry {e:#x} points outside the file")));
            }
        }
        Ok(l1)
    }

    /// Reads an L2 table as raw 64-bit words.
    pub fn read_l2(&self, off: u64) -> Result<Vec<u64>> {
        self.read_u64s(off, self.cs() / 8, "L2 table")
    }

    /// The snapshot table and its length in bytes.
    pub fn read_snapshots(&self) -> Result<(Vec<table::Entry>, u64)> {
        let h = &self.header;
        if h.nb_snapshots == 0 {
            return Ok((Vec::new(), 0));
        }
        let cap = (self.len - h.snapshots_offset).min(MAX_SNAPSHOT_TABLE_BYTES);
        let mut want = cap.min(64 * 1024);
        loop {
            let buf = self.read(h.snapshots_offset, want, "snapshot table")?;
            let l1_max = crate::format::MAX_L1_ENTRIES;
            if let Some((entries, used)) =
                table::parse(&self.path, &buf, h.nb_snapshots, self.cs(), l1_max)?
            {
                return Ok((entries, used as u64));
            }
            if want == cap {
                return Err(self
                    .corrupt("snapshot table runs past the end of the file or QEMU's size limit"));
            }
            want = (want * 4).min(cap);
        }
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.header.refcount_order
    }

    /// The refcount of every cluster of the file, and the offsets of the refcount blocks.
    pub fn read_refcounts(&self) -> Result<(Vec<u64>, Vec<u64>)> {
        let cs = self.cs();
        let nb = self.len.div_ceil(cs) as usize;
        let bits = self.refcount_bits();
        let epb = (cs * 8 / u64::from(bits)) as usize;
        let rt = self.read_u64s(
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) * cs / 8,
            "refcount table",
        )?;
        let mut rc = vec![0u64; nb];
        let mut blocks = Vec::new();
        for (i, e) in rt.iter().enumerate() {
            let off = e & !511;
            if off == 0 {
                continue;
            }
            if off % cs != 0 {
                return Err(self.corrupt(format!("refcount block {off:#x} not cluster aligned")));
            }
            blocks.push(off);
            let first = i.saturating_mul(epb);
            if first >= nb {
                continue;
            }
            let block = self.read(off, cs, "refcount block")?;
            for j in 0..epb.min(nb - first) {
                rc[first + j] = get_refcount(&block, j, bits);
            }
        }
        Ok((rc, blocks))
    }
}

pub fn get_refcount(block: &[u8], j: usize, bits: u32) -> u64 {
    if bits >= 8 {
        let n = (bits / 8) as usize;
        block[j * n..j * n + n]
            .iter()
            .fold(0u64, |a, b| (a << 8) | u64::from(*b))
    } else {
        let bit = j * bits as usize;
        (u64::from(block[bit / 8]) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

pub fn set_refcount(block: &mut [u8], j: usize, bits: u32, v: u64) {
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let be = v.to_be_bytes();
        block[j * n..j * n + n].copy_from_slice(&be[8 - n..]);
    } else {
        let bit = j * bits as usize;
        let mask = ((1u16 << bits) - 1) as u8;
        let b = &mut block[bit / 8];
        *b = (*b & !(mask << (bit % 8))) | (((v as u8) & mask) << (bit % 8));
    }
}

/// Largest single read of L2 tables that follow each other in the file and in the L1 table.
/// Buffers are reused rather than tables kept: touching fresh memory costs more than reading
/// a table from the page cache twice.
const L2_RUN_BYTES: u64 = 256 << 10;
/// Largest merged write.
const PENDING_BYTES: usize = 256 << 10;

/// Most holes of the file that [`file_holes`] lists.
const MAX_HOLES: usize = 4096;

/// The holes of the image file as cluster ranges (a cluster partly in a hole counts), for
/// allocation to avoid. Best effort: an error or too many holes end the list early.
fn file_holes(img: &Image) -> Vec<(usize, usize)> {
    use nix::unistd::{lseek, Whence};
    let cs = img.cs() as i64;
    let end = img.len as i64;
    let mut holes = Vec::new();
    let mut at = 0i64;
    while at < end && holes.len() < MAX_HOLES {
        let Ok(h) = lseek(&img.file, at, Whence::SeekHole) else {
            break;
        };
        if h >= end {
            break;
        }
        let d = lseek(&img.file, h, Whence::SeekData)
            .unwrap_or(end)
            .min(end);
        if d <= h {
            break;
        }
        holes.push(((h / cs) as usize, (d + cs - 1).div_euclid(cs) as usize));
        at = d;
    }
    holes
}

/// A metadata change in progress: see the module documentation.
#[derive(Debug)]
pub struct Txn<'a> {
    pub img: &'a Image,
    /// Whether each cluster had refcount 0 before the change (one byte per cluster rather
    /// than a copy of the refcounts: less memory to touch).
    was_free: Vec<bool>,
    old_blocks: Vec<u64>,
    pub new: Vec<u64>,
    /// Failpoint group of the last write (a failpoint fires when the group changes).
    last_step: &'static str,
    cursor: usize,
    /// Cluster ranges (sorted) that are holes in the file, as far as known.
    holes: Vec<(usize, usize)>,
    /// L2 tables being read, in L1 order (see [`Txn::load_l2`]).
    l2buf: Vec<u8>,
    l2buf_off: u64,
    /// Fresh-cluster data not yet written: consecutive writes of one group are merged into
    /// one `pwrite`, issued when the next write does not follow, when [`PENDING_BYTES`] are
    /// reached, or before the next group's failpoint.
    pending: Vec<u8>,
    pending_off: u64,
    /// Whether persistent bitmaps stay valid (the change leaves guest content alone).
    pub keep_bitmaps: bool,
}

impl<'a> Txn<'a> {
    pub fn begin(img: &'a Image) -> Result<Txn<'a>> {
        let (new, old_blocks) = img.read_refcounts()?;
        let was_free = new.iter().map(|v| *v == 0).collect();
        Ok(Txn {
            img,
            was_free,
            old_blocks,
            new,
            holes: file_holes(img),
            last_step: "",
            cursor: 1,
            l2buf: Vec::new(),
            l2buf_off: 0,
            pending: Vec::new(),
            pending_off: 0,
            keep_bitmaps: false,
        })
    }

    fn is_free(&self, c: usize) -> bool {
        c > 0
            && self.was_free.get(c).copied().unwrap_or(true)
            && self.new.get(c).copied().unwrap_or(0) == 0
    }

    fn in_hole(&self, c: usize) -> bool {
        let i = self.holes.partition_point(|h| h.1 <= c);
        self.holes.get(i).is_some_and(|h| h.0 <= c)
    }

    /// First run of `n` fresh clusters from the cursor on, optionally outside holes.
    fn first_fit(&self, n: usize, avoid_holes: bool) -> usize {
        let mut c = self.cursor.max(1);
        'outer: loop {
            for k in 0..n {
                if !self.is_free(c + k) || (avoid_holes && self.in_hole(c + k)) {
                    c += k + 1;
                    continue 'outer;
                }
            }
            return c;
        }
    }

    /// Allocates `n` contiguous fresh clusters (refcount 0 before and after) and gives them
    /// refcount 1. Returns the byte offset. Prefers clusters the file system already backs
    /// with blocks (writing into a hole or past the end makes the `fdatasync` allocate and
    /// journal), then the first fit.
    pub fn alloc(&mut self, n: usize) -> u64 {
        let cs = self.img.cs();
        let mut c = self.first_fit(n, true);
        if (c + n) as u64 * cs > self.img.len {
            c = self.first_fit(n, false);
        }
        if self.new.len() < c + n {
            self.new.resize(c + n, 0);
        }
        for k in 0..n {
            self.new[c + k] = 1;
        }
        self.cursor = c + n;
        c as u64 * cs
    }

    /// Adds `delta` to the refcount of the cluster holding byte `off`.
    pub fn add(&mut self, off: u64, delta: i64) -> Result<()> {
        let c = (off / self.img.cs()) as usize;
        if off >= self.img.len {
            return Err(self
                .img
                .corrupt(format!("reference to {off:#x} beyond end of file")));
        }
        if self.new.len() <= c {
            self.new.resize(c + 1, 0);
        }
        self.new[c] = self.new[c].checked_add_signed(delta).ok_or_else(|| {
            self.img
                .corrupt(format!("refcount of cluster {off:#x} would drop below 0"))
        })?;
        Ok(())
    }

    /// Adds `delta` to every cluster overlapping bytes `start..end`.
    pub fn add_range(&mut self, start: u64, end: u64, delta: i64) -> Result<()> {
        let cs = self.img.cs();
        let mut c = start / cs;
        while c * cs < end {
            self.add(c * cs, delta)?;
            c += 1;
        }
        Ok(())
    }

    pub fn refcount(&self, off: u64) -> u64 {
        self.new
            .get((off / self.img.cs()) as usize)
            .copied()
            .unwrap_or(0)
    }

    fn check_l2_bounds(&self, off: u64) -> Result<()> {
        if off
            .checked_add(self.img.cs())
            .is_none_or(|e| e > self.img.len)
        {
            return Err(self
                .img
                .corrupt(format!("L2 table at {off:#x} beyond end of file")));
        }
        Ok(())
    }

    /// Makes the L2 table of `l1[i]` (non-zero) available in the read buffer and returns its
    /// position there. When the buffer does not hold it, reads it together with the tables of
    /// the following L1 entries that follow it in the file (one `pread` for a run of tables
    /// written together).
    pub fn load_l2(&mut self, l1: &[u64], i: usize) -> Result<usize> {
        let cs = self.img.cs();
        let off = l1.get(i).map_or(0, |e| e & OFFSET_MASK);
        self.check_l2_bounds(off)?;
        let have = self.l2buf.len() as u64;
        if off >= self.l2buf_off && off + cs <= self.l2buf_off + have {
            return Ok((off - self.l2buf_off) as usize);
        }
        let mut n = 1u64;
        while n * cs < L2_RUN_BYTES
            && l1
                .get(i + n as usize)
                .is_some_and(|e| e & OFFSET_MASK == off + n * cs)
            && off + (n + 1) * cs <= self.img.len
        {
            n += 1;
        }
        self.l2buf.resize((n * cs) as usize, 0);
        self.l2buf_off = off;
        if let Err(e) = self.img.file.read_exact_at(&mut self.l2buf, off) {
            self.l2buf.clear();
            return Err(io("read L2 table", &self.img.path)(e));
        }
        Ok(0)
    }

    /// Reads the L2 table at `off` into `out` as raw 64-bit words.
    pub fn read_l2_into(&self, off: u64, bytes: &mut Vec<u8>, out: &mut Vec<u64>) -> Result<()> {
        self.check_l2_bounds(off)?;
        bytes.resize(self.img.cs() as usize, 0);
        self.img
            .file
            .read_exact_at(bytes, off)
            .map_err(io("read L2 table", &self.img.path))?;
        out.clear();
        out.extend(bytes.chunks_exact(8).map(|c| crate::format::be64(c, 0)));
        Ok(())
    }

    /// The L2 table of `l1[i]` (non-zero) as raw 64-bit words, in `out`.
    pub fn l2_words(&mut self, l1: &[u64], i: usize, out: &mut Vec<u64>) -> Result<()> {
        let at = self.load_l2(l1, i)?;
        let cs = self.img.cs() as usize;
        out.clear();
        out.extend(
            self.l2buf[at..at + cs]
                .chunks_exact(8)
                .map(|c| crate::format::be64(c, 0)),
        );
        Ok(())
    }

    /// Adds or removes the paths of every entry of `l1`: see [`Txn::add_l2_path`].
    pub fn add_l2_paths(&mut self, l1: &[u64], delta: i64) -> Result<()> {
        for i in 0..l1.len() {
            self.add_l2_path(l1, i, delta)?;
        }
        Ok(())
    }

    /// Adds or removes one path L1 entry `l1[i]` → L2 table: the L2 table and every cluster
    /// it maps change refcount by `delta` (refcounts count paths, as QEMU does).
    pub fn add_l2_path(&mut self, l1: &[u64], i: usize, delta: i64) -> Result<()> {
        let l2_off = l1.get(i).map_or(0, |e| e & OFFSET_MASK);
        if l2_off == 0 {
            return Ok(());
        }
        self.add(l2_off, delta)?;
        let at = self.load_l2(l1, i)?;
        let cs = self.img.cs() as usize;
        let step = self.img.header.l2_entry_bytes() as usize;
        let bits = self.img.header.cluster_bits;
        let misaligned = (1u64 << bits) - 1;
        let img = self.img;
        let corrupt_ref = |o: u64| img.corrupt(format!("reference to {o:#x} beyond end of file"));
        let new = &mut self.new;
        for w in self.l2buf[at..at + cs].chunks_exact(step) {
            let e = crate::format::be64(w, 0);
            let (start, end) = if e & COMPRESSED != 0 {
                match crate::format::l2_ref(e, bits) {
                    Ok(crate::format::L2Ref::Compressed { start, end }) => (start, end),
                    Ok(_) => continue,
                    Err(w) => return Err(img.corrupt(w)),
                }
            } else {
                let o = e & OFFSET_MASK;
                if o == 0 {
                    continue;
                }
                if o & misaligned != 0 {
                    return Err(img.corrupt(format!("L2 entry {e:#x} is not cluster aligned")));
                }
                (o, o + 1)
            };
            // Every cluster overlapping start..end.
            let mut c = start >> bits;
            while c << bits < end {
                let o = c << bits;
                if o >= img.len {
                    return Err(corrupt_ref(o));
                }
                let Some(v) = new.get_mut(c as usize) else {
                    return Err(corrupt_ref(o));
                };
                *v = v.checked_add_signed(delta).ok_or_else(|| {
                    img.corrupt(format!("refcount of cluster {o:#x} would drop below 0"))
                })?;
                c += 1;
            }
        }
        Ok(())
    }

    /// Writes fresh clusters (nothing the current header reaches). The failpoint `step`
    /// fires before the first write of each group; the writes of a group that follow each
    /// other in the file are merged and issued together.
    pub fn write(&mut self, off: u64, data: &[u8], step: &'static str) -> Result<()> {
        if step != self.last_step {
            self.flush()?;
            failpoint(step)?;
            self.last_step = step;
        }
        if !self.pending.is_empty()
            && (self.pending_off + self.pending.len() as u64 != off
                || self.pending.len() + data.len() > PENDING_BYTES)
        {
            self.flush()?;
        }
        if self.pending.is_empty() {
            self.pending_off = off;
        }
        self.pending.extend_from_slice(data);
        Ok(())
    }

    /// Issues the pending write, if any (its buffer is kept for reuse).
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self
            .img
            .file
            .write_all_at(&self.pending, self.pending_off)
            .map_err(io("write new metadata", &self.img.path));
        self.pending.clear();
        r
    }

    /// Big-endian bytes of `words`, padded to whole clusters.
    pub fn cluster_bytes(&self, words: &[u64]) -> Vec<u8> {
        let cs = self.img.cs();
        let bytes = (words.len() as u64 * 8).max(1).div_ceil(cs) * cs;
        let mut buf = Vec::with_capacity(bytes as usize);
        for w in words {
            buf.extend_from_slice(&w.to_be_bytes());
        }
        buf.resize(bytes as usize, 0);
        buf
    }

    /// Writes a table of u64 into freshly allocated clusters; returns its offset.
    pub fn write_u64s(&mut self, words: &[u64], step: &'static str) -> Result<u64> {
        let buf = self.cluster_bytes(words);
        let off = self.alloc(buf.len() / self.img.cs() as usize);
        self.write(off, &buf, step).map(|()| off)
    }

    /// Frees (refcount −1) the clusters of a table of `bytes` bytes at `off`.
    pub fn free_table(&mut self, off: u64, bytes: u64) -> Result<()> {
        if off == 0 || bytes == 0 {
            return Ok(());
        }
        self.add_range(off, off.saturating_add(bytes), -1)
    }

    /// Builds the new refcount structure, writes everything, and switches the header to
    /// `header` (whose refcount table fields are filled in here).
    pub fn commit(mut self, mut header: Header) -> Result<()> {
        let img = self.img;
        let cs = img.cs();
        let bits = img.refcount_bits();
        let max = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let epb = (cs * 8 / u64::from(bits)) as usize;
        // The old refcount structures are free after the switch.
        let h = &img.header;
        self.free_table(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        )?;
        for b in std::mem::take(&mut self.old_blocks) {
            self.add(b, -1)?;
        }
        let mut blocks: BTreeMap<usize, u64> = BTreeMap::new();
        let (mut rt_off, mut rt_clusters) = (0u64, 0usize);
        loop {
            let top = self.new.iter().rposition(|v| *v != 0).map_or(0, |p| p + 1);
            let mut changed = false;
            for b in 0..top.div_ceil(epb) {
                if !blocks.contains_key(&b)
                    && self.new[b * epb..((b + 1) * epb).min(top)]
                        .iter()
                        .any(|v| *v != 0)
                {
                    let off = self.alloc(1);
                    blocks.insert(b, off);
                    changed = true;
                }
            }
            let entries = blocks.keys().next_back().map_or(1, |b| b + 1);
            let need = (entries as u64 * 8).div_ceil(cs) as usize;
            if need > rt_clusters {
                if rt_clusters > 0 {
                    for k in 0..rt_clusters {
                        self.new[(rt_off / cs) as usize + k] = 0;
                    }
                }
                rt_clusters = need + 1;
                rt_off = self.alloc(rt_clusters);
                changed = true;
            }
            if !changed {
                break;
            }
        }
        if let Some(c) = self.new.iter().position(|v| *v > max) {
            return Err(Error::Unsupported {
                path: img.path.clone(),
                what: format!(
                    "refcount of cluster {:#x} would exceed {bits}-bit refcounts; \
                     `qemu-img amend -o refcount_bits=16` widens them",
                    c as u64 * cs
                ),
            });
        }
        let mut rt = vec![0u8; rt_clusters * cs as usize];
        let mut rb_writes: Vec<(u64, Vec<u8>)> = Vec::with_capacity(blocks.len());
        for (&b, &off) in &blocks {
            rt[b * 8..b * 8 + 8].copy_from_slice(&off.to_be_bytes());
            let mut block = vec![0u8; cs as usize];
            for j in 0..epb {
                match self.new.get(b * epb + j) {
                    Some(v) => set_refcount(&mut block, j, bits, *v),
                    None => break,
                }
            }
            match rb_writes.last_mut() {
                Some((o, d)) if *o + d.len() as u64 == off => d.extend_from_slice(&block),
                _ => rb_writes.push((off, block)),
            }
        }
        header.refcount_table_offset = rt_off;
        header.refcount_table_clusters = rt_clusters as u32;
        // Clear the autoclear features this change does not maintain: all but the bitmaps,
        // which stay valid when the guest-visible content does not change.
        if !self.keep_bitmaps {
            header.autoclear = 0;
        }
        header.autoclear &= crate::format::AUTOCLEAR_BITMAPS;

        let path = &img.path;
        // Refcount blocks and table usually follow each other: one write.
        let step = "disk::internal::write_refcounts";
        for (off, data) in &rb_writes {
            self.write(*off, data, step)?;
        }
        self.write(rt_off, &rt, step)?;
        self.flush()?;
        // fdatasync also makes the new file size durable: all the file system metadata needed
        // to read the new clusters back.
        failpoint("disk::internal::sync_new")?;
        img.file
            .sync_data()
            .map_err(io("fdatasync new metadata", path))?;
        failpoint("disk::internal::write_header")?;
        let (at, bytes) = header.commit_bytes();
        img.file
            .write_all_at(&bytes, at)
            .map_err(io("write header (commit)", path))?;
        failpoint("disk::internal::sync_header")?;
        img.file.sync_data().map_err(io("fdatasync header", path))?;
        Ok(())
    }
}

/// Stops the operation here when the failpoint `name` is armed (feature `failpoints`).
#[allow(unused_variables)]
pub fn failpoint(name: &'static str) -> Result<()> {
    fail::fail_point!(name, |_| Err(Error::FailPoint(name)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_round_trip_at_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            let value = |j: usize| (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) & max;
            for j in 0..n {
                set_refcount(&mut block, j, bits, value(j));
            }
            for j in 0..n {
                assert_eq!(
                    get_refcount(&block, j, bits),
                    value(j),
                    "bits {bits} entry {j}"
                );
            }
        }
        // Sub-byte widths start at the least significant bit; wider ones are big-endian.
        let mut b = vec![0u8; 4];
        set_refcount(&mut b, 1, 1, 1);
        assert_eq!(b[0], 0b10);
        set_refcount(&mut b, 1, 16, 0x0102);
        assert_eq!(&b[2..4], &[1, 2]);
    }
}
