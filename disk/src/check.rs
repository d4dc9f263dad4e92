//! Consistency check: refcounts against the references found by walking every structure,
//! and leak repair.
//!
//! References counted: the header cluster, the refcount table and blocks, the active L1
//! table, the snapshot table, every snapshot's L1 table, and for every L1 entry (of any L1
//! table) the L2 table and each cluster it maps (compressed data: every cluster its bytes
//! touch). A cluster whose refcount is below its reference count, a malformed or
//! out-of-file reference, or a COPIED flag in the active tables that disagrees with
//! "refcount == 1" is a corruption; a refcount above the reference count is a leak.
//! When the bitmaps autoclear bit is set, the persistent bitmaps are walked too (bitmap
//! directory, bitmap tables, bitmap data clusters); otherwise their clusters count as leaks,
//! as in QEMU.

use crate::error::{Error, Result};
use crate::format::{l2_ref, L2Ref, COPIED, OFFSET_MASK};
use crate::meta::{Image, Txn};
use std::collections::HashMap;
use std::path::Path;

/// Outcome of [`crate::check()`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Number of problems that can lose data (refcount too low, bad references, bad flags).
    pub corruptions: u64,
    /// Number of clusters whose refcount is higher than their references (wasted space).
    pub leaks: u64,
    /// Description of the first problems found (at most 100).
    pub messages: Vec<String>,
}

impl CheckReport {
    /// No corruption and no leak.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0
    }

    fn corruption(&mut self, what: String) {
        self.corruptions += 1;
        self.note(what);
    }

    fn note(&mut self, what: String) {
        if self.messages.len() < 100 {
            self.messages.push(what);
        }
    }
}

struct Walk<'a> {
    img: &'a Image,
    refs: Vec<u64>,
    report: CheckReport,
    l2_cache: HashMap<u64, Vec<u64>>,
}

impl Walk<'_> {
    fn inc(&mut self, start: u64, end: u64, what: &str) {
        let cs = self.img.cs();
        if end > self.img.len.div_ceil(cs) * cs || start > end {
            self.report.corruption(format!(
                "{what} at {start:#x} lies beyond the end of the file"
            ));
            return;
        }
        let mut c = start / cs;
        while c * cs < end {
            self.refs[c as usize] += 1;
            c += 1;
        }
    }

    fn walk_l1(&mut self, off: u64, size: u32, active: bool, rc: &[u64]) {
        let cs = self.img.cs();
        self.inc(off, off.saturating_add(u64::from(size) * 8), "L1 table");
        let l1 = match self.img.read_u64s(off, u64::from(size), "L1 table") {
            Ok(t) => t,
            Err(e) => return self.report.corruption(e.to_string()),
        };
        let bits = self.img.header.cluster_bits;
        let stride = (self.img.header.l2_entry_bytes() / 8) as usize;
        let rc_of = |o: u64| rc.get((o / cs) as usize).copied().unwrap_or(0);
        for e in l1 {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cs) || l2 >= self.img.len {
                self.report
                    .corruption(format!("L1 entry {e:#x} points to an invalid L2 table"));
                continue;
            }
            self.inc(l2, l2 + cs, "L2 table");
            if active && (rc_of(l2) == 1) != (e & COPIED != 0) {
                self.report.corruption(format!(
                    "COPIED flag of L1 entry {e:#x} disagrees with refcount {}",
                    rc_of(l2)
                ));
            }
            if !self.l2_cache.contains_key(&l2) {
                match self.img.read_l2(l2) {
                    Ok(t) => {
                        self.l2_cache.insert(l2, t);
                    }
                    Err(err) => {
                        self.report.corruption(err.to_string());
                        continue;
                    }
                }
            }
            let table = self.l2_cache.get(&l2).cloned().unwrap_or_default();
            for entry in table.iter().step_by(stride) {
                match l2_ref(*entry, bits) {
                    Err(w) => self.report.corruption(w),
                    Ok(L2Ref::None) => {}
                    Ok(L2Ref::Standard(o)) => {
                        self.inc(o, o + cs, "data cluster");
                        if active && (rc_of(o) == 1) != (entry & COPIED != 0) {
                            self.report.corruption(format!(
                                "COPIED flag of L2 entry {entry:#x} disagrees with refcount {}",
                                rc_of(o)
                            ));
                        }
                    }
                    Ok(L2Ref::Compressed { start, end }) => {
                        self.inc(start, end, "compressed cluster")
                    }
                }
            }
        }
    }
}

