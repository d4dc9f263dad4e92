//! Reading an image's metadata and changing it in one atomic step.
//!
//! # How a change is made crash-safe
//!
//! A [`Txn`] starts from the on-disk refcounts (`old`) and keeps the refcounts the image will
//! have after the change (`new`). Everything the change writes (L2 table copies, L1 tables,
//! the snapshot table, and a complete new refcount table with new refcount blocks) goes into
//! *fresh* clusters: clusters whose refcount is 0 both before and after, so no structure the
//! current header reaches is ever overwritten. The steps are:
//!
//! 1. write the fresh clusters as the change is computed (`disk::internal::write_l2`,
//!    `write_l1`, `write_table` failpoints precede each group), then the refcount blocks and
//!    table (`write_refcounts`);
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
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// An image file opened for metadata work.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
    pub header: Header,
}

impl Image {
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

/// Memory for L2 tables kept by a [`Txn`] (1/8192 of the allocated guest data with 64 KiB
/// clusters: 256 MiB covers 2 TiB).
const L2_CACHE_BYTES: usize = 256 << 20;
/// Largest single read of adjacent L2 tables.
const PREFETCH_BYTES: usize = 8 << 20;

/// A metadata change in progress: see the module documentation.
#[derive(Debug)]
pub struct Txn<'a> {
    pub img: &'a Image,
    old: Vec<u64>,
    old_blocks: Vec<u64>,
    pub new: Vec<u64>,
    /// Failpoint group of the last write (a failpoint fires when the group changes).
    last_step: &'static str,
    cursor: usize,
    /// L2 tables read so far, by offset: each table is read from the file once (up to
    /// [`L2_CACHE_BYTES`]; beyond that, tables are read again when needed).
    l2: HashMap<u64, Rc<[u64]>>,
    l2_cached: usize,
    /// Fresh-cluster data not yet written: consecutive writes of one group are merged into one
    /// `pwrite`, issued before the next group's failpoint (or before the refcounts).
    pending: Option<(u64, Vec<u8>)>,
    /// Whether persistent bitmaps stay valid (the change leaves guest content alone).
    pub keep_bitmaps: bool,
}

