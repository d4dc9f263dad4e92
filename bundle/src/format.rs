//! The encodings of a bundle's objects (see the crate documentation for the layout).

use serde::{Deserialize, Serialize};

/// First word of a descriptor.
pub const DESCRIPTOR_MAGIC: &str = "domsnap-bundle";
/// The descriptor format this crate writes and reads.
pub const VERSION: u32 = 1;
/// Magic of a manifest object.
pub const MANIFEST_MAGIC: &[u8; 4] = b"DSBM";
/// Magic of an index object.
pub const INDEX_MAGIC: &[u8; 4] = b"DSBI";
/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// The hex form of a hash.
pub fn hex(h: &Hash) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

/// What a bundle says about itself: the descriptor object `bundles/<domain>/<snapshot>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    /// The domain.
    pub domain: String,
    /// The snapshot as the catalog knows it.
    pub snapshot: SnapshotInfo,
    /// The memory image of a checkpoint; `None` for a disk-only snapshot.
    pub memory: Option<MemoryPart>,
    /// Every disk's content at the snapshot, in the domain's disk order.
    pub disks: Vec<DiskPart>,
    /// When the export was made, seconds since the Unix epoch.
    pub exported: u64,
    /// The host (`hostname`) it was exported from, for humans.
    pub source_host: String,
}

/// A snapshot's catalog entry, as carried by a bundle (the engine's own record, in words
/// that do not depend on its internal types).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    /// The snapshot's name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// When it was taken, seconds since the Unix epoch.
    pub created: u64,
    /// `checkpoint` or `disk-only`.
    pub kind: String,
    /// Taken of a running domain without its memory (only crash-consistent).
    pub crash_consistent: bool,
    /// The domain's run state at the snapshot (`running`, `paused`, `shutoff`).
    pub run_state: String,
    /// The domain's memory size in bytes (to define it on another host).
    pub memory_size: u64,
}

/// The memory image of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryPart {
    /// Its length in bytes.
    pub size: u64,
    /// BLAKE3 of the whole image, hex.
    pub blake3: String,
    /// The manifest object listing its pages.
    pub manifest: String,
}

/// One disk of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskPart {
    /// The disk's name (its device, `xvda`).
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size of the image it came from (and of the image import writes).
    pub cluster_size: u32,
    /// The manifest object listing its clusters.
    pub manifest: String,
}

/// Encodes a descriptor: `domsnap-bundle <version> <BLAKE3 of the body, hex>\n<JSON body>`.
pub fn encode_descriptor(d: &Descriptor) -> Vec<u8> {
    let body = serde_json::to_vec_pretty(d).expect("a descriptor always serializes");
    let mut out = format!(
        "{DESCRIPTOR_MAGIC} {VERSION} {}\n",
        blake3::hash(&body).to_hex()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Decodes a descriptor; `Err` says what is wrong.
pub fn decode_descriptor(bytes: &[u8]) -> Result<Descriptor, String> {
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not text")?;
    let mut words = header.split(' ');
    if words.next() != Some(DESCRIPTOR_MAGIC) {
        return Err("not a domsnap bundle descriptor".into());
    }
    let version: u32 = words
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or("no format version")?;
    if version != VERSION {
        return Err(format!(
            "format version {version}; this domsnap reads version {VERSION}"
        ));
    }
    let sum = words.next().ok_or("no checksum")?;
    let body = &bytes[nl + 1..];
    if blake3::hash(body).to_hex().as_str() != sum {
        return Err("checksum mismatch (the descriptor was changed or cut short)".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("cannot parse: {e}"))
}

/// What a manifest describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// A memory image in pages.
    Memory = 0,
    /// A disk in clusters.
    Disk = 1,
}

/// A sparse list of units (pages or clusters) and the hash of each unit's bytes; units not
/// listed read as zeros. Name: `manifests/<BLAKE3 of the encoding>`.
///
/// ```text
/// 0   4  "DSBM"
/// 4   4  version 1, u32 LE
/// 8   1  kind (0 memory, 1 disk)
/// 9   3  zero
/// 12  4  unit size in bytes, u32 LE
/// 16  8  total size in bytes, u64 LE
/// 24  8  entry count n, u64 LE
/// 32  n × 40: unit index u64 LE, BLAKE3 of the unit's bytes (ascending indexes)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// What it describes.
    pub kind: ManifestKind,
    /// The unit size.
    pub unit: u32,
    /// Total size in bytes (the last unit may be shorter than `unit`).
    pub size: u64,
    /// Units holding data, ascending.
    pub entries: Vec<(u64, Hash)>,
}

impl Manifest {
    /// The encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.entries.len() * 40);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[self.kind as u8, 0, 0, 0]);
        out.extend_from_slice(&self.unit.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (i, h) in &self.entries {
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(h);
        }
        out
    }

    /// Decodes and checks a manifest; `Err` says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Manifest, String> {
        if b.len() < 32 || &b[..4] != MANIFEST_MAGIC {
            return Err("not a bundle manifest".into());
        }
        if le32(b, 4) != VERSION {
            return Err(format!("manifest version {}", le32(b, 4)));
        }
        let kind = match b[8] {
            0 => ManifestKind::Memory,
            1 => ManifestKind::Disk,
            k => return Err(format!("unknown manifest kind {k}")),
        };
        let unit = le32(b, 12);
        let size = le64(b, 16);
        let n = le64(b, 24);
        if unit == 0 || !unit.is_power_of_two() {
            return Err(format!("unit size {unit} is not a power of two"));
        }
        if n.checked_mul(40).and_then(|x| x.checked_add(32)) != Some(b.len() as u64) {
            return Err(format!("{} bytes long for {n} entries", b.len()));
        }
        let units = size.div_ceil(u64::from(unit));
        let mut entries = Vec::with_capacity(n as usize);
        let mut last = None;
        for e in b[32..].chunks_exact(40) {
            let i = le64(e, 0);
            if i >= units || last.is_some_and(|l| l >= i) {
                return Err(format!("unit {i} out of order or beyond the end"));
            }
            last = Some(i);
            let mut h = [0u8; 32];
            h.copy_from_slice(&e[8..]);
            entries.push((i, h));
        }
        Ok(Manifest {
            kind,
            unit,
            size,
            entries,
        })
    }
}

