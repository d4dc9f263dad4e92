//! The index rebuilt from the store's objects alone, for a journal that replaces a lost one
//! (`recover --adopt`): packs describe their chunks in their trailers, manifests describe
//! their images.

use std::collections::{BTreeMap, HashMap};

use journal::{Batch, Table};

use super::error::Result;
use super::format::{self, ChunkLoc, Id, ImageRecord, PackRecord, Slot};
use super::{manifest, pack, MemStore};

/// One checkpoint image found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundImage {
    /// Image id (hex).
    pub image: String,
    /// Its length.
    pub bytes: u64,
    /// The operation whose manifest it is the parent of, if its manifest is a delta (the
    /// checkpoint it was compared with: the domain's current snapshot then).
    pub parent_op: Option<u64>,
}

/// What [`MemStore::rebuild_index`] found.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// The index records (chunks, packs, images) to commit with the new journal's events.
    pub batch: Batch,
    /// Every image whose manifest and chunks are all there, by the operation that wrote it.
    pub images: BTreeMap<u64, FoundImage>,
    /// What could not be used, in words.
    pub problems: Vec<String>,
}

/// `op` of a manifest object `manifests/<state>/<op>` of state `state`.
fn manifest_op(object: &str, state: &str) -> Option<u64> {
    let rest = object.strip_prefix("manifests/")?.strip_prefix(state)?;
    rest.strip_prefix('/')?.parse().ok()
}

impl MemStore {
    /// Reads every pack's trailer and every manifest of this state directory and returns the
    /// index they imply. A pack that cannot be read, or a manifest whose chain or chunks are
    /// not all there, is reported and left out; nothing is written or deleted.
    pub fn rebuild_index(&self) -> Result<Rebuilt> {
        let mut out = Rebuilt::default();
        let mut chunks: HashMap<Id, ChunkLoc> = HashMap::new();
        for meta in self.objects.list("packs/")? {
            let Some(name) = format::parse_pack_object(&meta.name) else {
                continue;
            };
            let trailer = match pack::read_trailer(self.objects.as_ref(), &meta.name, Some(&name)) {
                Ok(t) => t,
                Err(e) => {
                    out.problems.push(format!("pack {}: {e}", meta.name));
                    continue;
                }
            };
            let key = format::pack_key_of(&name);
            for e in &trailer.entries {
                chunks.entry(e.id).or_insert(ChunkLoc {
                    pack: key,
                    offset: e.offset,
                    len: e.len,
                });
            }
            out.batch.put(
                Table::Packs,
                &format::pack_index_key(key),
                &PackRecord {
                    name,
                    len: meta.len,
                    chunks: trailer.entries.len() as u32,
                    op: trailer.op,
                },
            )?;
        }
        let prefix = format!("manifests/{}/", self.state);
        for meta in self.objects.list(&prefix)? {
            let Some(op) = manifest_op(&meta.name, &self.state) else {
                continue;
            };
            let found =
                manifest::load(self.objects.as_ref(), &meta.name).and_then(|(image, _, _)| {
                    let top = self
                        .objects
                        .get(&meta.name)?
                        .map(|data| manifest::decode(&meta.name, &data))
                        .transpose()?;
                    Ok((image, top.and_then(|m| m.parent)))
                });
            let (image, parent) = match found {
                Ok(x) => x,
                Err(e) => {
                    out.problems.push(format!("manifest {}: {e}", meta.name));
                    continue;
                }
            };
            let missing = image
                .slots
                .iter()
                .filter(|s| matches!(s, Slot::Chunk { id, .. } if !chunks.contains_key(id)))
                .count();
            if missing > 0 {
                out.problems.push(format!(
                    "manifest {}: {missing} of its chunks are in no pack of the store",
                    meta.name
                ));
                continue;
            }
            out.batch.put(
                Table::Images,
                &format::image_key(&image.id),
                &ImageRecord {
                    manifest: meta.name.clone(),
                    bytes: image.bytes,
                    slots: image.slots.len() as u64,
                },
            )?;
            out.images.insert(
                op,
                FoundImage {
                    image: format::hex(&image.id),
                    bytes: image.bytes,
                    parent_op: parent.as_deref().and_then(|p| manifest_op(p, &self.state)),
                },
            );
        }
        for (id, loc) in &chunks {
            out.batch.put(Table::Chunks, &format::chunk_key(id), loc)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::manifest_op;

    #[test]
    fn manifest_names() {
        assert_eq!(manifest_op("manifests/ab/12", "ab"), Some(12));
        assert_eq!(manifest_op("manifests/abc/12", "ab"), None);
        assert_eq!(manifest_op("manifests/ab/x", "ab"), None);
    }
}