impl Walk<'_> {
    /// Bitmap directory entries: 0..8 table offset, 8..12 table entries, 12..16 flags,
    /// 16 type, 17 granularity bits, 18..20 name size, 20..24 extra data size, extra data,
    /// name, padding to 8. Table entries: bits 9..56 data cluster offset (0: none).
    fn walk_bitmaps(&mut self, dir_off: u64, dir_len: u64) {
        use crate::format::{be16, be32, be64};
        self.inc(dir_off, dir_off.saturating_add(dir_len), "bitmap directory");
        let dir = match self.img.read(dir_off, dir_len, "bitmap directory") {
            Ok(d) => d,
            Err(e) => return self.report.corruption(e.to_string()),
        };
        let mut at = 0usize;
        while at + 24 <= dir.len() {
            let table = be64(&dir, at);
            let entries = u64::from(be32(&dir, at + 8));
            let len = 24 + be32(&dir, at + 20) as usize + be16(&dir, at + 18) as usize;
            self.inc(table, table.saturating_add(entries * 8), "bitmap table");
            match self.img.read_u64s(table, entries, "bitmap table") {
                Ok(t) => {
                    for e in t.iter().map(|e| e & OFFSET_MASK).filter(|o| *o != 0) {
                        self.inc(e, e + self.img.cs(), "bitmap data");
                    }
                }
                Err(e) => self.report.corruption(e.to_string()),
            }
            at += len.next_multiple_of(8);
        }
    }
}

/// Checks the image; returns the report and the reference count of every cluster.
fn run(path: &Path) -> Result<(CheckReport, Vec<u64>, Vec<u64>)> {
    let img = Image::open(path, false)?;
    if img.header.incompatible & crate::format::INCOMPAT_DATA_FILE != 0
        || img.header.crypt_method != 0
    {
        img.header.check_writable(path)?;
    }
    let (rc, blocks) = img.read_refcounts()?;
    let cs = img.cs();
    let h = img.header.clone();
    let mut w = Walk {
        img: &img,
        refs: vec![0; rc.len()],
        report: CheckReport::default(),
        l2_cache: HashMap::new(),
    };
    w.inc(0, cs, "header");
    w.inc(
        h.refcount_table_offset,
        h.refcount_table_offset + u64::from(h.refcount_table_clusters) * cs,
        "refcount table",
    );
    for b in blocks {
        w.inc(b, b + cs, "refcount block");
    }
    w.walk_l1(h.l1_table_offset, h.l1_size, true, &rc);
    if let Some((dir_off, dir_len)) = h.bitmap_directory() {
        w.walk_bitmaps(dir_off, dir_len);
    }
    match img.read_snapshots() {
        Ok((snaps, len)) => {
            if len > 0 {
                w.inc(
                    h.snapshots_offset,
                    h.snapshots_offset.saturating_add(len),
                    "snapshot table",
                );
            }
            for s in snaps {
                w.walk_l1(s.l1_table_offset, s.l1_size, false, &rc);
            }
        }
        Err(e) => w.report.corruption(e.to_string()),
    }
    let refs = std::mem::take(&mut w.refs);
    let mut report = w.report;
    for (c, (r, n)) in rc.iter().zip(&refs).enumerate() {
        if r < n {
            report.corruption(format!(
                "cluster {:#x}: refcount {r} < {n} references",
                c as u64 * cs
            ));
        } else if r > n {
            report.leaks += 1;
            report.note(format!(
                "cluster {:#x}: leaked, refcount {r} > {n} references",
                c as u64 * cs
            ));
        }
    }
    Ok((report, rc, refs))
}

pub fn check(path: &Path) -> Result<CheckReport> {
    Ok(run(path)?.0)
}

pub fn repair_leaks(path: &Path) -> Result<CheckReport> {
    // Lock first, so that nothing changes between the check and the repair.
    let img = Image::open(path, true)?;
    let (report, rc, refs) = run(path)?;
    if report.corruptions > 0 {
        return Err(Error::Corruption {
            path: path.to_path_buf(),
            what: format!(
                "{} corruptions found ({}); repair_leaks only repairs leaks",
                report.corruptions,
                report.messages.first().cloned().unwrap_or_default()
            ),
        });
    }
    if report.leaks == 0 {
        return Ok(report);
    }
    let mut txn = Txn::begin(&img)?;
    txn.keep_bitmaps = true;
    if txn.new.len() != rc.len() {
        return Err(Error::Corruption {
            path: path.to_path_buf(),
            what: "image changed during repair".into(),
        });
    }
    for (c, n) in refs.iter().enumerate() {
        if rc[c] > *n {
            txn.new[c] = *n;
        }
    }
    txn.commit(img.header.clone())?;
    drop(img);
    check(path)
}
