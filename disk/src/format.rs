//! On-disk structures of qcow2 (version 2 and 3), as far as this crate reads or writes them.
//!
//! All integers are big-endian. The image is divided into clusters of `1 << cluster_bits`
//! bytes (512 B … 2 MiB); every allocation is a whole cluster.
//!
//! ```text
//! cluster 0   header (bytes 0..72 v2, 0..header_length v3), then header extensions
//!             (u32 type, u32 length, data padded to 8; type 0 ends the list), then
//!             the backing file name (backing_file_offset, backing_file_size)
//!   24..32  size                 virtual disk size
//!   36..40  l1_size              entries in the active L1 table
//!   40..48  l1_table_offset      cluster aligned, contiguous
//!   48..56  refcount_table_offset, 56..60 refcount_table_clusters
//!   60..64  nb_snapshots,        64..72 snapshots_offset (cluster aligned)
//!   72..80  incompatible features: 0 dirty, 1 corrupt, 2 external data file,
//!           3 compression type, 4 extended L2 entries
//!   80..88  compatible features (0 lazy refcounts), 88..96 autoclear features
//!   96..100 refcount_order (refcount width = 1 << order bits), 100..104 header_length
//!   104     compression_type (0 zlib, 1 zstd)
//! L1 entry  bits 9..56 L2 table offset, bit 63 COPIED (refcount of the L2 table is 1)
//! L2 entry  bit 63 COPIED, bit 62 compressed; standard: bits 9..56 host cluster, bit 0
//!           reads-as-zero; compressed: host byte offset in bits 0..x, additional
//!           512-byte sectors in bits x..62, x = 62 - (cluster_bits - 8).
//!           With extended L2 entries each entry is followed by a 64-bit subcluster bitmap.
//! refcount table: u64 offsets of refcount blocks (0 = all refcounts 0); a refcount block is
//!           one cluster of `cluster_size * 8 / refcount_bits` entries, sub-byte widths
//!           packed from the least significant bit.
//! snapshot table entry (padded to 8 bytes):
//!   0..8 l1_table_offset, 8..12 l1_size, 12..14 id length, 14..16 name length,
//!   16..20 date_sec, 20..24 date_nsec, 24..32 vm_clock_nsec, 32..36 vm_state_size (u32),
//!   36..40 extra_data_size, extra data (0..8 vm_state_size u64, 8..16 disk_size,
//!   16..24 icount), id, name
//! ```
//!
//! The only multi-field update this crate makes to an existing image is one write of header
//! bytes 24..96 (24..72 for version 2), which lies inside the first 512-byte sector and is
//! therefore written atomically by the storage: that write is the commit point of every
//! metadata change (see `meta`).

use crate::error::{Error, Result};
use std::path::Path;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// COPIED flag of L1 and L2 entries.
pub const COPIED: u64 = 1 << 63;
/// Compressed flag of L2 entries.
pub const COMPRESSED: u64 = 1 << 62;
/// Offset bits of L1 entries, standard L2 entries and refcount table entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Incompatible feature: refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image was found corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: non-zlib compression.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Header extension: persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Limits from the spec or QEMU's implementation, used to bound every length read.
pub const MAX_L1_ENTRIES: u64 = 32 * 1024 * 1024 / 8;
/// QEMU refuses refcount tables larger than this.
pub const MAX_REFTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// QEMU's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// QEMU's limit on the snapshot table size.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 * 1024 * 1024;
/// QEMU's limit on the extra data of a snapshot table entry.
pub const MAX_SNAPSHOT_EXTRA: u64 = 1024;

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// One header extension, kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Extension data, without padding.
    pub data: Vec<u8>,
}

/// The parsed qcow2 header (cluster 0).
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
}

