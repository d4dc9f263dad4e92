//! Format 1: ingest (kept for the tests that build format-1 stores).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use fastcdc::v2020::{self, Normalization};
use journal::{Batch, Journal, Table};

use super::format::{
    self, ChunkEntry, ChunkId, ImageHead, PackEntry, Piece, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN,
};
use super::whole::WholeHash;
use crate::memstore::error::{io, Error, Result};

/// Bytes buffered before chunking (at least two maximal chunks).
const BUFFER: usize = 4 << 20;
/// Write buffer of the pack file.
const PACK_BUFFER: usize = 1 << 20;

/// The outcome of an ingest.
#[derive(Debug)]
#[allow(dead_code)]
pub struct Ingested {
    /// Image id: BLAKE3 of the whole stream, hex.
    pub image: String,
    /// Length of the stream.
    pub bytes: u64,
    /// Bytes newly stored after deduplication (chunk data written to the pack).
    pub bytes_new: u64,
    /// Index updates: new chunk entries, reference counts, the manifest, the image's
    /// holder count +1 and the pack. The pack it names is already durable. Commit it
    /// before building another batch.
    pub batch: Batch,
}

/// Receives one image stream (`std::io::Write`), as `xl save` writes it.
///
/// Memory stays bounded by a 4 MiB buffer plus what grows with the image's chunk count:
/// the manifest (40 bytes a chunk) and one entry per distinct chunk (~90 bytes), i.e.
/// ~0.2% of the image for 64 KiB chunks. Dropped without [`ImageWriter::finish`], it leaves
/// its pack file for `MemStore::abandon`.
#[derive(Debug)]
pub struct ImageWriter<'j> {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    ingest: Ingest<'j>,
}

#[derive(Debug)]
struct Ingest<'j> {
    journal: &'j Journal,
    op: u64,
    pack_path: PathBuf,
    pack: Option<PackOut>,
    whole: WholeHash,
    bytes: u64,
    bytes_new: u64,
    pieces: Vec<Piece>,
    seen: HashMap<ChunkId, Seen>,
    masks: (u64, u64),
    poisoned: bool,
}

#[derive(Debug)]
struct PackOut {
    file: BufWriter<File>,
    len: u64,
    chunks: u64,
}

#[derive(Debug)]
struct Seen {
    entry: ChunkEntry,
    /// Occurrences in this image.
    added: u64,
    /// Packed by this ingest.
    new: bool,
}

