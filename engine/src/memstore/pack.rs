//! Building packs and reading their trailers (layout in [`super::format`]).

use super::error::{Error, Result};
use super::format::{
    self, Cursor, Id, PACK_FOOTER, PACK_HEADER, PACK_MAGIC, PACK_TAIL_MAGIC, PACK_VERSION,
    TRAILER_ENTRY,
};

/// One chunk as a pack's trailer lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) id: Id,
    pub(crate) offset: u32,
    pub(crate) len: u32,
}

/// A pack being filled: its bytes so far and its trailer entries.
#[derive(Debug)]
pub(crate) struct PackBuilder {
    pub(crate) data: Vec<u8>,
    pub(crate) entries: Vec<Entry>,
}

impl PackBuilder {
    /// An empty pack, reusing `buf`'s allocation.
    pub(crate) fn new(mut buf: Vec<u8>) -> PackBuilder {
        buf.clear();
        buf.extend_from_slice(PACK_MAGIC);
        buf.extend_from_slice(&PACK_VERSION.to_le_bytes());
        PackBuilder {
            data: buf,
            entries: Vec::new(),
        }
    }

    /// Bytes of chunk data so far.
    pub(crate) fn data_len(&self) -> usize {
        self.data.len() - PACK_HEADER
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a chunk; returns its offset in the pack.
    pub(crate) fn push(&mut self, id: &Id, bytes: &[u8]) -> Result<u32> {
        let offset = u32::try_from(self.data.len())
            .map_err(|_| Error::Inconsistent("pack grew past 4 GiB".into()))?;
        let len = u32::try_from(bytes.len())
            .map_err(|_| Error::Inconsistent("chunk longer than 4 GiB".into()))?;
        self.data.extend_from_slice(bytes);
        self.entries.push(Entry {
            id: *id,
            offset,
            len,
        });
        Ok(offset)
    }

    /// Appends the trailer and footer; returns the pack's bytes and its name.
    pub(crate) fn finish(mut self, op: u64) -> Result<(Vec<u8>, Id, Vec<Entry>)> {
        let t = self.data.len();
        let t32 = u32::try_from(t).map_err(|_| Error::Inconsistent("pack too long".into()))?;
        self.data
            .reserve(self.entries.len() * TRAILER_ENTRY + PACK_FOOTER);
        for e in &self.entries {
            self.data.extend_from_slice(&e.id);
            self.data.extend_from_slice(&e.offset.to_le_bytes());
            self.data.extend_from_slice(&e.len.to_le_bytes());
            self.data.extend_from_slice(&[0u8; 8]);
        }
        let n = u32::try_from(self.entries.len())
            .map_err(|_| Error::Inconsistent("too many chunks in a pack".into()))?;
        self.data.extend_from_slice(&op.to_le_bytes());
        self.data.extend_from_slice(&n.to_le_bytes());
        self.data.extend_from_slice(&t32.to_le_bytes());
        self.data.extend_from_slice(&[0u8; 4]);
        let crc = crc32(&self.data[t..]);
        self.data.extend_from_slice(&crc.to_le_bytes());
        self.data.extend_from_slice(PACK_TAIL_MAGIC);
        let name = *blake3::hash(&self.data[t..]).as_bytes();
        Ok((self.data, name, self.entries))
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(data);
    h.finalize()
}

/// A pack's trailer, read back.
#[derive(Debug, Clone)]
pub(crate) struct Trailer {
    pub(crate) op: u64,
    pub(crate) entries: Vec<Entry>,
}

/// Where a pack's trailer starts and how long it is, from the pack's last
/// [`PACK_FOOTER`] bytes. `pack_len` is the object's length.
pub(crate) fn footer(object: &str, pack_len: u64, tail: &[u8]) -> Result<(u64, usize)> {
    let bad = |why: &str| Error::BadPack {
        object: object.to_string(),
        why: why.to_string(),
    };
    if tail.len() != PACK_FOOTER || &tail[24..] != PACK_TAIL_MAGIC {
        return Err(bad("no pack footer at its end (truncated or not a pack)"));
    }
    let mut c = Cursor::new(tail);
    let _op = c.u64();
    let n = c.u32().unwrap_or(0) as u64;
    let t = c.u32().unwrap_or(0) as u64;
    let expected = t + n * TRAILER_ENTRY as u64 + PACK_FOOTER as u64;
    if t < PACK_HEADER as u64 || expected != pack_len {
        return Err(bad(&format!(
            "its footer says {n} chunks from offset {t}, which does not fit its {pack_len} bytes"
        )));
    }
    Ok((t, (pack_len - t) as usize))
}

/// Parses a pack's trailer and footer (`bytes` = the pack from offset `t` to its end) and
/// checks it against the pack's name (when known) and its CRC.
pub(crate) fn parse_trailer(
    object: &str,
    name: Option<&Id>,
    t: u64,
    bytes: &[u8],
) -> Result<Trailer> {
    let bad = |why: String| Error::BadPack {
        object: object.to_string(),
        why,
    };
    if bytes.len() < PACK_FOOTER {
        return Err(bad("shorter than a footer".into()));
    }
    if let Some(name) = name {
        if blake3::hash(bytes).as_bytes() != name {
            return Err(bad("its trailer does not hash to its name".into()));
        }
    }
    let crc_at = bytes.len() - 12;
    let stored = u32::from_le_bytes(bytes[crc_at..crc_at + 4].try_into().unwrap_or_default());
    if crc32(&bytes[..crc_at]) != stored {
        return Err(bad("the CRC of its trailer does not match".into()));
    }
    let n = (bytes.len() - PACK_FOOTER) / TRAILER_ENTRY;
    let mut c = Cursor::new(bytes);
    let mut entries = Vec::with_capacity(n);
    let mut end = PACK_HEADER as u64;
    for _ in 0..n {
        let (Some(id), Some(offset), Some(len), Some(_)) = (c.id(), c.u32(), c.u32(), c.u64())
        else {
            return Err(bad("truncated trailer".into()));
        };
        if u64::from(offset) < end || u64::from(offset) + u64::from(len) > t {
            return Err(bad(format!(
                "trailer entry {} at {offset}+{len} is out of order or past the data",
                format::hex(&id)
            )));
        }
        end = u64::from(offset) + u64::from(len);
        entries.push(Entry { id, offset, len });
    }
    let op = c.u64().unwrap_or(0);
    Ok(Trailer { op, entries })
}

/// Reads the trailer of pack object `object` from `store`.
pub(crate) fn read_trailer(
    store: &dyn store::ObjectStore,
    object: &str,
    name: Option<&Id>,
) -> Result<Trailer> {
    let len = store
        .len(object)?
        .ok_or_else(|| Error::MissingPack(object.to_string()))?;
    if len < (PACK_HEADER + PACK_FOOTER) as u64 {
        return Err(Error::BadPack {
            object: object.to_string(),
            why: format!("only {len} bytes long"),
        });
    }
    let mut tail = [0u8; PACK_FOOTER];
    store.read_at(object, len - PACK_FOOTER as u64, &mut tail)?;
    let (t, n) = footer(object, len, &tail)?;
    let mut bytes = vec![0u8; n];
    store.read_at(object, t, &mut bytes)?;
    parse_trailer(object, name, t, &bytes)
}