impl<'a> Txn<'a> {
    pub fn begin(img: &'a Image) -> Result<Txn<'a>> {
        let (old, old_blocks) = img.read_refcounts()?;
        let new = old.clone();
        Ok(Txn {
            img,
            old,
            old_blocks,
            new,
            last_step: "",
            cursor: 1,
            l2: HashMap::new(),
            l2_cached: 0,
            pending: None,
            keep_bitmaps: false,
        })
    }

    fn is_free(&self, c: usize) -> bool {
        c > 0
            && self.old.get(c).copied().unwrap_or(0) == 0
            && self.new.get(c).copied().unwrap_or(0) == 0
    }

    /// Allocates `n` contiguous fresh clusters (refcount 0 before and after) and gives them
    /// refcount 1. Returns the byte offset.
    pub fn alloc(&mut self, n: usize) -> u64 {
        let mut c = self.cursor.max(1);
        'outer: loop {
            for k in 0..n {
                if !self.is_free(c + k) {
                    c += k + 1;
                    continue 'outer;
                }
            }
            break;
        }
        if self.new.len() < c + n {
            self.new.resize(c + n, 0);
        }
        for k in 0..n {
            self.new[c + k] = 1;
        }
        self.cursor = c + n;
        c as u64 * self.img.cs()
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

    fn decode(bytes: &[u8]) -> Rc<[u64]> {
        bytes
            .chunks_exact(8)
            .map(|c| crate::format::be64(c, 0))
            .collect()
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

    /// The L2 table at `off`, as raw 64-bit words (read from the file the first time).
    pub fn l2(&mut self, off: u64) -> Result<Rc<[u64]>> {
        if let Some(t) = self.l2.get(&off) {
            return Ok(Rc::clone(t));
        }
        self.check_l2_bounds(off)?;
        let cs = self.img.cs();
        let mut buf = vec![0u8; cs as usize];
        self.img
            .file
            .read_exact_at(&mut buf, off)
            .map_err(io("read L2 table", &self.img.path))?;
        let t = Self::decode(&buf);
        if self.l2_cached + cs as usize <= L2_CACHE_BYTES {
            self.l2_cached += cs as usize;
            self.l2.insert(off, Rc::clone(&t));
        }
        Ok(t)
    }

    /// Reads the L2 tables of these L1 tables into the cache, with one `pread` per run of
    /// adjacent tables.
    pub fn prefetch_l2(&mut self, l1s: &[&[u64]]) -> Result<()> {
        let cs = self.img.cs();
        let mut offs: Vec<u64> = l1s
            .iter()
            .flat_map(|l1| l1.iter().map(|e| e & OFFSET_MASK))
            .filter(|&o| o != 0 && !self.l2.contains_key(&o))
            .filter(|&o| o.checked_add(cs).is_some_and(|e| e <= self.img.len))
            .collect();
        offs.sort_unstable();
        offs.dedup();
        let max_run = (PREFETCH_BYTES as u64 / cs).max(1) as usize;
        let mut buf = Vec::new();
        let mut i = 0;
        while i < offs.len() {
            if self.l2_cached + cs as usize > L2_CACHE_BYTES {
                break;
            }
            let mut n = 1;
            while i + n < offs.len()
                && n < max_run
                && offs[i + n] == offs[i] + n as u64 * cs
                && self.l2_cached + (n + 1) * cs as usize <= L2_CACHE_BYTES
            {
                n += 1;
            }
            buf.resize(n * cs as usize, 0);
            self.img
                .file
                .read_exact_at(&mut buf, offs[i])
                .map_err(io("read L2 table", &self.img.path))?;
            for (k, chunk) in buf.chunks_exact(cs as usize).enumerate() {
                self.l2.insert(offs[i + k], Self::decode(chunk));
            }
            self.l2_cached += n * cs as usize;
            i += n;
        }
        Ok(())
    }

    fn corrupt_ref(&self, off: u64) -> Error {
        self.img
            .corrupt(format!("reference to {off:#x} beyond end of file"))
    }

    /// Adds or removes one path L1 entry → L2 table: the L2 table and every cluster it maps
    /// change refcount by `delta` (refcounts count paths, as QEMU does).
    pub fn add_l2_path(&mut self, l1_entry: u64, delta: i64) -> Result<()> {
        let l2_off = l1_entry & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(());
        }
        self.add(l2_off, delta)?;
        let t = self.l2(l2_off)?;
        let stride = (self.img.header.l2_entry_bytes() / 8) as usize;
        let bits = self.img.header.cluster_bits;
        let misaligned = (1u64 << bits) - 1;
        let len = self.img.len;
        for &e in t.iter().step_by(stride) {
            if e & COMPRESSED != 0 {
                match crate::format::l2_ref(e, bits) {
                    Ok(crate::format::L2Ref::Compressed { start, end }) => {
                        self.add_range(start, end, delta)?
                    }
                    Ok(_) => {}
                    Err(w) => return Err(self.img.corrupt(w)),
                }
                continue;
            }
            let o = e & OFFSET_MASK;
            if o == 0 {
                continue;
            }
            if o & misaligned != 0 {
                return Err(self
                    .img
                    .corrupt(format!("L2 entry {e:#x} is not cluster aligned")));
            }
            if o >= len {
                return Err(self.corrupt_ref(o));
            }
            // o < len, so the cluster is inside `new` (sized for the file at least).
            let c = (o >> bits) as usize;
            let Some(v) = self.new.get_mut(c) else {
                return Err(self.corrupt_ref(o));
            };
            *v = v.checked_add_signed(delta).ok_or_else(|| {
                self.img
                    .corrupt(format!("refcount of cluster {o:#x} would drop below 0"))
            })?;
        }
        Ok(())
    }

    /// Writes fresh clusters (nothing the current header reaches). The failpoint `step`
    /// fires before the first write of each group; the writes of a group that follow each
    /// other in the file are merged and issued together.
    pub fn write(&mut self, off: u64, data: Vec<u8>, step: &'static str) -> Result<()> {
        if step != self.last_step {
            self.flush()?;
            failpoint(step)?;
            self.last_step = step;
        }
        match &mut self.pending {
            Some((o, buf)) if *o + buf.len() as u64 == off => {
                buf.extend_from_slice(&data);
                Ok(())
            }
            _ => {
                self.flush()?;
                self.pending = Some((off, data));
                Ok(())
            }
        }
    }

    /// Issues the pending write, if any.
    fn flush(&mut self) -> Result<()> {
        match self.pending.take() {
            Some((off, data)) => self
                .img
                .file
                .write_all_at(&data, off)
                .map_err(io("write new metadata", &self.img.path)),
            None => Ok(()),
        }
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
        self.write(off, buf, step).map(|()| off)
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
        for (off, data) in rb_writes {
            self.write(off, data, step)?;
        }
        self.write(rt_off, rt, step)?;
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
