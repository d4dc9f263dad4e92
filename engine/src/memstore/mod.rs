//! Content-addressed store of memory images (the `xl save` streams of checkpoints).
//!
//! An image is cut into chunks by FastCDC v2020 (16 KiB min / 64 KiB avg / 256 KiB max).
//! A chunk is named by its BLAKE3 hash and stored once; chunks that are all zero are not
//! stored at all (the manifest records their length). An image is named by the BLAKE3 of
//! the whole stream. New chunks of one ingest are appended to one pack file
//! `<dir>/packs/op-<op>.pack`; the index (which chunk is where, each image's manifest, the
//! reference counts) lives in the journal ([`journal::Table`]) — see [`format`] for both
//! layouts.
//!
//! # Why content-defined chunks
//!
//! Measured by `cargo bench -p benches --bench memstore` (its `chunking` lines): a 64 MiB
//! memory-like image saved twice with 16 random pages changed, bytes newly stored by the
//! second save:
//!
//! | stream                                   | FastCDC 16/64/256 KiB | fixed 64 KiB, page-aligned |
//! |------------------------------------------|-----------------------|----------------------------|
//! | raw memory file                          | 2.2 MiB               | 1.0 MiB                    |
//! | `xl save`-like stream, same header       | 2.2 MiB               | 1.1 MiB                    |
//! | `xl save`-like stream, header 3 B longer | 2.3 MiB               | 53.4 MiB (everything)      |
//!
//! Fixed chunks store half as much while every byte stays at its offset, and everything
//! once anything before it shifts: the `xl` header carries the domain's JSON config, whose
//! length changes with the config. FastCDC costs ~2 changed chunks per changed page and is
//! immune to shifts; it is the choice.
//!
//! # Durability and atomicity
//!
//! - Nothing here commits to the journal except [`MemStore::gc`]. Ingest, [`MemStore::add_ref`]
//!   and [`MemStore::release`] return a [`journal::Batch`] that the engine commits together
//!   with its step events, so the index never disagrees with the log.
//! - A pack file is `sync_all`ed and its directory fsynced in [`ImageWriter::finish`],
//!   before the batch that names it is returned. After a crash before that batch commits,
//!   the pack is named by nothing: [`MemStore::abandon`] (or the next gc) deletes it.
//! - **Each returned batch must be committed (or dropped) before the next call that builds
//!   one.** Batches carry absolute reference counts read from the journal; two batches built
//!   from the same journal state would each add their own +1 to the same old count.
//! - gc writes replacement packs and syncs them before it commits the index update that
//!   points at them, and deletes old packs only after that commit; every crash in between
//!   leaves at most an unnamed pack file, which the next gc removes.
//!
//! Files that hold guest memory are created mode 0600, directories 0700.
//!
//! # Cost
//!
//! Ingest and restore stream: memory is a few MiB of buffers plus what grows with the
//! number of chunks (the manifest, ~40 bytes a chunk, and one entry per distinct chunk),
//! about 0.2% of the image. The whole-image hash runs on a second thread; chunking, chunk
//! hashing and one index lookup per chunk run on the caller's. `cargo bench -p benches
//! --bench memstore` compares ingest and restore with a plain file copy.
#![warn(missing_docs)]

mod error;
pub mod format;
mod gc;
mod reader;
mod whole;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use journal::{Batch, Journal, Table};

pub use error::{Error, Result};
pub use gc::GcReport;
pub use writer::{ImageWriter, Ingested};

use error::io;
use format::{ChunkEntry, ChunkId, ImageHead, PackEntry, Piece};

/// The memory image store in one directory (`<state>/memory`).
#[derive(Debug)]
pub struct MemStore {
    dir: PathBuf,
    packs: PathBuf,
}

/// Sizes for `list` and `gc` output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Stored images.
    pub images: u64,
    /// Sum of their lengths.
    pub image_bytes: u64,
    /// Chunks in the index (including those waiting for gc).
    pub chunks: u64,
    /// Sum of their lengths.
    pub chunk_bytes: u64,
    /// Chunks no manifest names (freed by the next gc).
    pub dead_chunks: u64,
    /// Pack files in the index.
    pub packs: u64,
    /// Sum of the pack file lengths: what the store takes on disk.
    pub pack_bytes: u64,
}

