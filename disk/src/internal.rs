//! Internal snapshots: create, apply (revert to) and delete entries of the snapshot table.
//!
//! Refcounts count paths, as in QEMU: a cluster mapped by an L2 table that two L1 tables
//! share has refcount 2. Creating a snapshot adds one path per L1 entry of the active L1
//! table (L2 table and every mapped cluster +1); deleting removes the snapshot's paths.
//! Afterwards the COPIED flags of the active L1 and L2 tables are made to match the new
//! refcounts (set exactly where the refcount is 1), so that writers copy shared clusters
//! before writing. L2 tables whose flags must change are never edited in place: the active
//! L1 table gets a fresh copy of them, and the old table stays with the snapshots that share
//! it (where COPIED flags carry no meaning). All writes go to fresh clusters and one header
//! write commits the change; see [`crate::meta`] for the crash-safety argument.

use crate::error::{Error, Result};
use crate::format::{l2_ref, L2Ref, COPIED, OFFSET_MASK};
use crate::meta::{Image, Txn};
use crate::table::{self, Entry};
use crate::Snapshot;
use std::path::Path;

fn to_public(e: &Entry, current_size: u64) -> Snapshot {
    Snapshot {
        id: e.id.clone(),
        name: e.name.clone(),
        vm_state_size: e.vm_state_size,
        disk_size: e.disk_size.unwrap_or(current_size),
        date_sec: e.date_sec,
        date_nsec: e.date_nsec,
        vm_clock_nsec: e.vm_clock_nsec,
    }
}

pub fn list(path: &Path) -> Result<Vec<Snapshot>> {
    let img = Image::open(path, false)?;
    let (entries, _) = img.read_snapshots()?;
    Ok(entries
        .iter()
        .map(|e| to_public(e, img.header.size))
        .collect())
}

/// Makes the COPIED flags of the active tables match the transaction's new refcounts.
/// A table whose flags must change is replaced, never edited: by `alt[i]` (an existing table
/// the transaction also holds, such as the old active table of apply or the deleted
/// snapshot's table) when that table already holds exactly the wanted entries, otherwise by a
/// fresh copy (copies are allocated one after the other, so that they are written together).
/// Returns the new L1 table and whether it differs.
fn normalize_active(txn: &mut Txn<'_>, l1: &[u64], alt: &[u64]) -> Result<(Vec<u64>, bool)> {
    let bits = txn.img.header.cluster_bits;
    let stride = (txn.img.header.l2_entry_bytes() / 8) as usize;
    let mut out = l1.to_vec();
    let mut table: Vec<u64> = Vec::new();
    let mut other_table: Vec<u64> = Vec::new();
    let mut bytes: Vec<u8> = Vec::new();
    for i in 0..l1.len() {
        let l2_off = l1[i] & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        txn.l2_words(l1, i, &mut table)?;
        let mut changed = false;
        for e in table.iter_mut().step_by(stride) {
            match l2_ref(*e, bits) {
                Ok(L2Ref::Standard(o)) => {
                    let want = if txn.refcount(o) == 1 {
                        *e | COPIED
                    } else {
                        *e & !COPIED
                    };
                    changed |= want != *e;
                    *e = want;
                }
                Ok(_) => {}
                Err(w) => return Err(txn.img.corrupt(w)),
            }
        }
        out[i] = l2_off;
        if !changed {
            continue;
        }
        // The active path moves off this table; the mapped clusters keep their path count,
        // as the replacement maps the same clusters.
        txn.add(l2_off, -1)?;
        let other = alt.get(i).map_or(0, |e| e & OFFSET_MASK);
        if other != 0 && other != l2_off {
            txn.read_l2_into(other, &mut bytes, &mut other_table)?;
            if other_table == table {
                txn.add(other, 1)?;
                out[i] = other;
                continue;
            }
        }
        bytes.clear();
        bytes.extend(table.iter().flat_map(|w| w.to_be_bytes()));
        let off = txn.alloc(1);
        txn.write(off, &bytes, "disk::internal::write_l2")?;
        out[i] = off;
    }
    for slot in out.iter_mut() {
        let l2_off = *slot & OFFSET_MASK;
        *slot = if l2_off != 0 && txn.refcount(l2_off) == 1 {
            l2_off | COPIED
        } else {
            l2_off
        };
    }
    let changed = out != l1;
    Ok((out, changed))
}

fn find<'e>(img: &Image, entries: &'e [Entry], name: &str) -> Result<(usize, &'e Entry)> {
    entries
        .iter()
        .enumerate()
        .find(|(_, e)| e.name == name)
        .ok_or_else(|| Error::NoSuchSnapshot {
            path: img.path.clone(),
            name: name.to_string(),
        })
}

fn write_table(txn: &mut Txn<'_>, entries: &[Entry]) -> Result<(u64, u32)> {
    if entries.is_empty() {
        return Ok((0, 0));
    }
    let bytes = table::serialize(&txn.img.path, entries)?;
    let cs = txn.img.cs();
    let n = (bytes.len() as u64).div_ceil(cs);
    let off = txn.alloc(n as usize);
    let mut buf = bytes;
    buf.resize((n * cs) as usize, 0);
    txn.write(off, &buf, "disk::internal::write_table")?;
    Ok((off, entries.len() as u32))
}

