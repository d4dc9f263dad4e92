//! Capture: a memory stream is cut, hashed, compared and packed by a pipeline of three
//! threads; seal then makes it durable and returns its index updates.
//!
//! ```text
//! caller (the host writes the stream)   hasher                          writer
//! copy into 4 MiB blocks, cut pieces -> zero check, BLAKE3, compare  -> put packs
//!                                       with the parent's slot, then    (no sync)
//!                                       this image's, then the index;
//!                                       new chunks into 16 MiB packs
//! ```
//!
//! Queues hold at most [`BLOCKS_IN_FLIGHT`] blocks and [`PACKS_IN_FLIGHT`] packs, and
//! buffers are recycled: peak memory is ~64 MiB of buffers plus what grows with the image:
//! its slots (40 bytes a slot: 10 MiB per GiB of raw memory), the parent's slots, and ~100
//! bytes per new chunk (its id in the dedup set and its index entry).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::mpsc::{self, Receiver, SyncSender};

use journal::{Batch, Journal, Table};
use store::ObjectStore;

use super::cut::{Cutter, PieceKind, LOOKAHEAD};
use super::error::{Error, Result};
use super::format::{self, ChunkLoc, Id, ImageRecord, PackRecord, Slot, PACK_TARGET};
use super::manifest::{self, Image, ParentRef};
use super::pack::PackBuilder;
use super::MemStore;

/// Size of the blocks the caller hands to the hasher.
const BLOCK: usize = 4 << 20;
/// Blocks queued between the caller and the hasher.
const BLOCKS_IN_FLIGHT: usize = 2;
/// Packs queued between the hasher and the writer.
const PACKS_IN_FLIGHT: usize = 1;

/// A memory image captured (every new chunk put into the store, nothing durable yet),
/// waiting for [`MemStore::seal`].
#[derive(Debug)]
pub struct Captured {
    op: u64,
    image: Image,
    parent: Option<(String, u32, Vec<Slot>)>,
    parent_packs: Vec<Id>,
    new_chunks: Vec<(Id, ChunkLoc)>,
    packs: Vec<PackRecord>,
    used_packs: HashSet<Id>,
    stats: CaptureStats,
}

/// What a capture found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Length of the stream.
    pub bytes: u64,
    /// Chunk bytes newly stored (after deduplication).
    pub bytes_new: u64,
    /// Pieces that are pages (raw memory, or pages of `xl` `PAGE_DATA` records).
    pub pages: u64,
    /// Of those, pages stored as new chunks.
    pub pages_new: u64,
    /// Pieces of `xl` framing.
    pub framing: u64,
    /// Content-defined pieces (an unknown stream, or the rest of one the parser gave up on).
    pub opaque: u64,
    /// Slots that are zeros (never stored).
    pub zero: u64,
    /// Slots equal to the parent's slot at the same position.
    pub same_as_parent: u64,
    /// Packs put.
    pub packs: u64,
}

impl Captured {
    /// The image id (hex).
    pub fn image(&self) -> String {
        format::hex(&self.image.id)
    }

    /// What the capture found.
    pub fn stats(&self) -> CaptureStats {
        self.stats
    }

    /// The operation that captured it.
    pub fn op(&self) -> u64 {
        self.op
    }
}

/// The outcome of [`MemStore::seal`].
#[derive(Debug)]
pub struct Sealed {
    /// Image id (hex).
    pub image: String,
    /// Length of the image.
    pub bytes: u64,
    /// Bytes newly stored after deduplication.
    pub bytes_new: u64,
    /// Bytes written to the store: packs (data and trailers) and the manifest.
    pub bytes_written: u64,
    /// The object name of the manifest written.
    pub manifest: String,
    /// Index updates (new chunks, packs, the image): commit them with the step that
    /// records the image. Everything they name is durable.
    pub batch: Batch,
}

struct Block {
    data: Vec<u8>,
    cuts: Vec<(u32, u32, PieceKind)>,
}

/// What the hasher knows going in.
struct Context<'a> {
    journal: &'a Journal,
    parent: Option<&'a [Slot]>,
    /// Index records of packs that are missing or short in the store: chunks in them are
    /// stored again.
    bad_packs: HashSet<u64>,
    /// Every pack the index records, by key.
    pack_names: HashMap<u64, Id>,
}

