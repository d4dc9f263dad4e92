//! Format 1: garbage collection by reference counts, and the consistency check.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::BufWriter;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};

use journal::{Batch, Journal, Table};

use super::format::{self, ChunkEntry, ChunkId, PackEntry, Piece, GC_PACK};
use crate::memstore::error::{io, Error, Result};
use crate::memstore::MemStore;

/// What the format-1 collector did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunk entries without references removed from the index.
    pub chunks_removed: u64,
    /// Disk space given back (pack bytes deleted minus pack bytes rewritten).
    pub bytes_freed: u64,
    /// Pack files deleted (emptied, rewritten, or named by nothing).
    pub packs_removed: u64,
    /// Mostly-dead packs whose live chunks were copied to a new pack.
    pub packs_rewritten: u64,
}

/// A pack is rewritten when less than this share of it (in 1/100) is live.
const REWRITE_BELOW_PERCENT: u64 = 50;

#[derive(Debug, Default)]
struct PackUse {
    live: Vec<(ChunkId, ChunkEntry)>,
    dead: Vec<ChunkId>,
    live_bytes: u64,
}

fn chunk_id(key: &[u8]) -> Result<ChunkId> {
    key.try_into()
        .map_err(|_| Error::Inconsistent(format!("chunk key {key:02x?} is not 32 bytes")))
}

fn pack_id(key: &[u8]) -> Result<u64> {
    let b: [u8; 8] = key
        .try_into()
        .map_err(|_| Error::Inconsistent(format!("pack key {key:02x?} is not 8 bytes")))?;
    Ok(u64::from_be_bytes(b))
}

