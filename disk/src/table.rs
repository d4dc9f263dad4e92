//! The internal snapshot table: parsing with every length bounded, and serialization.
//!
//! Layout of an entry: see the `format` module header. Unknown extra data is kept verbatim
//! so that rewriting the table loses nothing another writer stored there.

use crate::error::{Error, Result};
use crate::format::{be16, be32, be64, put32, put64, MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE_BYTES};
use std::path::Path;

/// One entry of the snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// Full 64-bit VM state size (from the extra data when present).
    pub vm_state_size: u64,
    /// Virtual disk size at the time of the snapshot, when recorded.
    pub disk_size: Option<u64>,
    /// Extra data as stored (vm_state_size, disk_size, icount, unknown fields).
    pub extra: Vec<u8>,
}

impl Entry {
    fn encoded_len(&self) -> usize {
        (40 + self.extra.len() + self.id.len() + self.name.len()).next_multiple_of(8)
    }
}

fn corrupt(path: &Path, what: String) -> Error {
    Error::Corruption {
        path: path.to_path_buf(),
        what,
    }
}

/// Parses `count` entries from `buf` (the bytes from the table offset, bounded by the caller
/// to the file and to QEMU's table size limit). Returns the entries and the table's length,
/// or `None` if `buf` ends before the table does.
pub fn parse(
    path: &Path,
    buf: &[u8],
    count: u32,
    cluster_size: u64,
    l1_max: u64,
) -> Result<Option<(Vec<Entry>, usize)>> {
    let mut at = 0usize;
    let mut out = Vec::with_capacity((count as usize).min(buf.len() / 40 + 1));
    for i in 0..count {
        if at + 40 > buf.len() {
            return Ok(None);
        }
        let e = &buf[at..];
        let l1_table_offset = be64(e, 0);
        let l1_size = be32(e, 8);
        let id_len = be16(e, 12) as usize;
        let name_len = be16(e, 14) as usize;
        let extra_len = be32(e, 36) as u64;
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(corrupt(
                path,
                format!("snapshot {i}: extra data size {extra_len}"),
            ));
        }
        let extra_len = extra_len as usize;
        let raw = 40 + extra_len + id_len + name_len;
        let len = raw.next_multiple_of(8);
        // QEMU does not write the padding of the last entry when it ends the file.
        if at + raw > buf.len() {
            return Ok(None);
        }
        if !l1_table_offset.is_multiple_of(cluster_size) || (l1_size > 0 && l1_table_offset == 0) {
            return Err(corrupt(
                path,
                format!("snapshot {i}: L1 table offset {l1_table_offset:#x}"),
            ));
        }
        if u64::from(l1_size) > l1_max {
            return Err(corrupt(path, format!("snapshot {i}: L1 size {l1_size}")));
        }
        let extra = e[40..40 + extra_len].to_vec();
        let vm_state_size = if extra_len >= 8 {
            be64(&extra, 0)
        } else {
            u64::from(be32(e, 32))
        };
        let disk_size = (extra_len >= 16).then(|| be64(&extra, 8));
        let text = |from: usize, n: usize| String::from_utf8_lossy(&e[from..from + n]).into_owned();
        out.push(Entry {
            l1_table_offset,
            l1_size,
            id: text(40 + extra_len, id_len),
            name: text(40 + extra_len + id_len, name_len),
            date_sec: be32(e, 16),
            date_nsec: be32(e, 20),
            vm_clock_nsec: be64(e, 24),
            vm_state_size,
            disk_size,
            extra,
        });
        at += len;
    }
    Ok(Some((out, at)))
}

/// Serializes a table. Errors if it would exceed QEMU's size limit.
pub fn serialize(path: &Path, entries: &[Entry]) -> Result<Vec<u8>> {
    let total: usize = entries.iter().map(Entry::encoded_len).sum();
    if total as u64 > MAX_SNAPSHOT_TABLE_BYTES {
        return Err(Error::InvalidArgument {
            path: path.to_path_buf(),
            what: "snapshot table too large".into(),
        });
    }
    let mut out = Vec::with_capacity(total);
    for e in entries {
        let start = out.len();
        out.resize(start + e.encoded_len(), 0);
        let b = &mut out[start..];
        put64(b, 0, e.l1_table_offset);
        put32(b, 8, e.l1_size);
        b[12..14].copy_from_slice(&(e.id.len() as u16).to_be_bytes());
        b[14..16].copy_from_slice(&(e.name.len() as u16).to_be_bytes());
        put32(b, 16, e.date_sec);
        put32(b, 20, e.date_nsec);
        put64(b, 24, e.vm_clock_nsec);
        put32(b, 32, u32::try_from(e.vm_state_size).unwrap_or(0));
        put32(b, 36, e.extra.len() as u32);
        b[40..40 + e.extra.len()].copy_from_slice(&e.extra);
        let at = 40 + e.extra.len();
        b[at..at + e.id.len()].copy_from_slice(e.id.as_bytes());
        b[at + e.id.len()..at + e.id.len() + e.name.len()].copy_from_slice(e.name.as_bytes());
    }
    Ok(out)
}

/// Extra data for a new entry, as QEMU writes it: vm_state_size, disk_size, icount (-1).
pub fn new_extra(vm_state_size: u64, disk_size: u64) -> Vec<u8> {
    let mut x = vec![0u8; 24];
    put64(&mut x, 0, vm_state_size);
    put64(&mut x, 8, disk_size);
    put64(&mut x, 16, u64::MAX);
    x
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(i: u32, extra: Vec<u8>) -> Entry {
        Entry {
            l1_table_offset: 0x10000 * u64::from(i + 1),
            l1_size: i,
            id: i.to_string(),
            name: format!("snap-{i}-{}", "x".repeat(i as usize)),
            date_sec: 1_700_000_000 + i,
            date_nsec: i * 7,
            vm_clock_nsec: u64::from(i) << 33,
            vm_state_size: if extra.len() >= 8 {
                u64::from(i) << 40
            } else {
                0
            },
            disk_size: (extra.len() >= 16).then_some(1 << 30),
            extra,
        }
    }

    #[test]
    fn round_trip_keeps_everything() {
        let mut entries = Vec::new();
        for i in 0..20u32 {
            let mut extra = new_extra(u64::from(i) << 40, 1 << 30);
            extra.extend((0..i % 5).map(|b| b as u8)); // unknown trailing fields
            entries.push(entry(i, extra));
        }
        entries.push(entry(99, Vec::new())); // version 2 style, no extra data
        let bytes = serialize(Path::new("t"), &entries).unwrap();
        assert_eq!(bytes.len() % 8, 0);
        let (back, used) = parse(
            Path::new("t"),
            &bytes,
            entries.len() as u32,
            0x10000,
            1 << 22,
        )
        .unwrap()
        .unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, entries);
        // Shorter input: not enough bytes, reported as such rather than as an error.
        assert!(parse(
            Path::new("t"),
            &bytes[..bytes.len() - 50],
            21,
            0x10000,
            1 << 22
        )
        .unwrap()
        .is_none());
    }

    #[test]
    fn bad_entries_are_corruption() {
        let bytes = serialize(Path::new("t"), &[entry(1, new_extra(0, 1))]).unwrap();
        let mut b = bytes.clone();
        b[7] = 1; // unaligned L1 offset
        assert!(parse(Path::new("t"), &b, 1, 0x10000, 1 << 22).is_err());
        let mut b = bytes;
        b[36..40].copy_from_slice(&5000u32.to_be_bytes()); // extra data beyond QEMU's limit
        assert!(parse(Path::new("t"), &b, 1, 0x10000, 1 << 22).is_err());
    }
}
