//! Format 1: the memory image store of the first release, kept readable.
//!
//! Its packs are files `<memory dir>/packs/op-<op>.pack` (and `gc-<n>.pack`), its index
//! (chunk locations with reference counts, image manifests in segments, pack lengths) is in
//! the journal's `chunks`, `images` and `packs` tables under keys of other lengths than
//! format 2's (see [`format`]). Images stored by it are verified, restored, released and
//! collected as before; nothing new is written in it.

pub(crate) mod format;
mod gc;
mod reader;
mod whole;
#[cfg(test)]
mod writer;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use journal::{Batch, Journal, Table};

use super::error::{io, Error, Result};
use super::MemStore;
use format::{ChunkEntry, ChunkId, ImageHead, PackEntry, Piece};

pub use gc::GcReport as V1GcReport;
#[cfg(test)]
pub(crate) use writer::ImageWriter;

/// Format-1 chunk entries (32-byte keys).
pub(crate) fn scan_chunks(journal: &Journal) -> Result<Vec<(Vec<u8>, ChunkEntry)>> {
    Ok(journal.scan_len(Table::Chunks, &[], 32)?)
}

/// Format-1 image heads (`h` + 32 bytes).
pub(crate) fn scan_heads(journal: &Journal) -> Result<Vec<(Vec<u8>, ImageHead)>> {
    Ok(journal.scan_len(Table::Images, b"h", 33)?)
}

/// Format-1 pack entries (8-byte keys).
pub(crate) fn scan_packs(journal: &Journal) -> Result<Vec<(Vec<u8>, PackEntry)>> {
    Ok(journal.scan_len(Table::Packs, &[], 8)?)
}

fn image_id(image: &str) -> Result<ChunkId> {
    format::parse_id(image).ok_or_else(|| Error::NoSuchImage(image.to_string()))
}

fn load_head(journal: &Journal, image: &str, id: &ChunkId) -> Result<ImageHead> {
    journal
        .get(Table::Images, &format::head_key(id))?
        .ok_or_else(|| Error::NoSuchImage(image.to_string()))
}

fn load_segment(journal: &Journal, image: &str, id: &ChunkId, segment: u32) -> Result<Vec<Piece>> {
    journal
        .get(Table::Images, &format::segment_key(id, segment))?
        .ok_or_else(|| {
            Error::Inconsistent(format!("image {image} lacks manifest segment {segment}"))
        })
}

/// Fsyncs a directory, so that entries created or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub(crate) fn failpoint(name: &'static str, path: &Path) -> Error {
    Error::Io {
        op: name,
        path: path.to_path_buf(),
        source: std::io::Error::other("failpoint"),
    }
}

impl MemStore {
    /// Path of a format-1 pack file.
    pub(crate) fn v1_pack_path(&self, pack: u64) -> PathBuf {
        self.v1_packs.join(format::pack_file_name(pack))
    }

    /// Whether `image` is a format-1 image.
    pub(crate) fn has_v1(&self, journal: &Journal, image: &str) -> Result<bool> {
        let Some(id) = format::parse_id(image) else {
            return Ok(false);
        };
        Ok(journal
            .get::<ImageHead>(Table::Images, &format::head_key(&id))?
            .is_some())
    }

    /// Starts a format-1 ingest (tests that build format-1 stores).
    #[cfg(test)]
    pub(crate) fn writer_v1<'j>(&self, journal: &'j Journal, op: u64) -> Result<ImageWriter<'j>> {
        fs::create_dir_all(&self.v1_packs).map_err(io("create", &self.v1_packs))?;
        Ok(ImageWriter::new(journal, self.v1_pack_path(op), op))
    }

    /// Deletes `packs/op-<op>.pack` unless the index names it. Idempotent.
    pub(crate) fn abandon_v1(&self, journal: &Journal, op: u64) -> Result<()> {
        if op & format::GC_PACK != 0
            || journal
                .get::<PackEntry>(Table::Packs, &format::pack_key(op))?
                .is_some()
        {
            return Ok(());
        }
        let path = self.v1_pack_path(op);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.v1_packs),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
        }
    }

    /// A batch that removes one holder from a format-1 image; when none is left, its
    /// manifest goes and its chunks lose their references (gc frees them).
    pub(crate) fn release_v1(&self, journal: &Journal, image: &str) -> Result<Batch> {
        let id = image_id(image)?;
        let mut head = load_head(journal, image, &id)?;
        let mut batch = Batch::new();
        head.refs = head
            .refs
            .checked_sub(1)
            .ok_or_else(|| Error::Inconsistent(format!("image {image} has no holder")))?;
        if head.refs > 0 {
            batch.put(Table::Images, &format::head_key(&id), &head)?;
            return Ok(batch);
        }
        let mut counts: BTreeMap<ChunkId, u64> = BTreeMap::new();
        for segment in 0..head.segments {
            for piece in load_segment(journal, image, &id, segment)? {
                if let Piece::Data { id, .. } = piece {
                    *counts.entry(id).or_default() += 1;
                }
            }
            batch.delete(Table::Images, &format::segment_key(&id, segment));
        }
        batch.delete(Table::Images, &format::head_key(&id));
        for (chunk, n) in counts {
            let key = format::chunk_key(&chunk);
            let mut entry: ChunkEntry = journal.get(Table::Chunks, &key)?.ok_or_else(|| {
                Error::Inconsistent(format!(
                    "image {image} names chunk {} missing from the index",
                    format::hex(&chunk)
                ))
            })?;
            entry.refs = entry.refs.checked_sub(n).ok_or_else(|| {
                Error::Inconsistent(format!(
                    "chunk {} has {} references, image {image} holds {n}",
                    format::hex(&chunk),
                    entry.refs
                ))
            })?;
            batch.put(Table::Chunks, &key, &entry)?;
        }
        Ok(batch)
    }

    /// Reads and checks every chunk of a format-1 image, and the whole-image hash.
    pub(crate) fn verify_v1(&self, journal: &Journal, image: &str) -> Result<u64> {
        reader::read_image(self, journal, image, None, &mut |_| {})
    }

    /// Writes a format-1 image into `sink`, every chunk checked before it is written.
    pub(crate) fn restore_v1(
        &self,
        journal: &Journal,
        image: &str,
        sink: &mut dyn std::io::Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        reader::read_image(self, journal, image, Some(sink), progress)
    }

    /// Format-1 images, pack files and their bytes: (images, image bytes, packs, pack bytes).
    pub(crate) fn stats_v1(&self, journal: &Journal) -> Result<(u64, u64, u64, u64)> {
        let (mut images, mut image_bytes, mut packs, mut pack_bytes) = (0, 0, 0, 0);
        for (_, head) in scan_heads(journal)? {
            images += 1;
            image_bytes += head.bytes;
        }
        for (_, pack) in scan_packs(journal)? {
            packs += 1;
            pack_bytes += pack.bytes;
        }
        Ok((images, image_bytes, packs, pack_bytes))
    }
}