impl<'j> ImageWriter<'j> {
    pub(super) fn new(journal: &'j Journal, pack_path: PathBuf, op: u64) -> ImageWriter<'j> {
        ImageWriter {
            buf: vec![0; BUFFER],
            start: 0,
            end: 0,
            ingest: Ingest {
                journal,
                op,
                pack_path,
                pack: None,
                whole: WholeHash::new(),
                bytes: 0,
                bytes_new: 0,
                pieces: Vec::new(),
                seen: HashMap::new(),
                masks: v2020::select_masks(CHUNK_AVG, Normalization::Level1),
                poisoned: false,
            },
        }
    }

    /// Cuts the next chunk off the buffered bytes and stores it.
    fn cut(&mut self) -> Result<()> {
        let pending = &self.buf[self.start..self.end];
        // A maximal run of zeros is cut without the rolling hash (it costs a third of
        // ingest time, and idle guest memory is mostly zero). Still a function of the
        // content alone, so equal streams get equal chunks.
        if pending.len() >= CHUNK_MAX && format::is_zero(&pending[..CHUNK_MAX]) {
            self.ingest.zeros(CHUNK_MAX as u64);
            self.start += CHUNK_MAX;
            return Ok(());
        }
        let (mask_s, mask_l) = self.ingest.masks;
        let (_, n) = v2020::cut(
            pending,
            CHUNK_MIN,
            CHUNK_AVG,
            CHUNK_MAX,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        let n = n.clamp(1, pending.len());
        self.ingest.chunk(&pending[..n])?;
        self.start += n;
        Ok(())
    }

    fn push(&mut self, mut data: &[u8]) -> Result<()> {
        self.ingest.whole.update(data);
        self.ingest.bytes += data.len() as u64;
        while !data.is_empty() {
            if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = data.len().min(self.buf.len() - self.end);
            self.buf[self.end..self.end + n].copy_from_slice(&data[..n]);
            self.end += n;
            data = &data[n..];
            while self.end - self.start >= CHUNK_MAX {
                self.cut()?;
            }
        }
        Ok(())
    }

    /// Chunks the rest of the stream, makes the pack durable (`sync_all`, directory fsync)
    /// and returns the index updates that name it.
    pub fn finish(mut self) -> Result<Ingested> {
        if self.ingest.poisoned {
            return Err(Error::Poisoned);
        }
        while self.end > self.start {
            self.cut()?;
        }
        self.ingest.finish()
    }
}

impl Write for ImageWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.ingest.poisoned {
            return Err(std::io::Error::other(Error::Poisoned));
        }
        match self.push(data) {
            Ok(()) => Ok(data.len()),
            Err(e) => {
                self.ingest.poisoned = true;
                Err(std::io::Error::other(e))
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Ingest<'_> {
    fn zeros(&mut self, n: u64) {
        match self.pieces.last_mut() {
            Some(Piece::Zero { len }) => *len += n,
            _ => self.pieces.push(Piece::Zero { len: n }),
        }
    }

    fn chunk(&mut self, data: &[u8]) -> Result<()> {
        if format::is_zero(data) {
            self.zeros(data.len() as u64);
            return Ok(());
        }
        let id: ChunkId = *blake3::hash(data).as_bytes();
        let len =
            u32::try_from(data.len()).map_err(|_| Error::Inconsistent("chunk too long".into()))?;
        self.pieces.push(Piece::Data { id, len });
        if let Some(seen) = self.seen.get_mut(&id) {
            seen.added += 1;
            return Ok(());
        }
        let (entry, new) = match self
            .journal
            .get::<ChunkEntry>(Table::Chunks, &format::chunk_key(&id))?
        {
            Some(entry) => (entry, false),
            None => {
                let (pack, offset) = self.append(&id, data)?;
                self.bytes_new += data.len() as u64;
                let entry = ChunkEntry {
                    pack,
                    offset,
                    len,
                    refs: 0,
                };
                (entry, true)
            }
        };
        self.seen.insert(
            id,
            Seen {
                entry,
                added: 1,
                new,
            },
        );
        Ok(())
    }

    /// Appends a chunk record to this ingest's pack (created on first use); returns the
    /// pack id and the offset of the data.
    fn append(&mut self, id: &ChunkId, data: &[u8]) -> Result<(u64, u64)> {
        let path = &self.pack_path;
        let pack = match &mut self.pack {
            Some(pack) => pack,
            None => {
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io("create", path))?;
                file.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(io("set mode of", path))?;
                let mut file = BufWriter::with_capacity(PACK_BUFFER, file);
                format::write_pack_header(&mut file, self.op).map_err(io("write", path))?;
                self.pack.insert(PackOut {
                    file,
                    len: format::PACK_HEADER,
                    chunks: 0,
                })
            }
        };
        let offset = pack.len + format::RECORD_HEADER;
        pack.len += format::write_record(&mut pack.file, id, data).map_err(io("write", path))?;
        pack.chunks += 1;
        Ok((self.op, offset))
    }

    fn finish(self) -> Result<Ingested> {
        let id: ChunkId = *self.whole.finish()?.as_bytes();
        let image = format::hex(&id);
        let path = &self.pack_path;
        let mut batch = Batch::new();
        if let Some(pack) = self.pack {
            let file = pack
                .file
                .into_inner()
                .map_err(|e| io("write", path)(e.into_error()))?;
            file.sync_all().map_err(io("sync", path))?;
            if let Some(dir) = path.parent() {
                super::sync_dir(dir)?;
            }
            fail::fail_point!("engine::memstore::after-pack-sync", |_| Err(
                super::failpoint("engine::memstore::after-pack-sync", path)
            ));
            batch.put(
                Table::Packs,
                &format::pack_key(self.op),
                &PackEntry {
                    bytes: pack.len,
                    chunks: pack.chunks,
                },
            )?;
        }
        let head_key = format::head_key(&id);
        let existing: Option<ImageHead> = self.journal.get(Table::Images, &head_key)?;
        // An image already stored gains a holder; its chunks keep their counts. (Its chunks
        // are all in the index, so nothing new was packed; if something was, it is entered
        // with no reference and gc takes it.)
        let known = existing.is_some();
        for (chunk, seen) in &self.seen {
            let mut entry = seen.entry;
            if known {
                if !seen.new {
                    continue;
                }
            } else {
                entry.refs += seen.added;
            }
            batch.put(Table::Chunks, &format::chunk_key(chunk), &entry)?;
        }
        let head = match existing {
            Some(mut head) => {
                head.refs += 1;
                head
            }
            None => {
                let mut segments = 0u32;
                for part in self.pieces.chunks(format::SEGMENT_PIECES) {
                    batch.put(Table::Images, &format::segment_key(&id, segments), &part)?;
                    segments += 1;
                }
                ImageHead {
                    bytes: self.bytes,
                    refs: 1,
                    segments,
                    pieces: self.pieces.len() as u64,
                }
            }
        };
        batch.put(Table::Images, &head_key, &head)?;
        Ok(Ingested {
            image,
            bytes: self.bytes,
            bytes_new: self.bytes_new,
            batch,
        })
    }
}
