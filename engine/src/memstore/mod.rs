//! The memory image store: checkpoints' memory, cut into page-aware chunks, deduplicated
//! against the parent checkpoint first, packed into content-addressed objects of an
//! [`store::ObjectStore`].
//!
//! # How an image is stored
//!
//! - **Cut** ([`cut`]): raw memory in 4 KiB pages; an `xl save` stream parsed so that each
//!   page of guest memory is one chunk and its framing other chunks; anything else
//!   content-defined. Restore re-emits the stream byte for byte.
//! - **Deduplicated** slot by slot against the parent checkpoint's image first (no index
//!   lookup for a page that did not change), then against the chunks new in this image,
//!   then against the chunk index. Zero chunks are never stored. A chunk is reused only if
//!   the pack that holds it is present in the store and as long as the index recorded:
//!   chunks of a lost pack are stored again, so taking the checkpoint again repairs it.
//! - **Packed**: new chunks go into packs of ~16 MiB, objects named by the BLAKE3 of their
//!   trailer, which lists every chunk — the chunk index can be rebuilt from the packs.
//! - **Described** by a manifest object per checkpoint, `manifests/<state id>/<op>`, a
//!   delta against the parent's manifest (chain ≤ 8) or full ([`format`]).
//! - **Indexed** in the journal's tables (chunk locations, packs, images), committed with
//!   the step that records the image, so the index never disagrees with the log.
//!
//! No reference counts: [`MemStore::gc`] is mark and sweep from the images the catalog
//! names. Format-1 stores (the first release: `packs/op-<op>.pack` files, reference-counted
//! index) stay readable ([`v1`]).
//!
//! # Durability: capture, then seal
//!
//! [`MemStore::capture`] reads the stream and puts every new pack into the object store
//! without waiting for it to be durable: the domain's pause can end as soon as its memory
//! is read. [`MemStore::seal`] then flushes the packs, writes the manifest (flushed too)
//! and returns the index updates, to be committed with the step that records the image.
//! Nothing names a pack or manifest before it is durable. After a crash before that commit,
//! the packs and manifest of the operation are named by nothing: [`MemStore::abandon`]
//! (the create's roll-back) or the next gc deletes them, recognising them by the
//! operation recorded in them.
//!
//! # Cost
//!
//! Capture runs on three threads (the caller's, a hasher, a pack writer) with bounded
//! queues: ~64 MiB of buffers, plus the image's slots (40 bytes per 4 KiB page, ~1%), the
//! parent's slots, and ~100 bytes per new chunk. Restore reads each pack's chunks in
//! offset order on a reader thread while the caller checks them ([`read`]).
//!
//! Files that hold guest memory are created mode 0600, directories 0700.
#![warn(missing_docs)]

pub mod cut;
mod error;
pub mod format;
mod gc;
mod ingest;
mod manifest;
mod pack;
mod read;
mod reindex;
pub mod v1;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use journal::{Batch, Journal, Table};
use store::{LocalStore, ObjectStore};

pub use error::{Error, Result};
pub use gc::{GcReport, GC_OP};
pub use ingest::{CaptureStats, Captured, Sealed};
pub use read::{stage_limit, Staged};
pub use reindex::{FoundImage, Rebuilt};

/// The memory image store.
#[derive(Debug)]
pub struct MemStore {
    objects: Arc<dyn ObjectStore>,
    /// Names this state directory's manifests (`manifests/<state>/<op>`).
    state: String,
    /// Where format-1 pack files are (`<dir>/packs`).
    v1_packs: PathBuf,
}

/// Sizes for `list` and `gc` output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Stored images.
    pub images: u64,
    /// Sum of their lengths.
    pub image_bytes: u64,
    /// Packs in the index.
    pub packs: u64,
    /// Sum of their lengths: what the store takes.
    pub pack_bytes: u64,
}

/// The state name used for manifests until the state directory has an identity.
pub const DEFAULT_STATE: &str = "00000000000000000000000000000000";

impl MemStore {
    /// Opens the store in directory `dir` (a [`LocalStore`]; created mode 0700 unless
    /// `read_only`). `state` names this state directory's manifests.
    pub fn open(dir: &Path, state: &str, read_only: bool) -> Result<MemStore> {
        let objects = LocalStore::open(dir, read_only)?;
        Ok(MemStore::with_objects(Arc::new(objects), dir, state))
    }

    /// The store on `objects`; `dir` is where format-1 pack files would be.
    pub fn with_objects(objects: Arc<dyn ObjectStore>, dir: &Path, state: &str) -> MemStore {
        MemStore {
            objects,
            state: state.to_string(),
            v1_packs: dir.join("packs"),
        }
    }