impl MemStore {
    /// Opens the store in `dir`, creating it (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<MemStore> {
        let packs = dir.join("packs");
        for d in [dir, packs.as_path()] {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(io("create directory", d))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))
                .map_err(io("set mode of", d))?;
        }
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(MemStore {
            dir: dir.to_path_buf(),
            packs,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a pack file.
    pub(crate) fn pack_path(&self, pack: u64) -> PathBuf {
        self.packs.join(format::pack_file_name(pack))
    }

    /// Starts ingesting an image for operation `op`; new chunks go to `packs/op-<op>.pack`.
    /// See [`ImageWriter`].
    pub fn writer<'j>(&self, journal: &'j Journal, op: u64) -> Result<ImageWriter<'j>> {
        if op & format::GC_PACK != 0 {
            return Err(Error::Inconsistent(format!(
                "operation id {op} is out of range"
            )));
        }
        if journal
            .get::<PackEntry>(Table::Packs, &format::pack_key(op))?
            .is_some()
        {
            return Err(Error::Inconsistent(format!(
                "operation {op} already has a committed pack"
            )));
        }
        Ok(ImageWriter::new(journal, self.pack_path(op), op))
    }

    /// Deletes `packs/op-<op>.pack` unless the index names it: the rollback of an ingest
    /// whose batch never committed. Idempotent.
    pub fn abandon(&self, journal: &Journal, op: u64) -> Result<()> {
        if journal
            .get::<PackEntry>(Table::Packs, &format::pack_key(op))?
            .is_some()
        {
            return Ok(());
        }
        let path = self.pack_path(op);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.packs),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
        }
    }

    /// A batch that adds one holder to `image`. Commit it before the next call that builds
    /// a batch.
    pub fn add_ref(&self, journal: &Journal, image: &str) -> Result<Batch> {
        let id = image_id(image)?;
        let mut head = load_head(journal, image, &id)?;
        head.refs += 1;
        let mut batch = Batch::new();
        batch.put(Table::Images, &format::head_key(&id), &head)?;
        Ok(batch)
    }

    /// A batch that removes one holder from `image`. When none is left, the manifest is
    /// removed and every chunk it names loses one reference per occurrence; chunks left
    /// without references stay on disk until [`MemStore::gc`]. Commit it before the next
    /// call that builds a batch.
    pub fn release(&self, journal: &Journal, image: &str) -> Result<Batch> {
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

    /// Whether `image` is stored, and its length and holder count.
    pub fn image(&self, journal: &Journal, image: &str) -> Result<Option<(u64, u64)>> {
        let Some(id) = format::parse_id(image) else {
            return Ok(None);
        };
        let head: Option<ImageHead> = journal.get(Table::Images, &format::head_key(&id))?;
        Ok(head.map(|h| (h.bytes, h.refs)))
    }

    /// Reads every chunk of `image` and checks it against its id, then the whole-image
    /// hash. Returns the image length.
    pub fn verify(&self, journal: &Journal, image: &str) -> Result<u64> {
        reader::read_image(self, journal, image, None, &mut |_| {})
    }

    /// Writes `image` into `sink`. Every chunk is checked against its id before it is
    /// written (a bad chunk fails with [`Error::Corruption`] and nothing after it is
    /// written); the whole-image hash is checked at the end. `progress` gets the bytes
    /// written so far. Returns the image length.
    pub fn restore(
        &self,
        journal: &Journal,
        image: &str,
        sink: &mut dyn std::io::Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        reader::read_image(self, journal, image, Some(sink), progress)
    }

    /// Counts images, chunks and pack bytes.
    pub fn stats(&self, journal: &Journal) -> Result<Stats> {
        let mut s = Stats::default();
        for (_, head) in journal.scan::<ImageHead>(Table::Images, b"h")? {
            s.images += 1;
            s.image_bytes += head.bytes;
        }
        for (_, chunk) in journal.scan::<ChunkEntry>(Table::Chunks, &[])? {
            s.chunks += 1;
            s.chunk_bytes += u64::from(chunk.len);
            if chunk.refs == 0 {
                s.dead_chunks += 1;
            }
        }
        for (_, pack) in journal.scan::<PackEntry>(Table::Packs, &[])? {
            s.packs += 1;
            s.pack_bytes += pack.bytes;
        }
        Ok(s)
    }
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
