//! Reading a disk's content as it was at an internal snapshot, cluster by cluster, straight
//! from the snapshot's L1 and L2 tables (the image may be in use: the snapshot's tables and
//! clusters never change while the snapshot exists), and writing such content as a new
//! standalone image.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{io, Error, Result};
use crate::format::{l2_ref, L2Ref, OFFSET_MASK};
use crate::meta::Image;

/// The content of one cluster of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cluster {
    /// The cluster reads as zeros (unallocated, or flagged zero).
    Zero,
    /// The cluster's bytes (one cluster; the last cluster of a disk whose size is not a
    /// multiple of the cluster size is cut to the disk's end).
    Data(Vec<u8>),
}

/// Reads the content of a disk at one internal snapshot (see [`crate::snapshot_reader`]).
#[derive(Debug)]
pub struct SnapshotReader {
    img: Image,
    l1: Vec<u64>,
    disk_size: u64,
    /// The L2 table of L1 index `.0`, cached.
    l2: Option<(usize, Vec<u64>)>,
}

impl SnapshotReader {
    pub(crate) fn open(path: &Path, name: &str) -> Result<SnapshotReader> {
        let img = Image::open(path, false)?;
        let unsupported = |what: &str| Error::Unsupported {
            path: path.to_path_buf(),
            what: what.to_string(),
        };
        if img.header.backing_file.is_some() {
            return Err(unsupported(
                "reading an internal snapshot of an image with a backing file",
            ));
        }
        if img.header.extended_l2() {
            return Err(unsupported(
                "reading snapshots of images with extended L2 entries",
            ));
        }
        let (entries, _) = img.read_snapshots()?;
        let entry = entries
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::NoSuchSnapshot {
                path: path.to_path_buf(),
                name: name.to_string(),
            })?;
        let disk_size = entry.disk_size.unwrap_or(img.header.size);
        let l1 = img.read_l1(entry.l1_table_offset, entry.l1_size)?;
        Ok(SnapshotReader {
            img,
            l1,
            disk_size,
            l2: None,
        })
    }

    /// The disk's virtual size at the snapshot, in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// The image's cluster size, in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.img.cs()
    }

    /// The number of clusters of the disk at the snapshot.
    pub fn clusters(&self) -> u64 {
        self.disk_size.div_ceil(self.cluster_size())
    }

    /// Whether cluster `index` is allocated at the snapshot (without reading its data):
    /// `false` means it reads as zeros.
    pub fn allocated(&mut self, index: u64) -> Result<bool> {
        Ok(self.entry(index)?.is_some())
    }

    /// The content of cluster `index` at the snapshot.
    pub fn read(&mut self, index: u64) -> Result<Cluster> {
        let Some(offset) = self.entry(index)? else {
            return Ok(Cluster::Zero);
        };
        let cs = self.cluster_size();
        let len = cs.min(self.disk_size - index * cs);
        if offset.checked_add(len).is_none_or(|end| end > self.img.len) {
            return Err(self.img.corrupt(format!(
                "data cluster at {offset:#x} of guest cluster {index} lies beyond the end of the file"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.img
            .file
            .read_exact_at(&mut buf, offset)
            .map_err(io("read snapshot data", &self.img.path))?;
        Ok(Cluster::Data(buf))
    }

    /// The host offset of cluster `index`'s data, `None` if it reads as zeros.
    fn entry(&mut self, index: u64) -> Result<Option<u64>> {
        if index >= self.clusters() {
            return Err(Error::InvalidArgument {
                path: self.img.path.clone(),
                what: format!("cluster {index} of a {}-cluster disk", self.clusters()),
            });
        }
        let per_l2 = self.cluster_size() / 8;
        let (i1, i2) = ((index / per_l2) as usize, (index % per_l2) as usize);
        let Some(&l1e) = self.l1.get(i1) else {
            return Ok(None);
        };
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(None);
        }
        if self.l2.as_ref().is_none_or(|(i, _)| *i != i1) {
            self.l2 = Some((i1, self.img.read_l2(l2_off)?));
        }
        let Some((_, l2)) = &self.l2 else {
            return Ok(None);
        };
        let e = l2[i2];
        // Bit 0 of a standard entry: the cluster reads as zeros.
        if e & 1 != 0 && e & crate::format::COMPRESSED == 0 {
            return Ok(None);
        }
        match l2_ref(e, self.img.header.cluster_bits).map_err(|w| self.img.corrupt(w))? {
            L2Ref::None => Ok(None),
            L2Ref::Standard(off) => Ok(Some(off)),
            L2Ref::Compressed { .. } => Err(Error::Unsupported {
                path: self.img.path.clone(),
                what: format!("compressed cluster {index} in a snapshot being read"),
            }),
        }
    }
}

/// Creates `path`, a new qcow2 image of `disk_size` bytes with `cluster_size` clusters, and
/// writes `clusters` (index, bytes) into it; clusters not given read as zeros. Durable on
/// return. Fails with [`Error::AlreadyExists`] rather than overwrite.
pub(crate) fn write_image<I>(
    path: &Path,
    disk_size: u64,
    cluster_size: u32,
    clusters: I,
) -> Result<()>
where
    I: IntoIterator<Item = Result<(u64, Vec<u8>)>>,
{
    crate::create::create(path, disk_size, Some(cluster_size), None)?;
    let mut img = crate::DataImage::open(path)?;
    let cs = u64::from(cluster_size);
    for item in clusters {
        let (index, data) = item?;
        let at = index.checked_mul(cs).filter(|at| {
            at.checked_add(data.len() as u64)
                .is_some_and(|end| end <= disk_size)
        });
        let Some(at) = at else {
            return Err(Error::InvalidArgument {
                path: path.to_path_buf(),
                what: format!(
                    "cluster {index} ({} bytes) lies beyond the end of a {disk_size}-byte disk",
                    data.len()
                ),
            });
        };
        if data.iter().all(|b| *b == 0) {
            continue;
        }
        img.write_at(&data, at)?;
    }
    img.flush()?;
    drop(img);
    let file = std::fs::File::open(path).map_err(io("open image", path))?;
    file.sync_all().map_err(io("fsync image", path))?;
    Ok(())
}