fn corrupt(path: &Path, what: impl Into<String>) -> Error {
    Error::Corruption {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn unsupported(path: &Path, what: impl Into<String>) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

impl Header {
    /// Parses the header from the first bytes of the file (`buf` holds up to one cluster, or
    /// less if the file is shorter). Checks only what is needed to read the image safely.
    pub fn parse(path: &Path, buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < 72 {
            return Err(corrupt(path, "file shorter than a qcow2 header"));
        }
        if be32(buf, 0) != MAGIC {
            return Err(corrupt(path, "no qcow2 magic"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(path, format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(
                path,
                format!("cluster_bits {cluster_bits} outside 9..=21"),
            ));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: 0,
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(corrupt(path, "file shorter than a version 3 header"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104
                || !h.header_length.is_multiple_of(8)
                || u64::from(h.header_length) > cs.min(buf.len() as u64)
            {
                return Err(corrupt(path, format!("header_length {}", h.header_length)));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(corrupt(
                path,
                format!("refcount_order {}", h.refcount_order),
            ));
        }
        let aligned = |v: u64| v.is_multiple_of(cs);
        if !aligned(h.l1_table_offset)
            || !aligned(h.refcount_table_offset)
            || !aligned(h.snapshots_offset)
        {
            return Err(corrupt(path, "table offset not cluster aligned"));
        }
        if u64::from(h.l1_size) > MAX_L1_ENTRIES {
            return Err(corrupt(path, format!("l1_size {} too large", h.l1_size)));
        }
        let l2_entries = cs / h.l2_entry_bytes();
        let needed_l1 = h.size.div_ceil(cs).div_ceil(l2_entries);
        if needed_l1 > u64::from(h.l1_size) {
            return Err(corrupt(
                path,
                format!(
                    "l1_size {} cannot map the virtual size {}",
                    h.l1_size, h.size
                ),
            ));
        }
        if h.refcount_table_clusters == 0
            || u64::from(h.refcount_table_clusters) * cs > MAX_REFTABLE_BYTES.max(cs)
        {
            return Err(corrupt(
                path,
                format!("refcount_table_clusters {}", h.refcount_table_clusters),
            ));
        }
        if u64::from(h.nb_snapshots) > MAX_SNAPSHOTS {
            return Err(corrupt(path, format!("nb_snapshots {}", h.nb_snapshots)));
        }
        for (what, off, len) in [
            ("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8),
            (
                "refcount table",
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            ),
        ] {
            if off == 0 && len > 0 || off.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(corrupt(
                    path,
                    format!("{what} at {off:#x} (+{len}) outside the file"),
                ));
            }
        }
        if h.nb_snapshots > 0 && (h.snapshots_offset == 0 || h.snapshots_offset >= file_len) {
            return Err(corrupt(path, "snapshot table outside the file"));
        }
        // Header extensions: between header_length and the end of cluster 0.
        {
            let end = (cs as usize).min(buf.len());
            let mut at = h.header_length as usize;
            loop {
                if at + 8 > end {
                    break;
                }
                let kind = be32(buf, at);
                let len = be32(buf, at + 4) as usize;
                if kind == 0 {
                    break;
                }
                let data_end = at + 8 + len;
                if data_end > end {
                    return Err(corrupt(
                        path,
                        format!("header extension {kind:#x} overruns cluster 0"),
                    ));
                }
                h.extensions.push(Extension {
                    kind,
                    data: buf[at + 8..data_end].to_vec(),
                });
                at = (data_end + 7) & !7;
            }
        }
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset as usize;
            let len = h.backing_file_size as usize;
            if h.backing_file_size > 1023
                || off
                    .checked_add(len)
                    .is_none_or(|e| e > (cs as usize).min(buf.len()))
            {
                return Err(corrupt(path, "backing file name outside cluster 0"));
            }
            let name = String::from_utf8(buf[off..off + len].to_vec())
                .map_err(|_| unsupported(path, "backing file name is not UTF-8"))?;
            h.backing_file = Some(name);
        }
        Ok(h)
    }

    /// Refuses what this crate cannot modify safely. Read-only listing skips this.
    pub fn check_writable(&self, path: &Path) -> Result<()> {
        if self.crypt_method != 0 {
            return Err(unsupported(path, "encryption"));
        }
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(unsupported(
                path,
                "dirty bit set (lazy refcounts not flushed); run `qemu-img check -r all` first",
            ));
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(path, "corrupt bit set in header"));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(path, "external data file"));
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        if self.incompatible & !known != 0 {
            return Err(unsupported(
                path,
                format!(
                    "unknown incompatible features {:#x}",
                    self.incompatible & !known
                ),
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(corrupt(
                path,
                "extended L2 entries with clusters below 16 KiB",
            ));
        }
        if self
            .extensions
            .iter()
            .any(|e| e.kind == EXT_CRYPTO || e.kind == EXT_DATA_FILE)
        {
            return Err(unsupported(
                path,
                "encryption or external data file header extension",
            ));
        }
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 16 bytes (extended L2).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// The L1 size needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let cs = self.cluster_size();
        size.div_ceil(cs).div_ceil(cs / self.l2_entry_bytes())
    }

    /// Backing format from the header extension, if any.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
    }

    /// The bitmap directory (offset, size in bytes) when the bitmaps are consistent.
    pub fn bitmap_directory(&self) -> Option<(u64, u64)> {
        if self.autoclear & AUTOCLEAR_BITMAPS == 0 {
            return None;
        }
        let e = self
            .extensions
            .iter()
            .find(|e| e.kind == EXT_BITMAPS && e.data.len() >= 24)?;
        Some((be64(&e.data, 16), be64(&e.data, 8)))
    }

    /// The header bytes 24..96 (24..72 for version 2) as they are written at a commit.
    pub fn commit_bytes(&self) -> (u64, Vec<u8>) {
        let mut b = vec![0u8; 96];
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        put64(&mut b, 72, self.incompatible);
        put64(&mut b, 80, self.compatible);
        put64(&mut b, 88, self.autoclear);
        let end = if self.version == 3 { 96 } else { 72 };
        (24, b[24..end].to_vec())
    }
}

/// What a (non-extended part of an) L2 entry refers to in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Ref {
    /// Nothing allocated.
    None,
    /// A standard cluster (possibly flagged reads-as-zero) at this cluster-aligned offset.
    Standard(u64),
    /// Compressed data occupying bytes `start..end`.
    Compressed {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
}

/// Decodes an L2 entry. `Err` carries a description of a malformed entry.
pub fn l2_ref(entry: u64, cluster_bits: u32) -> std::result::Result<L2Ref, String> {
    if entry & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let start = entry & ((1u64 << x) - 1);
        let sectors = ((entry & !(COPIED | COMPRESSED)) >> x) + 1;
        let end = (start & !511) + sectors * 512;
        Ok(L2Ref::Compressed { start, end })
    } else {
        let off = entry & OFFSET_MASK;
        if off == 0 {
            return Ok(L2Ref::None);
        }
        if off & ((1u64 << cluster_bits) - 1) != 0 {
            return Err(format!("L2 entry {entry:#x} is not cluster aligned"));
        }
        Ok(L2Ref::Standard(off))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header_bytes() -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 20, 12);
        put64(&mut b, 24, 1 << 20);
        put32(&mut b, 36, 1);
        put64(&mut b, 40, 3 * 4096);
        put64(&mut b, 48, 4096);
        put32(&mut b, 56, 1);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 112);
        b
    }

    #[test]
    fn header_parses_and_commit_bytes_land_in_place() {
        let b = header_bytes();
        let h = Header::parse(Path::new("h"), &b, 1 << 20).unwrap();
        assert_eq!((h.cluster_size(), h.size, h.l1_size), (4096, 1 << 20, 1));
        let (at, bytes) = h.commit_bytes();
        let mut again = b.clone();
        again[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        assert_eq!(again, b);
        assert!(
            at + bytes.len() as u64 <= 512,
            "the commit write stays in the first sector"
        );
    }

    #[test]
    fn header_refusals() {
        let cases: [(usize, u64, u32); 6] = [
            (20, 0, 30),      // cluster_bits
            (36, 0, 1 << 30), // l1_size
            (56, 0, 100_000), // refcount_table_clusters
            (60, 0, 1 << 20), // nb_snapshots
            (100, 0, 7),      // header_length
            (96, 0, 9),       // refcount_order
        ];
        for (at, _, v) in cases {
            let mut b = header_bytes();
            put32(&mut b, at, v);
            assert!(
                Header::parse(Path::new("h"), &b, 1 << 20).is_err(),
                "field at {at} = {v}"
            );
        }
        let mut b = header_bytes();
        put64(&mut b, 72, INCOMPAT_DATA_FILE);
        let h = Header::parse(Path::new("h"), &b, 1 << 20).unwrap();
        assert!(matches!(
            h.check_writable(Path::new("h")),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn compressed_descriptor() {
        // 64 KiB clusters: x = 62 - 8 = 54; offset 0x12345, 3 additional sectors.
        let e = COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            l2_ref(e, 16).unwrap(),
            L2Ref::Compressed {
                start: 0x12345,
                end: 0x12200 + 4 * 512
            }
        );
        assert_eq!(
            l2_ref(COPIED | 0x30000, 16).unwrap(),
            L2Ref::Standard(0x30000)
        );
        assert!(l2_ref(0x30200, 16).is_err());
        assert_eq!(l2_ref(1, 16).unwrap(), L2Ref::None);
    }
}
