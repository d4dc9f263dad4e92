//! Reading images back: verify, stage and restore; every chunk is checked against its id
//! before it is used, and the image id covers the slots.
//!
//! **One pass from disk.** [`MemStore::verify`] reads every chunk of an image once, pack
//! by pack in offset order (large sequential reads, a reader thread ahead of the checking
//! thread), and checks it. A revert verifies before the domain is touched, so a damaged
//! image is refused while nothing has changed; the reads leave the packs in the page cache,
//! from where [`MemStore::restore`] streams the image, checking every chunk again (cheap
//! next to a read from disk). Measured here, that beats holding a verified copy in memory
//! ([`MemStore::stage`]): fresh memory is slow to touch on these hosts (0.3 GB/s), page
//! cache already filled is not. An image larger than the page cache holds is read from
//! disk twice.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::mpsc;

use journal::{Journal, Table};

use super::error::{Error, Result};
use super::format::{self, ChunkLoc, Id, ImageRecord, PackRecord, Slot};
use super::manifest::{self, Image};
use super::pack;
use super::MemStore;

/// Largest gap between two chunks read in one request.
const MAX_GAP: u64 = 64 << 10;
/// Largest single read.
const MAX_RUN: u64 = 8 << 20;

/// An image and where its manifest is.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) image: Image,
    pub(crate) manifest: String,
    pub(crate) depth: u32,
    pub(crate) packs: Vec<Id>,
}

/// A verified image held in memory, ready to be restored.
#[derive(Debug)]
pub struct Staged {
    image: String,
    data: Vec<u8>,
}

impl Staged {
    pub(crate) fn new(image: &str, data: Vec<u8>) -> Staged {
        Staged {
            image: image.to_string(),
            data,
        }
    }

    /// The image id.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// The image's length.
    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Writes the image into `sink`; `progress` gets the bytes written so far.
    pub fn write_to(&self, sink: &mut dyn Write, progress: &mut dyn FnMut(u64)) -> Result<u64> {
        let mut done = 0u64;
        for part in self.data.chunks(1 << 20) {
            sink.write_all(part).map_err(sink_error)?;
            done += part.len() as u64;
            progress(done);
        }
        sink.flush().map_err(sink_error)?;
        Ok(done)
    }
}

fn sink_error(e: std::io::Error) -> Error {
    Error::Io {
        op: "write restored image to",
        path: "<sink>".into(),
        source: e,
    }
}

/// Images up to this size are staged in memory by a revert: half the memory available now.
pub fn stage_limit() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    available / 2
}

/// One chunk to read: where, and which.
#[derive(Debug, Clone, Copy)]
struct Want {
    offset: u64,
    len: u32,
    id: Id,
}

impl MemStore {
    /// Loads an image's manifest chain.
    pub(crate) fn load(&self, journal: &Journal, image: &str) -> Result<Loaded> {
        let id = format::parse_id(image).ok_or_else(|| Error::NoSuchImage(image.to_string()))?;
        let record: ImageRecord = journal
            .get(Table::Images, &format::image_key(&id))?
            .ok_or_else(|| Error::NoSuchImage(image.to_string()))?;
        let (loaded, packs, depth) = manifest::load(self.objects.as_ref(), &record.manifest)?;
        if loaded.id != id {
            return Err(Error::BadManifest {
                object: record.manifest,
                why: format!("it holds image {}, not {image}", format::hex(&loaded.id)),
            });
        }
        Ok(Loaded {
            image: loaded,
            manifest: record.manifest,
            depth,
            packs,
        })
    }

