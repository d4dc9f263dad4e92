//! Format 1 (read only): pack files and the index records kept in the journal.
//!
//! Pack file (`packs/op-<op>.pack` from an ingest, `packs/gc-<n>.pack` from a gc rewrite),
//! written once, sequentially, then only read and finally deleted whole:
//!
//! ```text
//! offset  size  field
//! 0       4     magic b"DSMP"
//! 4       4     PACK_VERSION, u32 little-endian
//! 8       8     pack id, u64 little-endian (op, or GC_PACK | n)
//! 16      ..    chunk records, back to back:
//!               32 bytes  BLAKE3 of the data (the chunk id; it is also the data's checksum)
//!                4 bytes  data length, u32 little-endian (≤ CHUNK_MAX)
//!                n bytes  data
//! ```
//!
//! Index (journal tables, values record-framed by the journal):
//!
//! | table    | key                                  | value          |
//! |----------|--------------------------------------|----------------|
//! | `chunks` | chunk id (32 bytes)                  | [`ChunkEntry`] |
//! | `images` | `h` + image id (32 bytes)            | [`ImageHead`]  |
//! | `images` | `m` + image id + segment (u32 BE)    | `Vec<Piece>` (≤ SEGMENT_PIECES) |
//! | `packs`  | pack id (u64 BE)                     | [`PackEntry`]  |
//!
//! A chunk entry's `offset` is where its data starts in the pack (after the 36-byte record
//! header). A chunk's `refs` is the number of times it occurs in all stored manifests;
//! an image's `refs` is the number of holders (snapshots) of the image.

use std::io::Write;

use serde::{Deserialize, Serialize};

/// Smallest chunk FastCDC cuts (except the last one of a stream).
#[cfg_attr(not(test), allow(dead_code))]
pub const CHUNK_MIN: usize = 16 << 10;
/// Average chunk size FastCDC aims at.
#[cfg_attr(not(test), allow(dead_code))]
pub const CHUNK_AVG: usize = 64 << 10;
/// Largest chunk.
pub const CHUNK_MAX: usize = 256 << 10;

/// Pack file magic.
pub const PACK_MAGIC: &[u8; 4] = b"DSMP";
/// Pack file format version written by this build.
pub const PACK_VERSION: u32 = 1;
/// Length of the pack file header.
pub const PACK_HEADER: u64 = 16;
/// Length of a chunk record header (id + length).
pub const RECORD_HEADER: u64 = 36;
/// Pack ids with this bit set were written by gc; the others are operation ids.
pub const GC_PACK: u64 = 1 << 63;
/// Manifest pieces per index record.
#[cfg_attr(not(test), allow(dead_code))]
pub const SEGMENT_PIECES: usize = 1 << 16;

/// A chunk id: BLAKE3 of its data.
pub type ChunkId = [u8; 32];

/// Where a chunk is stored and how many manifest pieces name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// Pack id.
    pub pack: u64,
    /// Offset of the data in the pack file.
    pub offset: u64,
    /// Data length.
    pub len: u32,
    /// Occurrences in stored manifests.
    pub refs: u64,
}

/// An image's summary; its manifest follows in `segments` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHead {
    /// Length of the image.
    pub bytes: u64,
    /// Holders of the image.
    pub refs: u64,
    /// Number of manifest segments.
    pub segments: u32,
    /// Number of manifest pieces.
    pub pieces: u64,
}

/// One piece of an image manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Piece {
    /// A stored chunk.
    Data {
        /// Chunk id.
        id: ChunkId,
        /// Its length.
        len: u32,
    },
    /// A run of zero bytes (not stored).
    Zero {
        /// Its length.
        len: u64,
    },
}

impl Piece {
    /// Bytes of image this piece stands for.
    pub fn bytes(&self) -> u64 {
        match *self {
            Piece::Data { len, .. } => u64::from(len),
            Piece::Zero { len } => len,
        }
    }
}

/// A pack file known to the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    /// File length when it was sealed.
    pub bytes: u64,
    /// Chunk records in it.
    pub chunks: u64,
}

/// Index key of a chunk.
pub fn chunk_key(id: &ChunkId) -> Vec<u8> {
    id.to_vec()
}

/// Index key of an image head.
pub fn head_key(id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'h');
    k.extend_from_slice(id);
    k
}

/// Index key of one manifest segment.
pub fn segment_key(id: &ChunkId, segment: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(37);
    k.push(b'm');
    k.extend_from_slice(id);
    k.extend_from_slice(&segment.to_be_bytes());
    k
}

/// Index key of a pack.
pub fn pack_key(pack: u64) -> [u8; 8] {
    pack.to_be_bytes()
}

/// File name of a pack.
pub fn pack_file_name(pack: u64) -> String {
    if pack & GC_PACK != 0 {
        format!("gc-{}.pack", pack & !GC_PACK)
    } else {
        format!("op-{pack}.pack")
    }
}

/// The pack id of a pack file name, if it is one.
pub fn parse_pack_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".pack")?;
    if let Some(n) = stem.strip_prefix("op-") {
        n.parse::<u64>().ok().filter(|n| n & GC_PACK == 0)
    } else {
        let n = stem.strip_prefix("gc-")?.parse::<u64>().ok()?;
        (n & GC_PACK == 0).then_some(n | GC_PACK)
    }
}

/// Writes a pack header.
pub fn write_pack_header(w: &mut impl Write, pack: u64) -> std::io::Result<()> {
    let mut h = [0u8; PACK_HEADER as usize];
    h[..4].copy_from_slice(PACK_MAGIC);
    h[4..8].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h[8..].copy_from_slice(&pack.to_le_bytes());
    w.write_all(&h)
}

/// Writes one chunk record; returns the bytes written.
pub fn write_record(w: &mut impl Write, id: &ChunkId, data: &[u8]) -> std::io::Result<u64> {
    let len = u32::try_from(data.len()).map_err(std::io::Error::other)?;
    w.write_all(id)?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(data)?;
    Ok(RECORD_HEADER + u64::from(len))
}

/// Parses an image id (64 hex digits).
pub fn parse_id(hex: &str) -> Option<ChunkId> {
    blake3::Hash::from_hex(hex).ok().map(|h| *h.as_bytes())
}

/// Hex form of an id.
pub fn hex(id: &ChunkId) -> String {
    blake3::Hash::from_bytes(*id).to_hex().to_string()
}

/// Whether every byte is zero.
#[cfg_attr(not(test), allow(dead_code))]
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    let aligned = blocks
        .by_ref()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    aligned && blocks.remainder().iter().all(|&x| x == 0)
}
