//! Layouts of the store's objects (packs, manifests) and of its index records.
//!
//! # Pack (object `packs/<name>`)
//!
//! Written once by one ingest (or by gc), then only read and finally deleted whole.
//!
//! ```text
//! offset   size  field
//! 0        4     magic b"DSP2"
//! 4        4     PACK_VERSION (2), u32 little-endian
//! 8        ..    chunk data, back to back, as the image holds it
//! T        48×n  trailer: one entry per chunk, in data order:
//!                  32  chunk id: BLAKE3 of the chunk's bytes
//!                   4  offset of the data in the pack, u32 LE
//!                   4  length of the data, u32 LE
//!                   8  reserved (0)
//! end-32   8     operation that wrote the pack, u64 LE
//! end-24   4     n, u32 LE
//! end-20   4     T, u32 LE
//! end-16   4     reserved (0)
//! end-12   4     CRC-32 of bytes T .. end-12
//! end-8    8     magic b"DSP2TAIL"
//! ```
//!
//! The pack's **name** is the hex BLAKE3 of its trailer and footer (bytes `T..end`): the
//! trailer lists every chunk's BLAKE3, so the name commits to the whole content. The trailer
//! makes a pack self-describing: the chunk index can be rebuilt from the packs alone.
//!
//! # Manifest (object `manifests/<state id>/<op>`)
//!
//! One per checkpoint. An image is a sequence of **slots**: a chunk (its id and length) or
//! a run of zeros (not stored). A manifest is **full** (every slot) or a **delta** against
//! its parent's manifest (the slots that differ; chain depth ≤ [`MAX_CHAIN`]).
//!
//! ```text
//! 0     4   magic b"DSMF"
//! 4     4   MANIFEST_VERSION (1), u32 LE
//! 8     32  image id
//! 40    8   image length in bytes, u64 LE
//! 48    8   slot count, u64 LE
//! 56    8   operation that wrote it, u64 LE
//! 64    4   chain depth (0: full), u32 LE
//! 68    2   P, u16 LE; then P bytes: the parent manifest's object name (empty when full)
//! ..    4   K, u32 LE; then K × 32 bytes: names of packs holding its new chunks (a hint)
//! ..    8   E, u64 LE: number of entries that follow
//! ..        entries. Full: runs in slot order; delta: each entry starts with its first
//!           slot index (u64 LE). A run is
//!             tag 0 (zeros): u32 LE slot length, u32 LE count of such slots
//!             tag 1 (chunk): u32 LE length, 32-byte chunk id
//! end-32 32 BLAKE3 of every byte before it
//! ```
//!
//! The **image id** is the BLAKE3 of the image length and, for each slot, its length and
//! chunk id (32 zero bytes for a zero slot): the same bytes cut the same way give the same
//! id, and every chunk is checked against its id when it is read, so the id covers the
//! whole image.
//!
//! # Index (journal tables, values record-framed by the journal)
//!
//! | table    | key                      | value          |
//! |----------|--------------------------|----------------|
//! | `chunks` | `c` + chunk id           | [`ChunkLoc`]   |
//! | `packs`  | `p` + pack key (8 bytes) | [`PackRecord`] |
//! | `images` | `i` + image id           | [`ImageRecord`]|
//!
//! The pack key is the first 8 bytes of the pack's name. Format-1 records (see `v1`) share
//! these tables under keys of other lengths (32-byte chunk keys, `h`/`m` image keys, 8-byte
//! pack keys) and are told apart by length.

use serde::{Deserialize, Serialize};

/// A chunk or image id: a BLAKE3 hash.
pub type Id = [u8; 32];