    /// Where every distinct chunk of `image` is: per pack object, sorted by offset.
    fn locate(
        &self,
        journal: &Journal,
        image: &Image,
        hint: &[Id],
    ) -> Result<BTreeMap<String, Vec<Want>>> {
        let mut needed: HashSet<Id> = image
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Chunk { id, .. } => Some(*id),
                Slot::Zero(_) => None,
            })
            .collect();
        let mut plan: BTreeMap<String, Vec<Want>> = BTreeMap::new();
        for name in hint {
            let key = format::pack_index_key(format::pack_key_of(name));
            let Some(rec) = journal.get::<PackRecord>(Table::Packs, &key)? else {
                continue;
            };
            if &rec.name != name {
                continue;
            }
            let object = format::pack_object(name);
            let Ok(trailer) = pack::read_trailer(self.objects.as_ref(), &object, Some(name)) else {
                // Its chunks are looked up one by one below, and fail there if lost.
                continue;
            };
            for e in trailer.entries {
                if needed.remove(&e.id) {
                    plan.entry(object.clone()).or_default().push(Want {
                        offset: u64::from(e.offset),
                        len: e.len,
                        id: e.id,
                    });
                }
            }
        }
        for id in needed {
            let loc: ChunkLoc = journal
                .get(Table::Chunks, &format::chunk_key(&id))?
                .ok_or_else(|| {
                    Error::Inconsistent(format!(
                        "image {} names chunk {} missing from the index",
                        format::hex(&image.id),
                        format::hex(&id)
                    ))
                })?;
            let rec: PackRecord = journal
                .get(Table::Packs, &format::pack_index_key(loc.pack))?
                .ok_or_else(|| {
                    Error::Inconsistent(format!(
                        "chunk {} is in pack {:016x}, which the index does not know",
                        format::hex(&id),
                        loc.pack
                    ))
                })?;
            plan.entry(format::pack_object(&rec.name))
                .or_default()
                .push(Want {
                    offset: u64::from(loc.offset),
                    len: loc.len,
                    id,
                });
        }
        for wants in plan.values_mut() {
            wants.sort_by_key(|w| w.offset);
        }
        Ok(plan)
    }

    /// Reads every chunk of `image` once (pack by pack, in offset order) and checks it;
    /// `found` gets each checked chunk. Returns the number of chunk bytes read.
    fn read_checked(
        &self,
        journal: &Journal,
        image_hex: &str,
        loaded: &Loaded,
        found: &mut dyn FnMut(&Id, &[u8]),
    ) -> Result<u64> {
        let plan = self.locate(journal, &loaded.image, &loaded.packs)?;
        let store = self.objects.as_ref();
        // Runs: (object, first offset, length, the chunks in it).
        let mut runs: Vec<(String, u64, u64, Vec<Want>)> = Vec::new();
        for (object, wants) in plan {
            for w in wants {
                match runs.last_mut() {
                    Some((o, start, len, ws))
                        if *o == object
                            && w.offset >= *start + *len
                            && w.offset - (*start + *len) <= MAX_GAP
                            && w.offset + u64::from(w.len) - *start <= MAX_RUN =>
                    {
                        *len = w.offset + u64::from(w.len) - *start;
                        ws.push(w);
                    }
                    _ => runs.push((object.clone(), w.offset, u64::from(w.len), vec![w])),
                }
            }
        }
        let mut total = 0u64;
        std::thread::scope(|s| -> Result<()> {
            let (tx, rx) = mpsc::sync_channel::<Result<(usize, Vec<u8>)>>(2);
            let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
            let runs_ref = &runs;
            s.spawn(move || {
                for (i, (object, start, len, _)) in runs_ref.iter().enumerate() {
                    let mut buf = spare_rx.try_recv().unwrap_or_default();
                    buf.resize(*len as usize, 0);
                    let read = store.read_at(object, *start, &mut buf).map_err(|e| {
                        if e.kind() == store::ErrorKind::NotFound {
                            Error::MissingPack(object.clone())
                        } else if e.kind() == store::ErrorKind::Short {
                            Error::Corruption {
                                image: image_hex.to_string(),
                                chunk: String::new(),
                                pack: object.into(),
                                offset: *start,
                                why: "the pack ends before its chunks do".into(),
                            }
                        } else {
                            Error::Store(e)
                        }
                    });
                    let stop = read.is_err();
                    if tx.send(read.map(|()| (i, buf))).is_err() || stop {
                        return;
                    }
                }
            });
            for item in rx {
                let (i, buf) = item?;
                let (object, start, _, wants) = &runs[i];
                for w in wants {
                    let at = (w.offset - start) as usize;
                    let data = &buf[at..at + w.len as usize];
                    let got = blake3::hash(data);
                    if got.as_bytes() != &w.id {
                        return Err(Error::Corruption {
                            image: image_hex.to_string(),
                            chunk: format::hex(&w.id),
                            pack: object.into(),
                            offset: w.offset,
                            why: format!("the data hashes to {}", got.to_hex()),
                        });
                    }
                    total += u64::from(w.len);
                    found(&w.id, data);
                }
                let _ = spare_tx.send(buf);
            }
            Ok(())
        })?;
        Ok(total)
    }

    /// Reads every chunk of `image` and checks it. Returns the image length.
    pub(crate) fn verify_v2(&self, journal: &Journal, image: &str) -> Result<u64> {
        let loaded = self.load(journal, image)?;
        self.read_checked(journal, image, &loaded, &mut |_, _| {})?;
        Ok(loaded.image.bytes)
    }

    /// Reads and checks every chunk of `image` once and keeps the image in memory.
    pub fn stage(&self, journal: &Journal, image: &str) -> Result<Staged> {
        let loaded = self.load(journal, image)?;
        let len = usize::try_from(loaded.image.bytes)
            .map_err(|_| Error::Inconsistent("image too large to stage".into()))?;
        let mut data = vec![0u8; len];
        // Where each chunk goes: (id, offset in the image), sorted by id.
        let mut places: Vec<(Id, u64)> = Vec::with_capacity(loaded.image.slots.len());
        let mut at = 0u64;
        for s in &loaded.image.slots {
            if let Slot::Chunk { id, .. } = s {
                places.push((*id, at));
            }
            at += u64::from(s.len());
        }
        places.sort_unstable();
        self.read_checked(journal, image, &loaded, &mut |id, bytes| {
            let first = places.partition_point(|(i, _)| i < id);
            for (_, off) in places[first..].iter().take_while(|(i, _)| i == id) {
                let off = *off as usize;
                data[off..off + bytes.len()].copy_from_slice(bytes);
            }
        })?;
        Ok(Staged::new(image, data))
    }

    /// Writes `image` into `sink` in order, reading each chunk (runs of consecutive chunks
    /// in one read) and checking it before it is written; a bad chunk stops the restore
    /// before anything of it is written.
    pub(crate) fn restore_v2(
        &self,
        journal: &Journal,
        image: &str,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        let loaded = self.load(journal, image)?;
        let plan = self.locate(journal, &loaded.image, &loaded.packs)?;
        let mut loc: std::collections::HashMap<Id, (usize, u64)> = std::collections::HashMap::new();
        let objects: Vec<String> = plan.keys().cloned().collect();
        for (i, wants) in plan.values().enumerate() {
            for w in wants {
                loc.insert(w.id, (i, w.offset));
            }
        }
        let zeros = vec![0u8; 1 << 20];
        let mut buf = Vec::new();
        let mut done = 0u64;
        let slots = &loaded.image.slots;
        // Large writes: the sink is often a pipe to another thread or process, and a write
        // per 4 KiB page would cost a hand-over per page.
        let mut sink = std::io::BufWriter::with_capacity(1 << 20, sink);
        let mut i = 0;
        while i < slots.len() {
            match slots[i] {
                Slot::Zero(len) => {
                    let mut left = len as usize;
                    while left > 0 {
                        let n = left.min(zeros.len());
                        sink.write_all(&zeros[..n]).map_err(sink_error)?;
                        left -= n;
                    }
                    done += u64::from(len);
                    i += 1;
                }
                Slot::Chunk { id, len } => {
                    let (pack, start) = loc[&id];
                    // Extend the run while the next slots follow in the same pack.
                    let mut end = start + u64::from(len);
                    let mut j = i + 1;
                    while let Some(Slot::Chunk {
                        id: next,
                        len: nlen,
                    }) = slots.get(j)
                    {
                        match loc.get(next) {
                            Some(&(p, off)) if p == pack && off == end && end - start < MAX_RUN => {
                                end += u64::from(*nlen);
                                j += 1;
                            }
                            _ => break,
                        }
                    }
                    buf.resize((end - start) as usize, 0);
                    self.objects
                        .read_at(&objects[pack], start, &mut buf)
                        .map_err(|e| match e.kind() {
                            store::ErrorKind::NotFound => Error::MissingPack(objects[pack].clone()),
                            _ => Error::Store(e),
                        })?;
                    let mut at = 0usize;
                    for slot in &slots[i..j] {
                        let Slot::Chunk { id, len } = slot else {
                            continue;
                        };
                        let data = &buf[at..at + *len as usize];
                        let got = blake3::hash(data);
                        if got.as_bytes() != id {
                            return Err(Error::Corruption {
                                image: image.to_string(),
                                chunk: format::hex(id),
                                pack: objects[pack].clone().into(),
                                offset: start + at as u64,
                                why: format!("the data hashes to {}", got.to_hex()),
                            });
                        }
                        at += *len as usize;
                    }
                    sink.write_all(&buf).map_err(sink_error)?;
                    done += end - start;
                    i = j;
                }
            }
            progress(done);
        }
        sink.flush().map_err(sink_error)?;
        Ok(done)
    }
}