struct HashOut {
    slots: Vec<Slot>,
    new_chunks: Vec<(Id, ChunkLoc)>,
    packs: Vec<PackRecord>,
    used_packs: HashSet<Id>,
    stats: CaptureStats,
}

impl MemStore {
    /// Captures one memory stream: `feed` writes it (as `xl save` writes its file) into the
    /// writer it is given. New chunks are put into the store as packs, not made durable
    /// ([`MemStore::seal`] does that). `parent`: the image of the domain's previous
    /// checkpoint, compared slot by slot first.
    ///
    /// If `feed` or the capture fails, packs already put are left for
    /// [`MemStore::abandon`].
    pub fn capture<E: From<Error>>(
        &self,
        journal: &Journal,
        op: u64,
        parent: Option<&str>,
        feed: impl FnOnce(&mut dyn Write) -> std::result::Result<(), E>,
    ) -> std::result::Result<Captured, E> {
        // A parent that cannot be read is no parent: everything is compared with the index.
        let parent = parent.and_then(|image| self.load(journal, image).ok());
        let (pack_names, bad_packs) = self.pack_health(journal)?;
        let ctx = Context {
            journal,
            parent: parent.as_ref().map(|p| p.image.slots.as_slice()),
            bad_packs,
            pack_names,
        };
        let store = self.objects.as_ref();
        let (fed, hashed) = std::thread::scope(|s| {
            let (block_tx, block_rx) = mpsc::sync_channel::<Block>(BLOCKS_IN_FLIGHT);
            let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
            let (pack_tx, pack_rx) = mpsc::sync_channel::<(String, Vec<u8>)>(PACKS_IN_FLIGHT);
            let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
            let writer = s.spawn(move || write_packs(store, pack_rx, spare_tx));
            let ctx = &ctx;
            let hasher =
                s.spawn(move || hash_blocks(ctx, op, block_rx, free_tx, pack_tx, spare_rx));
            let mut sink = Sink {
                tx: Some(block_tx),
                free: free_rx,
                block: Vec::with_capacity(BLOCK),
                cutter: Cutter::new(),
                bytes: 0,
                failed: false,
            };
            let fed = feed(&mut sink);
            let end = sink.finish();
            let hashed = hasher
                .join()
                .unwrap_or_else(|_| Err(Error::Inconsistent("the hashing thread panicked".into())));
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(Error::Inconsistent("the pack writer panicked".into())));
            // A failed put stops the hasher too; the put's error is the cause.
            let hashed = match (hashed, written) {
                (_, Err(e)) => Err(e),
                (h, Ok(())) => h,
            };
            (fed.and(end.map_err(E::from)), hashed)
        });
        fed?;
        let mut out = hashed?;
        let image = Image::new(std::mem::take(&mut out.slots));
        out.stats.bytes = image.bytes;
        Ok(Captured {
            op,
            image,
            parent_packs: parent.as_ref().map(|p| p.packs.clone()).unwrap_or_default(),
            parent: parent.map(|p| (p.manifest, p.depth, p.image.slots)),
            new_chunks: out.new_chunks,
            packs: out.packs,
            used_packs: out.used_packs,
            stats: out.stats,
        })
    }

    /// Captures raw memory from its parent image and the pages the host says were written
    /// since it (`pages`, ascending page indexes): `read` gives each of those pages to the
    /// function it is handed; only they are read and hashed, every other page is the
    /// parent's. Returns `None`, having read nothing, when the parent cannot serve as the
    /// base: it is not stored as pages of `bytes` bytes of raw memory, or a pack of the
    /// store is missing or short (the full capture then stores its chunks again).
    pub fn capture_pages<E: From<Error>>(
        &self,
        journal: &Journal,
        op: u64,
        parent: &str,
        bytes: u64,
        pages: &[u64],
        read: impl FnOnce(
            &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
        ) -> std::result::Result<(), E>,
    ) -> std::result::Result<Option<Captured>, E> {
        let Ok(parent) = self.load(journal, parent) else {
            return Ok(None);
        };
        let page = format::PAGE as u64;
        let n = bytes.div_ceil(page) as usize;
        let raw = parent.image.bytes == bytes
            && parent.image.slots.len() == n
            && parent
                .image
                .slots
                .iter()
                .enumerate()
                .all(|(i, s)| u64::from(s.len()) == page.min(bytes - i as u64 * page));
        let (pack_names, bad_packs) = self.pack_health(journal)?;
        if !raw || !bad_packs.is_empty() || pages.iter().any(|p| *p as usize >= n) {
            return Ok(None);
        }
        let ctx = Context {
            journal,
            parent: Some(parent.image.slots.as_slice()),
            bad_packs,
            pack_names,
        };
        let mut slots = parent.image.slots.clone();
        let mut packer = Packer::new(&ctx, op);
        let mut failed: Option<Error> = None;
        let mut seen = 0usize;
        let mut sink = |index: u64, data: &[u8]| -> std::io::Result<()> {
            let i = index as usize;
            let step = (|| -> Result<()> {
                let expected = slots.get(i).map(|s| s.len() as usize);
                if expected != Some(data.len()) {
                    return Err(Error::Inconsistent(format!(
                        "the host gave page {index} with {} bytes",
                        data.len()
                    )));
                }
                let (slot, full) = packer.add(i, PieceKind::Page, data, &Vec::new)?;
                slots[i] = slot;
                seen += 1;
                if let Some((name, pack)) = full {
                    self.objects.put(&name, &pack)?;
                }
                Ok(())
            })();
            step.map_err(|e| {
                let io = std::io::Error::other(e.to_string());
                failed = Some(e);
                io
            })
        };
        let fed = read(&mut sink);
        if let Some(e) = failed {
            return Err(E::from(e));
        }
        fed?;
        if seen != pages.len() {
            return Err(E::from(Error::Inconsistent(format!(
                "the host gave {seen} of the {} pages asked",
                pages.len()
            ))));
        }
        let (mut out, last) = packer.finish()?;
        if let Some((name, pack)) = last {
            self.objects.put(&name, &pack).map_err(Error::from)?;
        }
        out.stats.same_as_parent += (n - pages.len()) as u64;
        out.stats.pages = n as u64;
        let image = Image::new(slots);
        out.stats.bytes = image.bytes;
        Ok(Some(Captured {
            op,
            image,
            parent_packs: parent.packs.clone(),
            parent: Some((parent.manifest, parent.depth, parent.image.slots)),
            new_chunks: out.new_chunks,
            packs: out.packs,
            used_packs: out.used_packs,
            stats: out.stats,
        }))
    }

    /// Makes a captured image durable: flushes its packs, writes its manifest (a delta
    /// against the parent's when small), and returns the index updates. Idempotent.
    pub fn seal(&self, captured: Captured) -> Result<Sealed> {
        self.objects.flush()?;
        fail::fail_point!("engine::memstore::after-pack-sync", |_| Err(
            Error::Failpoint("engine::memstore::after-pack-sync")
        ));
        let object = format::manifest_object(&self.state, captured.op);
        let parent_ref = captured
            .parent
            .as_ref()
            .map(|(object, depth, slots)| ParentRef {
                object: object.clone(),
                depth: *depth,
                slots,
            });
        let packs: Vec<Id> = captured.used_packs.iter().copied().collect();
        let data = manifest::encode(
            &captured.image,
            captured.op,
            parent_ref.as_ref(),
            &packs,
            &captured.parent_packs,
        );
        self.objects.put(&object, &data)?;
        self.objects.flush()?;
        let mut batch = Batch::new();
        for (id, loc) in &captured.new_chunks {
            batch.put(Table::Chunks, &format::chunk_key(id), loc)?;
        }
        let mut pack_bytes = 0;
        for p in &captured.packs {
            batch.put(
                Table::Packs,
                &format::pack_index_key(format::pack_key_of(&p.name)),
                p,
            )?;
            pack_bytes += p.len;
        }
        let record = ImageRecord {
            manifest: object.clone(),
            bytes: captured.image.bytes,
            slots: captured.image.slots.len() as u64,
        };
        batch.put(
            Table::Images,
            &format::image_key(&captured.image.id),
            &record,
        )?;
        Ok(Sealed {
            image: format::hex(&captured.image.id),
            bytes: captured.image.bytes,
            bytes_new: captured.stats.bytes_new,
            bytes_written: pack_bytes + data.len() as u64,
            manifest: object,
            batch,
        })
    }

    /// Index records of every pack, and the keys of those missing or shorter in the store.
    fn pack_health(&self, journal: &Journal) -> Result<(HashMap<u64, Id>, HashSet<u64>)> {
        let present: HashMap<Id, u64> = self
            .objects
            .list("packs/")?
            .into_iter()
            .filter_map(|m| Some((format::parse_pack_object(&m.name)?, m.len)))
            .collect();
        let mut names = HashMap::new();
        let mut bad = HashSet::new();
        for (key, rec) in journal.scan_len::<PackRecord>(Table::Packs, b"p", 9)? {
            if key.len() != 9 {
                continue;
            }
            let k = format::pack_key_of(&rec.name);
            if present.get(&rec.name).is_none_or(|len| *len < rec.len) {
                bad.insert(k);
            }
            names.insert(k, rec.name);
        }
        Ok((names, bad))
    }
}