/// Page size of guest memory: raw memory is cut into pages of this size.
pub const PAGE: usize = 4096;
/// Pack magic.
pub const PACK_MAGIC: &[u8; 4] = b"DSP2";
/// Pack footer magic.
pub const PACK_TAIL_MAGIC: &[u8; 8] = b"DSP2TAIL";
/// Pack format version.
pub const PACK_VERSION: u32 = 2;
/// Length of the pack header.
pub const PACK_HEADER: usize = 8;
/// Length of one trailer entry.
pub const TRAILER_ENTRY: usize = 48;
/// Length of the pack footer.
pub const PACK_FOOTER: usize = 32;
/// A pack is sealed once its data reaches this size.
pub const PACK_TARGET: usize = 16 << 20;
/// Largest chunk (framing pieces and content-defined chunks are cut at this size).
pub const CHUNK_MAX: usize = 256 << 10;
/// Manifest magic.
pub const MANIFEST_MAGIC: &[u8; 4] = b"DSMF";
/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
/// Longest delta chain: the manifest after this many deltas is full again.
pub const MAX_CHAIN: u32 = 8;

/// Where a chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLoc {
    /// Pack key (first 8 bytes of the pack's name, big-endian).
    pub pack: u64,
    /// Offset of the data in the pack.
    pub offset: u32,
    /// Data length.
    pub len: u32,
}

/// A pack known to the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRecord {
    /// The pack's full name (BLAKE3 of its trailer).
    pub name: Id,
    /// Its length in bytes.
    pub len: u64,
    /// Chunks in it.
    pub chunks: u32,
    /// Operation that wrote it.
    pub op: u64,
}

/// A stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Object name of a manifest of the image.
    pub manifest: String,
    /// Image length.
    pub bytes: u64,
    /// Slot count.
    pub slots: u64,
}

/// One slot of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// `len` zero bytes, not stored.
    Zero(u32),
    /// A stored chunk.
    Chunk {
        /// Its id.
        id: Id,
        /// Its length.
        len: u32,
    },
}

impl Slot {
    /// Bytes of image this slot stands for.
    pub fn len(&self) -> u32 {
        match *self {
            Slot::Zero(len) | Slot::Chunk { len, .. } => len,
        }
    }

    /// Whether it stands for no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Index key of a chunk.
pub fn chunk_key(id: &Id) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = b'c';
    k[1..].copy_from_slice(id);
    k
}

/// Pack key of a pack name.
pub fn pack_key_of(name: &Id) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&name[..8]);
    u64::from_be_bytes(b)
}

/// Index key of a pack.
pub fn pack_index_key(pack: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'p';
    k[1..].copy_from_slice(&pack.to_be_bytes());
    k
}

/// Index key of an image.
pub fn image_key(id: &Id) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = b'i';
    k[1..].copy_from_slice(id);
    k
}

/// Object name of a pack.
pub fn pack_object(name: &Id) -> String {
    format!("packs/{}", hex(name))
}

/// The pack name of a pack object name, if it is one.
pub fn parse_pack_object(object: &str) -> Option<Id> {
    parse_id(object.strip_prefix("packs/")?)
}

/// Object name of the manifest of operation `op`'s image in state `state`.
pub fn manifest_object(state: &str, op: u64) -> String {
    format!("manifests/{state}/{op}")
}

/// Parses an id (64 hex digits).
pub fn parse_id(hex: &str) -> Option<Id> {
    if hex.len() != 64 {
        return None;
    }
    blake3::Hash::from_hex(hex).ok().map(|h| *h.as_bytes())
}

/// Hex form of an id.
pub fn hex(id: &Id) -> String {
    blake3::Hash::from_bytes(*id).to_hex().to_string()
}

/// Whether every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    let aligned = blocks
        .by_ref()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    aligned && blocks.remainder().iter().all(|&x| x == 0)
}

/// Little-endian readers over a byte slice, for the parsers of packs and manifests.
pub(crate) struct Cursor<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) at: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { data, at: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.data.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|b| u16::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    pub(crate) fn id(&mut self) -> Option<Id> {
        self.take(32).map(|b| b.try_into().unwrap_or_default())
    }

    pub(crate) fn left(&self) -> usize {
        self.data.len() - self.at
    }
}