impl MemStore {
    /// Removes chunks without references, deletes packs nothing live points into, and
    /// rewrites packs that are mostly dead. Commits its own index updates, one pack at a
    /// time: a replacement pack is synced before the commit that names it, an old pack is
    /// deleted only after the commit that stops naming it. Pack files named by nothing are
    /// deleted only if they are gc's own or of an operation the journal ended.
    pub(crate) fn gc_v1(&self, journal: &mut Journal) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut packs: BTreeMap<u64, PackEntry> = BTreeMap::new();
        for (key, entry) in super::scan_packs(journal)? {
            packs.insert(pack_id(&key)?, entry);
        }
        let open: BTreeSet<u64> = journal.open_ops()?.into_iter().collect();
        let mut removed_orphans = false;
        for (pack, path) in self.v1_pack_files()? {
            // Only what the journal accounts for: `op-<op>.pack` of an operation that ended
            // (an ingest whose step never committed), or gc's own unnamed packs. A pack of
            // an operation still open is its recovery's; one of an operation the journal
            // does not know is left for `verify` to report.
            let released = pack & GC_PACK != 0
                || (!open.contains(&pack) && journal.op(pack)?.is_some_and(|o| o.ended.is_some()));
            if packs.contains_key(&pack) || !released {
                continue;
            }
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&path).map_err(io("remove", &path))?;
            report.bytes_freed += len;
            report.packs_removed += 1;
            removed_orphans = true;
        }
        if removed_orphans {
            super::sync_dir(&self.v1_packs)?;
        }

        let mut uses: BTreeMap<u64, PackUse> = BTreeMap::new();
        for (key, entry) in super::scan_chunks(journal)? {
            let id = chunk_id(&key)?;
            let u = uses.entry(entry.pack).or_default();
            if entry.refs == 0 {
                u.dead.push(id);
            } else {
                u.live_bytes += format::RECORD_HEADER + u64::from(entry.len);
                u.live.push((id, entry));
            }
        }
        if let Some(pack) = uses.keys().find(|p| !packs.contains_key(p)) {
            return Err(Error::Inconsistent(format!(
                "chunks point into pack {}, which the index does not know",
                format::pack_file_name(*pack)
            )));
        }
        let mut next_gc = packs
            .keys()
            .filter(|p| *p & GC_PACK != 0)
            .map(|p| (p & !GC_PACK) + 1)
            .max()
            .unwrap_or(0);

        for (pack, entry) in packs {
            let u = uses.remove(&pack).unwrap_or_default();
            let mut batch = Batch::new();
            for id in &u.dead {
                batch.delete(Table::Chunks, &format::chunk_key(id));
            }
            let old_path = self.v1_pack_path(pack);
            let rewrite = !u.live.is_empty()
                && u.live_bytes * 100
                    < entry.bytes.saturating_sub(format::PACK_HEADER) * REWRITE_BELOW_PERCENT;
            let delete_old = u.live.is_empty() || rewrite;
            if u.dead.is_empty() && !delete_old {
                continue;
            }
            let mut written = 0;
            if rewrite {
                let new_pack = GC_PACK | next_gc;
                next_gc += 1;
                let (new_entry, moved) = self.copy_live(pack, new_pack, &u.live)?;
                written = new_entry.bytes;
                for (id, e) in moved {
                    batch.put(Table::Chunks, &format::chunk_key(&id), &e)?;
                }
                batch.put(Table::Packs, &format::pack_key(new_pack), &new_entry)?;
                report.packs_rewritten += 1;
            }
            if delete_old {
                batch.delete(Table::Packs, &format::pack_key(pack));
            }
            journal.commit(batch)?;
            fail::fail_point!("engine::memstore::gc::after-commit", |_| Err(
                super::failpoint("engine::memstore::gc::after-commit", &old_path)
            ));
            report.chunks_removed += u.dead.len() as u64;
            if delete_old {
                match fs::remove_file(&old_path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("remove", &old_path)(e)),
                }
                super::sync_dir(&self.v1_packs)?;
                report.packs_removed += 1;
                report.bytes_freed += entry.bytes.saturating_sub(written);
            }
        }
        Ok(report)
    }

    /// Copies the live chunks of `pack` (each checked against its id) into the new pack
    /// `new_pack`, made durable; returns its entry and the chunks' new locations.
    fn copy_live(
        &self,
        pack: u64,
        new_pack: u64,
        live: &[(ChunkId, ChunkEntry)],
    ) -> Result<(PackEntry, Vec<(ChunkId, ChunkEntry)>)> {
        let old_path = self.v1_pack_path(pack);
        let new_path = self.v1_pack_path(new_pack);
        let old = fs::File::open(&old_path).map_err(io("open", &old_path))?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&new_path)
            .map_err(io("create", &new_path))?;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io("set mode of", &new_path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        format::write_pack_header(&mut out, new_pack).map_err(io("write", &new_path))?;
        let mut len = format::PACK_HEADER;
        let mut sorted: Vec<&(ChunkId, ChunkEntry)> = live.iter().collect();
        sorted.sort_by_key(|(_, e)| e.offset);
        let mut moved = Vec::with_capacity(live.len());
        let mut buf = vec![0u8; format::CHUNK_MAX];
        for (id, entry) in sorted {
            let data = buf.get_mut(..entry.len as usize).ok_or_else(|| {
                Error::Inconsistent(format!("chunk {} too long", format::hex(id)))
            })?;
            old.read_exact_at(data, entry.offset)
                .map_err(io("read", &old_path))?;
            if blake3::hash(data).as_bytes() != id {
                return Err(Error::Corruption {
                    image: String::new(),
                    chunk: format::hex(id),
                    pack: old_path,
                    offset: entry.offset,
                    why: "found while gc copied live chunks".into(),
                });
            }
            let offset = len + format::RECORD_HEADER;
            len += format::write_record(&mut out, id, data).map_err(io("write", &new_path))?;
            moved.push((
                *id,
                ChunkEntry {
                    pack: new_pack,
                    offset,
                    ..*entry
                },
            ));
        }
        let file = out
            .into_inner()
            .map_err(|e| io("write", &new_path)(e.into_error()))?;
        file.sync_all().map_err(io("sync", &new_path))?;
        super::sync_dir(&self.v1_packs)?;
        let entry = PackEntry {
            bytes: len,
            chunks: moved.len() as u64,
        };
        Ok((entry, moved))
    }

    /// Pack files in the directory, by pack id.
    fn v1_pack_files(&self) -> Result<Vec<(u64, std::path::PathBuf)>> {
        let mut out = Vec::new();
        let items = match fs::read_dir(&self.v1_packs) {
            Ok(items) => items,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io("list", &self.v1_packs)(e)),
        };
        for item in items {
            let item = item.map_err(io("list", &self.v1_packs))?;
            if let Some(pack) = item.file_name().to_str().and_then(format::parse_pack_name) {
                out.push((pack, item.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Compares the store with what should be in it: `referenced` maps each image the
    /// catalog holds to its number of holders. Lists every difference: an image's holder
    /// count, a chunk's reference count against the manifests, missing or short packs,
    /// pack files the index does not know (including the pack of an ingest still in
    /// progress or waiting for recovery). Reads the index and file sizes, not chunk data
    /// (that is [`MemStore::verify`]).
    pub(crate) fn check_v1(
        &self,
        journal: &Journal,
        referenced: &BTreeMap<String, u64>,
    ) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let mut counts: BTreeMap<ChunkId, u64> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (key, head) in super::scan_heads(journal)? {
            let id = chunk_id(key.get(1..).unwrap_or_default())?;
            let image = format::hex(&id);
            let expected = referenced.get(&image).copied().unwrap_or(0);
            if head.refs != expected {
                problems.push(format!(
                    "image {image} has {} holders in the store, {expected} expected",
                    head.refs
                ));
            }
            let mut bytes = 0u64;
            let mut pieces = 0u64;
            for segment in 0..head.segments {
                let Some(part) =
                    journal.get::<Vec<Piece>>(Table::Images, &format::segment_key(&id, segment))?
                else {
                    problems.push(format!("image {image} lacks manifest segment {segment}"));
                    continue;
                };
                for piece in part {
                    bytes += piece.bytes();
                    pieces += 1;
                    if let Piece::Data { id, .. } = piece {
                        *counts.entry(id).or_default() += 1;
                    }
                }
            }
            if bytes != head.bytes || pieces != head.pieces {
                problems.push(format!(
                    "image {image}: manifest covers {bytes} bytes in {pieces} pieces, head says {} in {}",
                    head.bytes, head.pieces
                ));
            }
            seen.insert(image);
        }
        for (image, n) in referenced {
            if *n > 0 && !seen.contains(image) {
                problems.push(format!("image {image} is held {n} times but not stored"));
            }
        }

        let mut packs: BTreeMap<u64, PackEntry> = BTreeMap::new();
        for (key, entry) in super::scan_packs(journal)? {
            packs.insert(pack_id(&key)?, entry);
        }
        let mut sizes: BTreeMap<u64, Option<u64>> = BTreeMap::new();
        for (pack, entry) in &packs {
            let path = self.v1_pack_path(*pack);
            let size = fs::metadata(&path).ok().map(|m| m.len());
            match size {
                None => problems.push(format!("pack {} is missing", path.display())),
                Some(s) if s < entry.bytes => problems.push(format!(
                    "pack {} is {s} bytes long, {} expected",
                    path.display(),
                    entry.bytes
                )),
                Some(_) => {}
            }
            sizes.insert(*pack, size);
        }
        for (key, entry) in super::scan_chunks(journal)? {
            let id = chunk_id(&key)?;
            let expected = counts.remove(&id).unwrap_or(0);
            if entry.refs != expected {
                problems.push(format!(
                    "chunk {} has {} references, the manifests hold {expected}",
                    format::hex(&id),
                    entry.refs
                ));
            }
            match sizes.get(&entry.pack) {
                None => problems.push(format!(
                    "chunk {} is in pack {}, which the index does not know",
                    format::hex(&id),
                    format::pack_file_name(entry.pack)
                )),
                Some(Some(size)) if entry.offset + u64::from(entry.len) > *size => {
                    problems.push(format!(
                        "chunk {} ends past the end of pack {}",
                        format::hex(&id),
                        format::pack_file_name(entry.pack)
                    ))
                }
                Some(_) => {}
            }
        }
        for (id, n) in counts {
            problems.push(format!(
                "chunk {} is named {n} times by manifests but missing from the index",
                format::hex(&id)
            ));
        }
        for (pack, path) in self.v1_pack_files()? {
            if !packs.contains_key(&pack) {
                problems.push(format!("pack file {} is named by nothing", path.display()));
            }
        }
        Ok(problems)
    }
}
