//! Reading a bundle: checked whole before anything is written anywhere, then its memory
//! image and disks read out, every chunk verified against its hash.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use store::ObjectStore;

use crate::format::{self, hex, Descriptor, Hash, Location, Manifest, ManifestKind};
use crate::{descriptor_name, Error, Result};

/// Packs kept in memory while a bundle is read (chunks of one export lie in pack order).
const PACK_CACHE: usize = 4;

/// Every chunk the indexes at `store` know of, where its pack is present and long enough.
pub(crate) fn known_chunks(store: &dyn ObjectStore) -> Result<HashMap<Hash, Location>> {
    let packs: HashMap<String, u64> = store
        .list("packs/")?
        .into_iter()
        .map(|m| (m.name, m.len))
        .collect();
    let mut known = HashMap::new();
    for meta in store.list("index/")? {
        let Some(bytes) = store.get(&meta.name)? else {
            continue;
        };
        // A damaged index only means its chunks are sent again.
        if meta.name != format!("index/{}", blake3::hash(&bytes).to_hex()) {
            continue;
        }
        let Ok(entries) = format::decode_index(&bytes) else {
            continue;
        };
        for (h, loc) in entries {
            let fits = packs
                .get(&format!("packs/{}", hex(&loc.pack)))
                .is_some_and(|len| loc.offset + u64::from(loc.len) <= *len);
            if fits {
                known.insert(h, loc);
            }
        }
    }
    Ok(known)
}

/// A bundle whose every object was found present, whole and consistent (see [`open`]).
#[derive(Debug)]
pub struct Bundle<'a> {
    store: &'a dyn ObjectStore,
    id: String,
    descriptor: Descriptor,
    memory: Option<Manifest>,
    disks: Vec<Manifest>,
    chunks: HashMap<Hash, Location>,
    cache: Vec<(Hash, Vec<u8>)>,
}

/// Opens the bundle of `domain`/`snapshot` at `store` and checks it before anything is done
/// with it: the descriptor's checksum and format, every manifest against its name, and that
/// every chunk the manifests name lies in a pack that is present and long enough. Chunk
/// contents are checked as they are read ([`Bundle::read_memory`], [`Bundle::write_disk`]);
/// [`Bundle::verify`] reads them all beforehand. A bad bundle is an error naming the object
/// and what is wrong with it.
pub fn open<'a>(store: &'a dyn ObjectStore, domain: &str, snapshot: &str) -> Result<Bundle<'a>> {
    let name = descriptor_name(domain, snapshot)?;
    let id = format!("{domain}/{snapshot}");
    let bytes = store.get(&name)?.ok_or_else(|| Error::NotFound {
        domain: domain.to_string(),
        snapshot: snapshot.to_string(),
        location: store.location(),
    })?;
    let damaged = |object: &str, what: String| Error::Damaged {
        bundle: id.clone(),
        object: object.to_string(),
        what,
    };
    let descriptor = format::decode_descriptor(&bytes).map_err(|w| damaged(&name, w))?;
    if descriptor.domain != domain || descriptor.snapshot.name != snapshot {
        return Err(damaged(
            &name,
            format!(
                "describes {}/{}",
                descriptor.domain, descriptor.snapshot.name
            ),
        ));
    }
    let manifest = |object: &str, kind: ManifestKind| -> Result<Manifest> {
        let bytes = store.get(object)?.ok_or_else(|| Error::Missing {
            bundle: id.clone(),
            object: object.to_string(),
            what: "is missing".into(),
        })?;
        if object != format!("manifests/{}", blake3::hash(&bytes).to_hex()) {
            return Err(damaged(object, "content does not match its name".into()));
        }
        let m = Manifest::decode(&bytes).map_err(|w| damaged(object, w))?;
        if m.kind != kind {
            return Err(damaged(
                object,
                "is not the kind of manifest expected".into(),
            ));
        }
        Ok(m)
    };
    let memory = match &descriptor.memory {
        None => None,
        Some(part) => {
            let m = manifest(&part.manifest, ManifestKind::Memory)?;
            if m.size != part.size {
                return Err(damaged(
                    &part.manifest,
                    "size differs from the descriptor's".into(),
                ));
            }
            Some(m)
        }
    };
    let mut disks = Vec::new();
    for part in &descriptor.disks {
        let m = manifest(&part.manifest, ManifestKind::Disk)?;
        if m.size != part.size || m.unit != part.cluster_size {
            return Err(damaged(
                &part.manifest,
                "size or cluster size differs from the descriptor's".into(),
            ));
        }
        disks.push(m);
    }
    let known = known_chunks(store)?;
    let mut chunks = HashMap::new();
    for m in memory.iter().chain(disks.iter()) {
        for (i, h) in &m.entries {
            let Some(loc) = known.get(h) else {
                return Err(Error::Missing {
                    bundle: id.clone(),
                    object: format!("chunk {}", hex(h)),
                    what: format!("(unit {i}) is in no pack present at the destination"),
                });
            };
            let want = u64::from(m.unit).min(m.size - i * u64::from(m.unit));
            if u64::from(loc.len) != want {
                return Err(damaged(
                    &format!("packs/{}", hex(&loc.pack)),
                    format!(
                        "chunk {} is {} bytes long, {want} expected",
                        hex(h),
                        loc.len
                    ),
                ));
            }
            chunks.insert(*h, *loc);
        }
    }
    Ok(Bundle {
        store,
        id,
        descriptor,
        memory,
        disks,
        chunks,
        cache: Vec::new(),
    })
}