pub fn create(path: &Path, name: &str) -> Result<Snapshot> {
    if name.is_empty() || name.len() > 1024 {
        return Err(Error::InvalidArgument {
            path: path.to_path_buf(),
            what: "snapshot name must be 1..=1024 bytes".into(),
        });
    }
    let img = Image::open(path, true)?;
    let (mut entries, table_len) = img.read_snapshots()?;
    if entries.iter().any(|e| e.name == name) {
        // Callers take this as "already done": it must survive a power cut.
        img.sync()?;
        return Err(Error::SnapshotExists {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    }
    let h = img.header.clone();
    let l1 = img.read_l1(h.l1_table_offset, h.l1_size)?;
    let mut txn = Txn::begin(&img)?;
    txn.keep_bitmaps = true;
    txn.add_l2_paths(&l1, 1)?;
    let snap_l1: Vec<u64> = l1.iter().map(|e| e & OFFSET_MASK).collect();
    let (active, _) = normalize_active(&mut txn, &l1, &[])?;
    let snap_l1_off = txn.write_u64s(&snap_l1, "disk::internal::write_l1")?;
    let active_off = txn.write_u64s(&active, "disk::internal::write_l1")?;
    txn.free_table(h.l1_table_offset, u64::from(h.l1_size) * 8)?;
    txn.free_table(h.snapshots_offset, table_len)?;

    let id = entries
        .iter()
        .filter_map(|e| e.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let entry = Entry {
        l1_table_offset: snap_l1_off,
        l1_size: h.l1_size,
        id: id.to_string(),
        name: name.to_string(),
        date_sec: now.as_secs() as u32,
        date_nsec: now.subsec_nanos(),
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: Some(h.size),
        extra: table::new_extra(0, h.size),
    };
    let public = to_public(&entry, h.size);
    entries.push(entry);
    let (table_off, nb) = write_table(&mut txn, &entries)?;
    let mut nh = h;
    nh.l1_table_offset = active_off;
    nh.snapshots_offset = table_off;
    nh.nb_snapshots = nb;
    txn.commit(nh)?;
    Ok(public)
}

pub fn apply(path: &Path, name: &str) -> Result<()> {
    let img = Image::open(path, true)?;
    let (entries, _) = img.read_snapshots()?;
    let (_, snap) = find(&img, &entries, name)?;
    let h = img.header.clone();
    if h.bitmap_directory().is_some() {
        // As QEMU: reverting the content would make the dirty bitmaps lie.
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "applying a snapshot to an image with persistent dirty bitmaps".into(),
        });
    }
    let old_l1 = img.read_l1(h.l1_table_offset, h.l1_size)?;
    let mut snap_l1 = img.read_l1(snap.l1_table_offset, snap.l1_size)?;
    let new_size = snap.disk_size.unwrap_or(h.size);
    let l1_len = (snap_l1.len() as u64).max(h.l1_entries_for(new_size));
    if l1_len > crate::format::MAX_L1_ENTRIES {
        return Err(img.corrupt(format!("snapshot {name:?} has disk size {new_size}")));
    }
    snap_l1.resize(l1_len as usize, 0);
    let mut txn = Txn::begin(&img)?;
    txn.add_l2_paths(&snap_l1, 1)?;
    txn.add_l2_paths(&old_l1, -1)?;
    let base: Vec<u64> = snap_l1.iter().map(|e| e & OFFSET_MASK).collect();
    // Where the old active table maps what the snapshot's does, with the right flags, the
    // active L1 table keeps it (typically all tables the guest has not written since).
    let (active, _) = normalize_active(&mut txn, &base, &old_l1)?;
    let active_off = txn.write_u64s(&active, "disk::internal::write_l1")?;
    txn.free_table(h.l1_table_offset, u64::from(h.l1_size) * 8)?;
    let mut nh = h;
    nh.l1_table_offset = active_off;
    nh.l1_size = active.len() as u32;
    nh.size = new_size;
    txn.commit(nh)
}

pub fn delete(path: &Path, name: &str) -> Result<()> {
    let img = Image::open(path, true)?;
    let (mut entries, table_len) = img.read_snapshots()?;
    let (idx, snap) = match find(&img, &entries, name) {
        Ok(found) => found,
        Err(e) => {
            // Callers take "no such snapshot" as "already deleted": it must survive a power
            // cut too, so an earlier deletion that was written but never synced is synced now.
            img.sync()?;
            return Err(e);
        }
    };
    let snap = snap.clone();
    let h = img.header.clone();
    let l1 = img.read_l1(h.l1_table_offset, h.l1_size)?;
    let snap_l1 = img.read_l1(snap.l1_table_offset, snap.l1_size)?;
    let mut txn = Txn::begin(&img)?;
    txn.keep_bitmaps = true;
    txn.add_l2_paths(&snap_l1, -1)?;
    txn.free_table(snap.l1_table_offset, u64::from(snap.l1_size) * 8)?;
    // Where the deleted snapshot's table maps what the active one does, with the flags the
    // active one needs now, the active L1 table takes it over instead of a fresh copy.
    let (active, changed) = normalize_active(&mut txn, &l1, &snap_l1)?;
    let mut nh = h.clone();
    if changed {
        nh.l1_table_offset = txn.write_u64s(&active, "disk::internal::write_l1")?;
        txn.free_table(h.l1_table_offset, u64::from(h.l1_size) * 8)?;
    }
    entries.remove(idx);
    txn.free_table(h.snapshots_offset, table_len)?;
    let (table_off, nb) = write_table(&mut txn, &entries)?;
    nh.snapshots_offset = table_off;
    nh.nb_snapshots = nb;
    txn.commit(nh)
}