/// Where one chunk lies: in which pack, at which offset, how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The pack's hash (object `packs/<hex>`).
    pub pack: Hash,
    /// Offset in the pack.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// An index object: the chunks one export stored, by pack. Name: `index/<BLAKE3 of it>`.
///
/// ```text
/// 0   4  "DSBI"
/// 4   4  version 1, u32 LE
/// 8   8  entry count n, u64 LE
/// 16  n × 76: chunk BLAKE3, pack BLAKE3, offset u64 LE, length u32 LE
/// ```
pub fn encode_index(entries: &[(Hash, Location)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.len() * 76);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (h, l) in entries {
        out.extend_from_slice(h);
        out.extend_from_slice(&l.pack);
        out.extend_from_slice(&l.offset.to_le_bytes());
        out.extend_from_slice(&l.len.to_le_bytes());
    }
    out
}

/// Decodes an index object; `Err` says what is wrong.
pub fn decode_index(b: &[u8]) -> Result<Vec<(Hash, Location)>, String> {
    if b.len() < 16 || &b[..4] != INDEX_MAGIC {
        return Err("not a bundle index".into());
    }
    if le32(b, 4) != VERSION {
        return Err(format!("index version {}", le32(b, 4)));
    }
    let n = le64(b, 8);
    if n.checked_mul(76).and_then(|x| x.checked_add(16)) != Some(b.len() as u64) {
        return Err(format!("{} bytes long for {n} entries", b.len()));
    }
    Ok(b[16..]
        .chunks_exact(76)
        .map(|e| {
            let mut h = [0u8; 32];
            let mut pack = [0u8; 32];
            h.copy_from_slice(&e[..32]);
            pack.copy_from_slice(&e[32..64]);
            (
                h,
                Location {
                    pack,
                    offset: le64(e, 64),
                    len: le32(e, 72),
                },
            )
        })
        .collect())
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn descriptor() -> Descriptor {
        Descriptor {
            domain: "web".into(),
            snapshot: SnapshotInfo {
                name: "s1".into(),
                description: "before upgrade".into(),
                created: 1_700_000_000,
                kind: "checkpoint".into(),
                crash_consistent: false,
                run_state: "running".into(),
                memory_size: 1 << 30,
            },
            memory: Some(MemoryPart {
                size: 1 << 30,
                blake3: "ab".into(),
                manifest: "manifests/cd".into(),
            }),
            disks: vec![DiskPart {
                name: "xvda".into(),
                size: 1 << 33,
                cluster_size: 65536,
                manifest: "manifests/ef".into(),
            }],
            exported: 1_700_000_100,
            source_host: "a".into(),
        }
    }

    #[test]
    fn descriptor_round_trips_and_any_change_is_caught() {
        let d = descriptor();
        let b = encode_descriptor(&d);
        assert_eq!(decode_descriptor(&b).unwrap(), d);
        for at in [0, 16, b.len() / 2, b.len() - 2] {
            let mut bad = b.clone();
            bad[at] ^= 1;
            assert!(decode_descriptor(&bad).is_err(), "byte {at}");
        }
        assert!(decode_descriptor(&b[..b.len() - 1]).is_err());
        let other = String::from_utf8(b.clone())
            .unwrap()
            .replacen("bundle 1 ", "bundle 2 ", 1);
        assert!(decode_descriptor(other.as_bytes())
            .unwrap_err()
            .contains("version 2"));
    }

    #[test]
    fn manifest_and_index_round_trip_and_refuse_nonsense() {
        let m = Manifest {
            kind: ManifestKind::Disk,
            unit: 65536,
            size: 10 * 65536 + 1,
            entries: vec![(0, [1; 32]), (10, [2; 32])],
        };
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
        assert!(Manifest::decode(&b[..b.len() - 1]).is_err());
        let mut beyond = m.clone();
        beyond.entries.push((11, [3; 32]));
        assert!(Manifest::decode(&beyond.encode()).is_err());
        let mut unordered = m.clone();
        unordered.entries.swap(0, 1);
        assert!(Manifest::decode(&unordered.encode()).is_err());
        let l = Location {
            pack: [9; 32],
            offset: 77,
            len: 4096,
        };
        let i = encode_index(&[([5; 32], l)]);
        assert_eq!(decode_index(&i).unwrap(), vec![([5; 32], l)]);
        assert!(decode_index(&i[..i.len() - 1]).is_err());
        assert!(decode_index(b"DSBM").is_err());
    }
}