    /// The object store.
    pub fn objects(&self) -> &dyn ObjectStore {
        self.objects.as_ref()
    }

    /// A batch that drops one holder of `image`. Format 2 keeps no counts (gc marks from the
    /// catalog), so the batch is empty; a format-1 image loses a reference. Commit it
    /// before the next call that builds a batch.
    pub fn release(&self, journal: &Journal, image: &str) -> Result<Batch> {
        if self.has_v1(journal, image)? {
            return self.release_v1(journal, image);
        }
        Ok(Batch::new())
    }

    /// The length of `image`, if it is stored.
    pub fn image(&self, journal: &Journal, image: &str) -> Result<Option<u64>> {
        let Some(id) = format::parse_id(image) else {
            return Ok(None);
        };
        if let Some(r) =
            journal.get::<format::ImageRecord>(Table::Images, &format::image_key(&id))?
        {
            return Ok(Some(r.bytes));
        }
        let head: Option<v1::format::ImageHead> =
            journal.get(Table::Images, &v1::format::head_key(&id))?;
        Ok(head.map(|h| h.bytes))
    }

    /// Reads every chunk of `image` and checks it. Returns the image length.
    pub fn verify(&self, journal: &Journal, image: &str) -> Result<u64> {
        if self.has_v1(journal, image)? {
            return self.verify_v1(journal, image);
        }
        self.verify_v2(journal, image)
    }

    /// Reads and checks `image` once and keeps it in memory (see [`read`]).
    pub fn stage_image(&self, journal: &Journal, image: &str) -> Result<Staged> {
        if self.has_v1(journal, image)? {
            let mut data = Vec::new();
            self.restore_v1(journal, image, &mut data, &mut |_| {})?;
            return Ok(Staged::new(image, data));
        }
        self.stage(journal, image)
    }

    /// Writes `image` into `sink`, every chunk checked before it is written (a bad chunk
    /// fails with [`Error::Corruption`]). `progress` gets the bytes written so far.
    pub fn restore(
        &self,
        journal: &Journal,
        image: &str,
        sink: &mut dyn std::io::Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        if self.has_v1(journal, image)? {
            return self.restore_v1(journal, image, sink, progress);
        }
        self.restore_v2(journal, image, sink, progress)
    }

    /// Counts images and pack bytes.
    pub fn stats(&self, journal: &Journal) -> Result<Stats> {
        let (images, image_bytes, packs, pack_bytes) = self.stats_v1(journal)?;
        let mut s = Stats {
            images,
            image_bytes,
            packs,
            pack_bytes,
        };
        for (_, r) in journal.scan_len::<format::ImageRecord>(Table::Images, b"i", 33)? {
            s.images += 1;
            s.image_bytes += r.bytes;
        }
        for (_, r) in journal.scan_len::<format::PackRecord>(Table::Packs, b"p", 9)? {
            s.packs += 1;
            s.pack_bytes += r.len;
        }
        Ok(s)
    }

    /// Compares the store with its index and with `referenced` (each image the catalog
    /// holds, with its number of holders): lists every difference (see `check_v2` and the
    /// format-1 check).
    pub fn check(
        &self,
        journal: &Journal,
        referenced: &BTreeMap<String, u64>,
    ) -> Result<Vec<String>> {
        let mut problems = self.check_v2(journal)?;
        let mut v1_held = BTreeMap::new();
        for (image, n) in referenced {
            let v2 = match format::parse_id(image) {
                Some(id) => journal
                    .get::<format::ImageRecord>(Table::Images, &format::image_key(&id))?
                    .is_some(),
                None => false,
            };
            if !v2 {
                v1_held.insert(image.clone(), *n);
            }
        }
        problems.extend(self.check_v1(journal, &v1_held)?);
        Ok(problems)
    }

    /// Runs both collectors: format 2 by mark and sweep from `live` (every image the
    /// catalog and the open operations name), format 1 by its reference counts.
    pub fn collect(
        &self,
        journal: &mut Journal,
        live: &std::collections::BTreeSet<String>,
    ) -> Result<GcReport> {
        let mut report = self.gc(journal, live)?;
        let old = self.gc_v1(journal)?;
        report.chunks_removed += old.chunks_removed;
        report.bytes_freed += old.bytes_freed;
        report.packs_removed += old.packs_removed;
        report.packs_rewritten += old.packs_rewritten;
        Ok(report)
    }
}
