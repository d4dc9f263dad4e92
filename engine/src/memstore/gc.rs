//! Garbage collection by mark and sweep, and the consistency check of the store.
//!
//! There are no reference counts: an image is live while the catalog (or an open
//! operation) names it, a manifest while a live image needs it (its own, and the chain of
//! deltas below it), a chunk while a live image holds it, a pack while it holds a live
//! chunk. gc deletes only what the index records (packs, images) or what an operation the
//! journal knows left behind (a pack or manifest whose operation ended without naming it:
//! a rolled-back create); an object the journal knows nothing about is reported, never
//! deleted.
//!
//! Each pack is one step, crash-safe: a replacement pack (live chunks of a mostly-dead
//! pack) is made durable before the index names it; the index stops naming a pack before
//! the pack is deleted. A crash in between leaves an object the next gc recognises (its
//! trailer names gc or an ended operation) and deletes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use journal::{Batch, Journal, Table};

use super::error::{Error, Result};
use super::format::{self, ChunkLoc, Id, ImageRecord, PackRecord, Slot};
use super::manifest;
use super::pack::{self, PackBuilder};
use super::MemStore;

/// The operation id gc writes into the packs it writes.
pub const GC_OP: u64 = u64::MAX;

/// A pack is rewritten when less than this share of its data (in 1/100) is live.
const REWRITE_BELOW_PERCENT: u64 = 50;

/// What [`MemStore::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunk entries removed from the index.
    pub chunks_removed: u64,
    /// Disk space given back (bytes deleted minus bytes rewritten).
    pub bytes_freed: u64,
    /// Packs deleted (dead, rewritten, or left by an operation that ended without them).
    pub packs_removed: u64,
    /// Mostly-dead packs whose live chunks were copied to a new pack.
    pub packs_rewritten: u64,
    /// Manifests deleted.
    pub manifests_removed: u64,
    /// Objects the journal knows nothing about, or cannot read: reported, never deleted.
    pub unknown: Vec<String>,
}

/// How the journal knows an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpState {
    Open,
    Ended,
    Unknown,
}

fn op_state(journal: &Journal, op: u64) -> Result<OpState> {
    if op == GC_OP {
        return Ok(OpState::Ended);
    }
    Ok(match journal.op(op)? {
        None => OpState::Unknown,
        Some(_) if journal.open_ops()?.contains(&op) => OpState::Open,
        Some(_) => OpState::Ended,
    })
}

/// The operation in a manifest's object name (`manifests/<state>/<op>`).
fn manifest_op(object: &str) -> Option<u64> {
    object.rsplit('/').next()?.parse().ok()
}

impl MemStore {
    /// Live chunks and live manifests of the images in `live` (format 2 only).
    fn mark(
        &self,
        journal: &Journal,
        live: &BTreeSet<String>,
    ) -> Result<(HashSet<Id>, BTreeSet<String>)> {
        let mut chunks = HashSet::new();
        let mut manifests = BTreeSet::new();
        for image in live {
            let Some(id) = format::parse_id(image) else {
                continue;
            };
            let Some(rec) = journal.get::<ImageRecord>(Table::Images, &format::image_key(&id))?
            else {
                continue;
            };
            let mut next = Some(rec.manifest.clone());
            while let Some(object) = next {
                let data = self
                    .objects
                    .get(&object)?
                    .ok_or_else(|| Error::MissingManifest(object.clone()))?;
                next = manifest::decode(&object, &data)?.parent;
                manifests.insert(object);
            }
            let (img, _, _) = manifest::load(self.objects.as_ref(), &rec.manifest)?;
            for s in img.slots {
                if let Slot::Chunk { id, .. } = s {
                    chunks.insert(id);
                }
            }
        }
        Ok((chunks, manifests))
    }