/// The writer the host's stream goes into: collects it into blocks of whole pieces.
struct Sink {
    tx: Option<SyncSender<Block>>,
    free: Receiver<Vec<u8>>,
    block: Vec<u8>,
    cutter: Cutter,
    bytes: u64,
    failed: bool,
}

impl Sink {
    /// Cuts what can be cut and sends the block once full; keeps the uncut tail.
    fn cut_and_send(&mut self, eof: bool) -> Result<()> {
        let mut cuts = Vec::new();
        let mut at = 0;
        while self.block.len() - at >= LOOKAHEAD || (eof && at < self.block.len()) {
            let (n, kind) = self.cutter.next(&self.block[at..], eof);
            cuts.push((at as u32, n as u32, kind));
            at += n;
        }
        if cuts.is_empty() {
            return Ok(());
        }
        let next = self
            .free
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BLOCK));
        let mut full = std::mem::replace(&mut self.block, next);
        self.block.clear();
        self.block.extend_from_slice(&full[at..]);
        full.truncate(at);
        let tx = self.tx.as_ref().ok_or(Error::Poisoned)?;
        tx.send(Block { data: full, cuts })
            .map_err(|_| Error::Inconsistent("the hashing thread stopped".into()))
    }

    fn finish(&mut self) -> Result<()> {
        let result = if self.failed {
            Err(Error::Poisoned)
        } else {
            self.cut_and_send(true)
        };
        self.tx = None;
        result
    }
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.failed {
            return Err(std::io::Error::other(Error::Poisoned));
        }
        let room = BLOCK.saturating_sub(self.block.len()).max(1);
        let n = data.len().min(room);
        self.block.extend_from_slice(&data[..n]);
        self.bytes += n as u64;
        if self.block.len() >= BLOCK {
            if let Err(e) = self.cut_and_send(false) {
                self.failed = true;
                return Err(std::io::Error::other(e));
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A finished pack: its object name and bytes.
type FullPack = (String, Vec<u8>);

/// Decides, piece by piece, whether a chunk is zero, the parent's, already stored or new,
/// and packs the new ones.
struct Packer<'c, 'j> {
    ctx: &'c Context<'j>,
    op: u64,
    out: HashOut,
    stored: HashSet<Id>,
    known: HashSet<Id>,
    pack: PackBuilder,
}

impl<'c, 'j> Packer<'c, 'j> {
    fn new(ctx: &'c Context<'j>, op: u64) -> Self {
        Packer {
            ctx,
            op,
            out: HashOut {
                slots: Vec::new(),
                new_chunks: Vec::new(),
                packs: Vec::new(),
                used_packs: HashSet::new(),
                stats: CaptureStats::default(),
            },
            stored: HashSet::new(),
            known: HashSet::new(),
            pack: PackBuilder::new(Vec::with_capacity(PACK_TARGET + (1 << 20))),
        }
    }

    /// The slot of `piece`, at slot `index` of the image; a pack to put once one is full.
    fn add(
        &mut self,
        index: usize,
        kind: PieceKind,
        piece: &[u8],
        spare: &dyn Fn() -> Vec<u8>,
    ) -> Result<(Slot, Option<FullPack>)> {
        let stats = &mut self.out.stats;
        match kind {
            PieceKind::Page => stats.pages += 1,
            PieceKind::Framing => stats.framing += 1,
            PieceKind::Opaque => stats.opaque += 1,
        }
        let len = u32::try_from(piece.len())
            .map_err(|_| Error::Inconsistent("piece longer than 4 GiB".into()))?;
        if format::is_zero(piece) {
            stats.zero += 1;
            return Ok((Slot::Zero(len), None));
        }
        let id: Id = *blake3::hash(piece).as_bytes();
        let slot = Slot::Chunk { id, len };
        if self.ctx.parent.and_then(|p| p.get(index)) == Some(&slot)
            && self.ctx.bad_packs.is_empty()
        {
            stats.same_as_parent += 1;
            return Ok((slot, None));
        }
        if self.stored.contains(&id) || self.known.contains(&id) {
            return Ok((slot, None));
        }
        let found: Option<ChunkLoc> = self
            .ctx
            .journal
            .get(Table::Chunks, &format::chunk_key(&id))?;
        if let Some(loc) = found.filter(|l| !self.ctx.bad_packs.contains(&l.pack) && l.len == len) {
            if let Some(name) = self.ctx.pack_names.get(&loc.pack) {
                self.out.used_packs.insert(*name);
                self.known.insert(id);
                return Ok((slot, None));
            }
        }
        self.pack.push(&id, piece)?;
        self.stored.insert(id);
        self.out.stats.bytes_new += u64::from(len);
        if kind == PieceKind::Page {
            self.out.stats.pages_new += 1;
        }
        if self.pack.data_len() >= PACK_TARGET {
            let full = std::mem::replace(&mut self.pack, PackBuilder::new(spare()));
            return Ok((slot, Some(self.seal_pack(full)?)));
        }
        Ok((slot, None))
    }

    fn seal_pack(&mut self, pack: PackBuilder) -> Result<FullPack> {
        let (data, name, entries) = pack.finish(self.op)?;
        let key = format::pack_key_of(&name);
        for e in &entries {
            self.out.new_chunks.push((
                e.id,
                ChunkLoc {
                    pack: key,
                    offset: e.offset,
                    len: e.len,
                },
            ));
        }
        self.out.packs.push(PackRecord {
            name,
            len: data.len() as u64,
            chunks: entries.len() as u32,
            op: self.op,
        });
        self.out.used_packs.insert(name);
        self.out.stats.packs += 1;
        Ok((format::pack_object(&name), data))
    }

    /// The last pack, if it holds anything, and what was found.
    fn finish(mut self) -> Result<(HashOut, Option<FullPack>)> {
        let last = if self.pack.is_empty() {
            None
        } else {
            let pack = std::mem::replace(&mut self.pack, PackBuilder::new(Vec::new()));
            Some(self.seal_pack(pack)?)
        };
        Ok((self.out, last))
    }
}

fn hash_blocks(
    ctx: &Context<'_>,
    op: u64,
    blocks: Receiver<Block>,
    free: mpsc::Sender<Vec<u8>>,
    packs_out: SyncSender<(String, Vec<u8>)>,
    spare: Receiver<Vec<u8>>,
) -> Result<HashOut> {
    let mut packer = Packer::new(ctx, op);
    let mut slots = Vec::new();
    let send = |pack: (String, Vec<u8>)| {
        packs_out
            .send(pack)
            .map_err(|_| Error::Inconsistent("the pack writer stopped".into()))
    };
    let spare = || {
        spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(PACK_TARGET + (1 << 20)))
    };
    for block in blocks {
        for &(at, len, kind) in &block.cuts {
            let piece = &block.data[at as usize..(at + len) as usize];
            let (slot, full) = packer.add(slots.len(), kind, piece, &spare)?;
            slots.push(slot);
            if let Some(pack) = full {
                send(pack)?;
            }
        }
        let _ = free.send(block.data);
    }
    let (mut out, last) = packer.finish()?;
    if let Some(pack) = last {
        send(pack)?;
    }
    out.slots = slots;
    Ok(out)
}

fn write_packs(
    store: &dyn ObjectStore,
    packs: Receiver<(String, Vec<u8>)>,
    spare: mpsc::Sender<Vec<u8>>,
) -> Result<()> {
    for (name, data) in packs {
        store.put(&name, &data)?;
        let _ = spare.send(data);
    }
    Ok(())
}
