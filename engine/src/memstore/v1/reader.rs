//! Format 1: reading images back, every chunk checked before it is used.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use journal::{Journal, Table};

use super::format::{self, ChunkEntry, Piece, CHUNK_MAX};
use super::whole::WholeHash;
use crate::memstore::error::{io, Error, Result};
use crate::memstore::MemStore;

static ZEROS: [u8; CHUNK_MAX] = [0; CHUNK_MAX];

/// Reads `image` piece by piece; with a sink, writes each piece after it checked out.
pub(super) fn read_image(
    store: &MemStore,
    journal: &Journal,
    image: &str,
    mut sink: Option<&mut dyn Write>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let id = super::image_id(image)?;
    let head = super::load_head(journal, image, &id)?;
    let mut packs: HashMap<u64, File> = HashMap::new();
    let mut buf = vec![0u8; CHUNK_MAX];
    let mut whole = WholeHash::new();
    let mut done = 0u64;
    let sink_err = |e| Error::Io {
        op: "write restored image to",
        path: "<sink>".into(),
        source: e,
    };
    for segment in 0..head.segments {
        for piece in super::load_segment(journal, image, &id, segment)? {
            match piece {
                Piece::Zero { len } => {
                    whole.zeros(len);
                    if let Some(sink) = sink.as_deref_mut() {
                        let mut left = len;
                        while left > 0 {
                            let n = left.min(ZEROS.len() as u64) as usize;
                            sink.write_all(&ZEROS[..n]).map_err(sink_err)?;
                            left -= n as u64;
                        }
                    }
                }
                Piece::Data { id: chunk, len } => {
                    let entry: ChunkEntry = journal
                        .get(Table::Chunks, &format::chunk_key(&chunk))?
                        .ok_or_else(|| {
                            Error::Inconsistent(format!(
                                "image {image} names chunk {} missing from the index",
                                format::hex(&chunk)
                            ))
                        })?;
                    let path = store.v1_pack_path(entry.pack);
                    let corrupt = |why: String| Error::Corruption {
                        image: image.to_string(),
                        chunk: format::hex(&chunk),
                        pack: path.clone(),
                        offset: entry.offset,
                        why,
                    };
                    if entry.len != len || len as usize > CHUNK_MAX {
                        return Err(corrupt(format!(
                            "index says {} bytes, manifest {len}",
                            entry.len
                        )));
                    }
                    let file = match packs.entry(entry.pack) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(File::open(&path).map_err(io("open", &path))?)
                        }
                    };
                    let data = &mut buf[..len as usize];
                    if let Err(e) = file.read_exact_at(data, entry.offset) {
                        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            corrupt("the pack file ends before the chunk does".into())
                        } else {
                            io("read", &path)(e)
                        });
                    }
                    let found = blake3::hash(data);
                    if found.as_bytes() != &chunk {
                        return Err(corrupt(format!("the data hashes to {}", found.to_hex())));
                    }
                    whole.update(data);
                    if let Some(sink) = sink.as_deref_mut() {
                        sink.write_all(data).map_err(sink_err)?;
                    }
                }
            }
            done += piece.bytes();
            progress(done);
        }
    }
    let found = whole.finish()?;
    if found.as_bytes() != &id || done != head.bytes {
        return Err(Error::ImageHash {
            image: image.to_string(),
            found: found.to_hex().to_string(),
        });
    }
    Ok(done)
}