    /// Deletes what no live image needs (see the module documentation). `live`: every
    /// image the catalog and the open operations name.
    pub fn gc(&self, journal: &mut Journal, live: &BTreeSet<String>) -> Result<GcReport> {
        let mut report = GcReport::default();
        let (live_chunks, live_manifests) = self.mark(journal, live)?;
        let mut records: BTreeMap<Id, PackRecord> = BTreeMap::new();
        for (key, rec) in journal.scan_len::<PackRecord>(Table::Packs, b"p", 9)? {
            if key.len() == 9 {
                records.insert(rec.name, rec);
            }
        }
        let present: BTreeMap<String, u64> = self
            .objects
            .list("packs/")?
            .into_iter()
            .map(|m| (m.name, m.len))
            .collect();

        // Packs nothing in the index names.
        for (object, len) in &present {
            let Some(name) = format::parse_pack_object(object) else {
                continue; // format 1 packs (`op-N.pack`) are the v1 collector's
            };
            if records.contains_key(&name) {
                continue;
            }
            let op = match pack::read_trailer(self.objects.as_ref(), object, Some(&name)) {
                Ok(t) => t.op,
                Err(_) => {
                    report
                        .unknown
                        .push(format!("{object}: not a readable pack"));
                    continue;
                }
            };
            match op_state(journal, op)? {
                OpState::Open => {}
                OpState::Ended => {
                    self.objects.delete(object)?;
                    report.packs_removed += 1;
                    report.bytes_freed += len;
                }
                OpState::Unknown => report.unknown.push(format!(
                    "{object}: written by operation {op}, which the journal does not know"
                )),
            }
        }

        // Indexed packs: dead ones go, mostly-dead ones are rewritten.
        for (name, rec) in &records {
            let object = format::pack_object(name);
            if !present.contains_key(&object) {
                continue; // missing: `verify` reports it; the next create stores its chunks again
            }
            let key = format::pack_key_of(name);
            let trailer = pack::read_trailer(self.objects.as_ref(), &object, Some(name))?;
            let mut live_entries = Vec::new();
            let mut dead_entries = Vec::new();
            let mut live_bytes = 0u64;
            for e in trailer.entries {
                let loc: Option<ChunkLoc> =
                    journal.get(Table::Chunks, &format::chunk_key(&e.id))?;
                let indexed_here = loc.is_some_and(|l| l.pack == key && l.offset == e.offset);
                if indexed_here && live_chunks.contains(&e.id) {
                    live_bytes += u64::from(e.len);
                    live_entries.push(e);
                } else if indexed_here {
                    dead_entries.push(e);
                }
            }
            let data_bytes = rec.len.saturating_sub(
                (format::PACK_HEADER + format::PACK_FOOTER) as u64
                    + u64::from(rec.chunks) * format::TRAILER_ENTRY as u64,
            );
            let rewrite =
                !live_entries.is_empty() && live_bytes * 100 < data_bytes * REWRITE_BELOW_PERCENT;
            if !live_entries.is_empty() && !rewrite {
                continue;
            }
            let mut batch = Batch::new();
            for e in &dead_entries {
                batch.delete(Table::Chunks, &format::chunk_key(&e.id));
            }
            let mut written = 0u64;
            if rewrite {
                let mut out = PackBuilder::new(Vec::with_capacity(live_bytes as usize + (1 << 20)));
                let mut buf = Vec::new();
                for e in &live_entries {
                    buf.resize(e.len as usize, 0);
                    self.objects
                        .read_at(&object, u64::from(e.offset), &mut buf)?;
                    if blake3::hash(&buf).as_bytes() != &e.id {
                        return Err(Error::Corruption {
                            image: String::new(),
                            chunk: format::hex(&e.id),
                            pack: object.clone().into(),
                            offset: u64::from(e.offset),
                            why: "found while gc copied live chunks".into(),
                        });
                    }
                    out.push(&e.id, &buf)?;
                }
                let (data, new_name, entries) = out.finish(GC_OP)?;
                let new_object = format::pack_object(&new_name);
                self.objects.put(&new_object, &data)?;
                self.objects.flush()?;
                fail::fail_point!("engine::memstore::gc::after-rewrite", |_| Err(
                    Error::Failpoint("engine::memstore::gc::after-rewrite")
                ));
                let new_key = format::pack_key_of(&new_name);
                for e in &entries {
                    batch.put(
                        Table::Chunks,
                        &format::chunk_key(&e.id),
                        &ChunkLoc {
                            pack: new_key,
                            offset: e.offset,
                            len: e.len,
                        },
                    )?;
                }
                batch.put(
                    Table::Packs,
                    &format::pack_index_key(new_key),
                    &PackRecord {
                        name: new_name,
                        len: data.len() as u64,
                        chunks: entries.len() as u32,
                        op: GC_OP,
                    },
                )?;
                written = data.len() as u64;
                report.packs_rewritten += 1;
            }
            batch.delete(Table::Packs, &format::pack_index_key(key));
            journal.commit(batch)?;
            fail::fail_point!("engine::memstore::gc::after-commit", |_| Err(
                Error::Failpoint("engine::memstore::gc::after-commit")
            ));
            self.objects.delete(&object)?;
            report.chunks_removed += dead_entries.len() as u64;
            report.packs_removed += 1;
            report.bytes_freed += rec.len.saturating_sub(written);
        }

        // Manifests and image records no live image needs.
        let mut by_manifest: HashMap<String, Vec<Id>> = HashMap::new();
        for (key, rec) in journal.scan_len::<ImageRecord>(Table::Images, b"i", 33)? {
            if key.len() == 33 {
                let mut id = [0u8; 32];
                id.copy_from_slice(&key[1..]);
                by_manifest.entry(rec.manifest).or_default().push(id);
            }
        }
        let live_ids: HashSet<Id> = live.iter().filter_map(|i| format::parse_id(i)).collect();
        for meta in self.objects.list("manifests/")? {
            let object = meta.name;
            if live_manifests.contains(&object) {
                continue;
            }
            let ours = object
                .strip_prefix("manifests/")
                .and_then(|r| r.split_once('/'))
                .is_some_and(|(state, _)| state == self.state);
            let state = match manifest_op(&object) {
                Some(op) if ours => op_state(journal, op)?,
                _ => OpState::Unknown,
            };
            match state {
                OpState::Open => {}
                OpState::Unknown => report.unknown.push(format!(
                    "{object}: a manifest of an operation the journal does not know"
                )),
                OpState::Ended => {
                    let mut batch = Batch::new();
                    for id in by_manifest.remove(&object).unwrap_or_default() {
                        if !live_ids.contains(&id) {
                            batch.delete(Table::Images, &format::image_key(&id));
                        }
                    }
                    journal.commit(batch)?;
                    self.objects.delete(&object)?;
                    report.manifests_removed += 1;
                    report.bytes_freed += meta.len;
                }
            }
        }
        Ok(report)
    }

