//! Writing a bundle: chunks the destination lacks into new packs, then the index of those
//! packs, the manifests, and last the descriptor.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use store::ObjectStore;

use crate::format::{
    self, hex, Descriptor, DiskPart, Hash, Location, Manifest, ManifestKind, MemoryPart,
    SnapshotInfo,
};
use crate::{descriptor_name, Error, Result};

/// Pages of a memory image.
pub const PAGE: u32 = 4096;
/// A pack is written once it holds this many bytes.
pub const PACK_TARGET: usize = 32 << 20;

/// One disk to export: the image and the internal snapshot holding its content.
#[derive(Debug, Clone)]
pub struct DiskSource {
    /// The disk's name (`xvda`).
    pub name: String,
    /// The qcow2 image.
    pub image: PathBuf,
    /// The internal snapshot's name in the image's table.
    pub snapshot: String,
}

/// What an export did, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Bytes of memory and disk content read (zero units included).
    pub bytes_read: u64,
    /// Bytes of chunk data sent to the destination (what it lacked).
    pub bytes_sent: u64,
    /// Bytes of chunk data the destination had already.
    pub bytes_reused: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
}

/// Chunks known at the destination, and new packs being filled.
struct Packer<'a> {
    dest: &'a dyn ObjectStore,
    known: HashMap<Hash, Location>,
    pack: Vec<u8>,
    pack_entries: HashMap<Hash, (u64, u32)>,
    new_index: Vec<(Hash, Location)>,
    report: ExportReport,
}

impl<'a> Packer<'a> {
    fn new(dest: &'a dyn ObjectStore, known: HashMap<Hash, Location>) -> Packer<'a> {
        Packer {
            dest,
            known,
            pack: Vec::with_capacity(PACK_TARGET + (2 << 20)),
            pack_entries: HashMap::new(),
            new_index: Vec::new(),
            report: ExportReport::default(),
        }
    }

    /// Adds one unit; `None` if it is all zeros (not stored).
    fn add(&mut self, data: &[u8]) -> Result<Option<Hash>> {
        self.report.bytes_read += data.len() as u64;
        if data.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        let h = *blake3::hash(data).as_bytes();
        if self.known.contains_key(&h) || self.pack_entries.contains_key(&h) {
            self.report.bytes_reused += data.len() as u64;
            return Ok(Some(h));
        }
        self.pack_entries
            .insert(h, (self.pack.len() as u64, data.len() as u32));
        self.pack.extend_from_slice(data);
        self.report.bytes_sent += data.len() as u64;
        self.report.chunks_sent += 1;
        if self.pack.len() >= PACK_TARGET {
            self.seal_pack()?;
        }
        Ok(Some(h))
    }

    fn seal_pack(&mut self) -> Result<()> {
        if self.pack_entries.is_empty() {
            return Ok(());
        }
        let id = *blake3::hash(&self.pack).as_bytes();
        self.dest.put(&format!("packs/{}", hex(&id)), &self.pack)?;
        let mut entries: Vec<_> = self.pack_entries.drain().collect();
        entries.sort_by_key(|(_, (offset, _))| *offset);
        for (h, (offset, len)) in entries {
            let loc = Location {
                pack: id,
                offset,
                len,
            };
            self.known.insert(h, loc);
            self.new_index.push((h, loc));
        }
        self.pack.clear();
        Ok(())
    }

    /// Seals the last pack, makes every pack durable, then writes (and flushes) the index of
    /// the chunks this export stored.
    fn finish(&mut self) -> Result<()> {
        self.seal_pack()?;
        self.dest.flush()?;
        if !self.new_index.is_empty() {
            let index = format::encode_index(&self.new_index);
            let name = format!("index/{}", blake3::hash(&index).to_hex());
            self.dest.put(&name, &index)?;
            self.dest.flush()?;
        }
        Ok(())
    }
}

/// Exports one snapshot into `dest` (see the crate documentation): the memory image read
/// from `memory` (a checkpoint's, `None` for a disk-only snapshot) and each disk's content
/// at its internal snapshot. Only chunks `dest` lacks are sent. The descriptor is written
/// last and replaces an earlier export of the same snapshot: until then, an interrupted
/// export leaves at most unreferenced packs, and an earlier bundle stays whole.
pub fn export(
    dest: &dyn ObjectStore,
    domain: &str,
    snapshot: SnapshotInfo,
    memory: Option<&mut dyn Read>,
    disks: &[DiskSource],
    source_host: &str,
) -> Result<ExportReport> {
    let name = descriptor_name(domain, &snapshot.name)?;
    let known = crate::import::known_chunks(dest)?;
    let mut packer = Packer::new(dest, known);
    let mut manifests = Vec::new();

    let memory_part = match memory {
        None => None,
        Some(r) => {
            let (manifest, whole) = memory_manifest(&mut packer, r)?;
            let bytes = manifest.encode();
            let mname = format!("manifests/{}", blake3::hash(&bytes).to_hex());
            manifests.push((mname.clone(), bytes));
            Some(MemoryPart {
                size: manifest.size,
                blake3: whole,
                manifest: mname,
            })
        }
    };
    let mut disk_parts = Vec::new();
    for d in disks {
        let (manifest, cluster_size) = disk_manifest(&mut packer, d)?;
        let bytes = manifest.encode();
        let mname = format!("manifests/{}", blake3::hash(&bytes).to_hex());
        manifests.push((mname.clone(), bytes));
        disk_parts.push(DiskPart {
            name: d.name.clone(),
            size: manifest.size,
            cluster_size,
            manifest: mname,
        });
    }
    packer.finish()?;
    for (mname, bytes) in &manifests {
        dest.put(mname, bytes)?;
    }
    dest.flush()?;
    let descriptor = Descriptor {
        domain: domain.to_string(),
        snapshot,
        memory: memory_part,
        disks: disk_parts,
        exported: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        source_host: source_host.to_string(),
    };
    dest.replace(&name, &format::encode_descriptor(&descriptor))?;
    Ok(packer.report.clone())
}

fn memory_manifest(packer: &mut Packer, r: &mut dyn Read) -> Result<(Manifest, String)> {
    let mut whole = blake3::Hasher::new();
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = read_full(r, &mut buf).map_err(|source| Error::Io {
            op: "read the memory image".into(),
            source,
        })?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        for (k, page) in buf[..n].chunks(PAGE as usize).enumerate() {
            if let Some(h) = packer.add(page)? {
                entries.push((size / u64::from(PAGE) + k as u64, h));
            }
        }
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    let manifest = Manifest {
        kind: ManifestKind::Memory,
        unit: PAGE,
        size,
        entries,
    };
    Ok((manifest, whole.finalize().to_hex().to_string()))
}

/// Reads until `buf` is full or the stream ends.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn disk_manifest(packer: &mut Packer, d: &DiskSource) -> Result<(Manifest, u32)> {
    let mut reader = disk::snapshot_reader(&d.image, &d.snapshot)?;
    let cluster_size = u32::try_from(reader.cluster_size())
        .map_err(|_| Error::Invalid(format!("{}: cluster size too large", d.name)))?;
    let mut entries = Vec::new();
    for i in 0..reader.clusters() {
        if let disk::Cluster::Data(data) = reader.read(i)? {
            if let Some(h) = packer.add(&data)? {
                entries.push((i, h));
            }
        }
    }
    let manifest = Manifest {
        kind: ManifestKind::Disk,
        unit: cluster_size,
        size: reader.disk_size(),
        entries,
    };
    Ok((manifest, cluster_size))
}