impl Bundle<'_> {
    /// What the bundle says about itself.
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// Reads and hashes every chunk the bundle needs (a deep check before import).
    pub fn verify(&mut self) -> Result<()> {
        let mut all: Vec<(Hash, Location)> = self.chunks.iter().map(|(h, l)| (*h, *l)).collect();
        all.sort_by_key(|(_, l)| (l.pack, l.offset));
        for (h, _) in all {
            self.chunk(&h)?;
        }
        Ok(())
    }

    /// The bytes of chunk `h`, verified.
    fn chunk(&mut self, h: &Hash) -> Result<Vec<u8>> {
        let loc = *self.chunks.get(h).ok_or_else(|| Error::Missing {
            bundle: self.id.clone(),
            object: format!("chunk {}", hex(h)),
            what: "is not in the bundle".into(),
        })?;
        let pack_name = format!("packs/{}", hex(&loc.pack));
        if !self.cache.iter().any(|(p, _)| *p == loc.pack) {
            let data = match self.store.get(&pack_name)? {
                Some(d) => d,
                None => {
                    return Err(Error::Missing {
                        bundle: self.id.clone(),
                        object: pack_name,
                        what: "is missing".into(),
                    })
                }
            };
            if self.cache.len() >= PACK_CACHE {
                self.cache.remove(0);
            }
            self.cache.push((loc.pack, data));
        }
        let (_, pack) = self
            .cache
            .iter()
            .find(|(p, _)| *p == loc.pack)
            .expect("just cached");
        let range = loc.offset as usize..(loc.offset + u64::from(loc.len)) as usize;
        let data = pack.get(range).ok_or_else(|| Error::Missing {
            bundle: self.id.clone(),
            object: pack_name.clone(),
            what: format!("ends before chunk {}", hex(h)),
        })?;
        if blake3::hash(data).as_bytes() != h {
            return Err(Error::Damaged {
                bundle: self.id.clone(),
                object: pack_name,
                what: format!(
                    "chunk {} at offset {} does not match its hash",
                    hex(h),
                    loc.offset
                ),
            });
        }
        Ok(data.to_vec())
    }

    /// Writes the memory image to `out`, every page verified, and checks the whole image's
    /// hash. Fails if the bundle has no memory image.
    pub fn read_memory(&mut self, out: &mut dyn Write) -> Result<u64> {
        let Some(m) = self.memory.clone() else {
            return Err(Error::Invalid(format!("{} has no memory image", self.id)));
        };
        let mut whole = blake3::Hasher::new();
        let unit = u64::from(m.unit);
        let zeros = vec![0u8; m.unit as usize];
        let mut next = 0u64;
        let io = |source| Error::Io {
            op: "write the memory image".into(),
            source,
        };
        let mut put = |data: &[u8], whole: &mut blake3::Hasher| -> Result<()> {
            whole.update(data);
            out.write_all(data).map_err(io)
        };
        let units = m.size.div_ceil(unit);
        let unit_len = |i: u64| unit.min(m.size - i * unit) as usize;
        for (i, h) in &m.entries {
            while next < *i {
                put(&zeros[..unit_len(next)], &mut whole)?;
                next += 1;
            }
            let data = self.chunk(h)?;
            put(&data, &mut whole)?;
            next = i + 1;
        }
        while next < units {
            put(&zeros[..unit_len(next)], &mut whole)?;
            next += 1;
        }
        let part = self
            .descriptor
            .memory
            .as_ref()
            .expect("manifest implies part");
        if whole.finalize().to_hex().as_str() != part.blake3 {
            return Err(Error::Damaged {
                bundle: self.id.clone(),
                object: part.manifest.clone(),
                what: "the memory image's hash differs from the descriptor's".into(),
            });
        }
        Ok(m.size)
    }

    /// Writes disk `index` (descriptor order) as a new standalone qcow2 image at `path`,
    /// every cluster verified. Never overwrites; a failed write leaves a partial file the
    /// caller removes.
    pub fn write_disk(&mut self, index: usize, path: &Path) -> Result<()> {
        let Some(m) = self.disks.get(index).cloned() else {
            return Err(Error::Invalid(format!("{} has no disk {index}", self.id)));
        };
        let mut failed = None;
        let clusters = m.entries.iter().map_while(|(i, h)| match self.chunk(h) {
            Ok(data) => Some(Ok((*i, data))),
            Err(e) => {
                failed = Some(e);
                None
            }
        });
        let written = disk::write_image(path, m.size, m.unit, clusters);
        if let Some(e) = failed {
            return Err(e);
        }
        written?;
        Ok(())
    }
}

/// Every bundle at `store`, as (domain, snapshot).
pub fn list(store: &dyn ObjectStore) -> Result<Vec<(String, String)>> {
    Ok(store
        .list("bundles/")?
        .into_iter()
        .filter_map(|m| {
            let mut parts = m.name.strip_prefix("bundles/")?.splitn(2, '/');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect())
}