    /// Deletes what operation `op` put into the store if the index does not name it: the
    /// roll-back of a create whose image was never recorded. Idempotent.
    pub fn abandon(&self, journal: &Journal, op: u64) -> Result<()> {
        let object = format::manifest_object(&self.state, op);
        let named = journal
            .scan_len::<ImageRecord>(Table::Images, b"i", 33)?
            .into_iter()
            .any(|(_, r)| r.manifest == object);
        if !named {
            self.objects.delete(&object)?;
        }
        for meta in self.objects.list("packs/")? {
            let Some(name) = format::parse_pack_object(&meta.name) else {
                continue;
            };
            let key = format::pack_index_key(format::pack_key_of(&name));
            if journal.get::<PackRecord>(Table::Packs, &key)?.is_some() {
                continue;
            }
            if let Ok(t) = pack::read_trailer(self.objects.as_ref(), &meta.name, Some(&name)) {
                if t.op == op {
                    self.objects.delete(&meta.name)?;
                }
            }
        }
        self.abandon_v1(journal, op)
    }

    /// Lists every inconsistency of the format-2 store: images whose manifests cannot be
    /// read, packs the index records that are missing or shorter than recorded, chunks in
    /// packs the index does not know, objects nothing names. Reads the index, the manifests
    /// and object lengths, not chunk data (that is [`MemStore::verify`]).
    pub(crate) fn check_v2(&self, journal: &Journal) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let mut manifests = BTreeSet::new();
        for (key, rec) in journal.scan_len::<ImageRecord>(Table::Images, b"i", 33)? {
            if key.len() != 33 {
                continue;
            }
            let image = format::hex(key[1..].try_into().unwrap_or(&[0u8; 32]));
            match manifest::load(self.objects.as_ref(), &rec.manifest) {
                Ok((img, _, _)) if format::hex(&img.id) == image => {}
                Ok(_) => problems.push(format!(
                    "image {image}: its manifest {} holds another image",
                    rec.manifest
                )),
                Err(e) => {
                    problems.push(format!("image {image}: {}", crate::engine::error_chain(&e)))
                }
            }
            manifests.insert(rec.manifest);
        }
        let present: BTreeMap<String, u64> = self
            .objects
            .list("packs/")?
            .into_iter()
            .map(|m| (m.name, m.len))
            .collect();
        let mut known = HashSet::new();
        for (key, rec) in journal.scan_len::<PackRecord>(Table::Packs, b"p", 9)? {
            if key.len() != 9 {
                continue;
            }
            let object = format::pack_object(&rec.name);
            known.insert(format::pack_key_of(&rec.name));
            match present.get(&object) {
                None => problems.push(format!(
                    "pack {object} is missing (the next checkpoint of each domain that needs it stores its chunks again)"
                )),
                Some(len) if *len < rec.len => problems.push(format!(
                    "pack {object} is {len} bytes long, {} expected",
                    rec.len
                )),
                Some(_) => {}
            }
        }
        for (key, loc) in journal.scan_len::<ChunkLoc>(Table::Chunks, b"c", 33)? {
            if key.len() == 33 && !known.contains(&loc.pack) {
                problems.push(format!(
                    "chunk {} is in pack {:016x}, which the index does not know",
                    format::hex(key[1..].try_into().unwrap_or(&[0u8; 32])),
                    loc.pack
                ));
            }
        }
        for object in present.keys() {
            if let Some(name) = format::parse_pack_object(object) {
                if !known.contains(&format::pack_key_of(&name)) {
                    problems.push(format!("pack {object} is named by nothing in the index"));
                }
            }
        }
        Ok(problems)
    }
}
