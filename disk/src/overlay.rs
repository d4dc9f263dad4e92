//! External snapshots: overlays whose unallocated clusters read from a backing image.
//!
//! The backing file name lives in cluster 0 (`backing_file_offset`, `backing_file_size`,
//! header bytes 8..20) with a backing format header extension ("qcow2"). Changing it
//! ([`rebase`]) first writes the new name into an unused part of cluster 0 and `fsync`s,
//! then switches bytes 8..20 in one write (inside the first sector) and `fsync`s again.
//! Guest data moves between images through `imago` ([`crate::DataImage`]), so clusters
//! shared with internal snapshots are copied, never overwritten.

use crate::create::create;
use crate::error::{io, Error, Result};
use crate::format::{l2_ref, put32, put64, L2Ref, OFFSET_MASK};
use crate::meta::Image;
use crate::DataImage;
use imago::file::File;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::InvalidArgument {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

pub fn backing_file(path: &Path) -> Result<Option<PathBuf>> {
    let img = Image::open(path, false)?;
    Ok(img
        .header
        .backing_file
        .as_deref()
        .map(|name| resolve(path, name)))
}

fn resolve(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// The name to store for `base` in an image at `image`: relative when both share a
/// directory, absolute otherwise.
fn stored_name(base: &Path, image: &Path) -> Result<String> {
    let abs = std::fs::canonicalize(base).map_err(io("resolve backing file", base))?;
    let dir_of = |p: &Path| {
        let d = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::canonicalize(d).ok()
    };
    let name = match (abs.parent(), dir_of(image), abs.file_name()) {
        (Some(bd), Some(od), Some(f)) if bd == od => PathBuf::from(f),
        _ => abs,
    };
    name.into_os_string()
        .into_string()
        .map_err(|_| bad(base, "backing path is not UTF-8"))
}

pub fn create_overlay(base: &Path, overlay: &Path) -> Result<()> {
    let b = Image::open(base, false)?;
    let name = stored_name(base, overlay)?;
    create(overlay, b.header.size, Some(b.cs() as u32), Some(&name))
}

fn open_read(path: &Path) -> Result<FormatAccess<File>> {
    let q = Qcow2::<File>::builder_path(path)
        .open(PermissiveImplicitOpenGate::default())
        .map_err(|source| Error::Io {
            op: "open image chain with imago",
            path: path.to_path_buf(),
            source,
        })?;
    Ok(FormatAccess::new(q))
}

/// Guest clusters that `img` itself defines (data, compressed or zero); `true` when the
/// whole cluster is defined (not only some subclusters).
fn own_clusters(img: &Image) -> Result<Vec<(u64, bool)>> {
    let h = &img.header;
    let cs = img.cs();
    let stride = (h.l2_entry_bytes() / 8) as usize;
    let per_l2 = cs / h.l2_entry_bytes();
    let total = h.size.div_ceil(cs);
    let mut out = Vec::new();
    for (i, e) in img
        .read_l1(h.l1_table_offset, h.l1_size)?
        .iter()
        .enumerate()
    {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let t = img.read_l2(l2)?;
        for (j, entry) in t.chunks_exact(stride).enumerate() {
            let guest = i as u64 * per_l2 + j as u64;
            if guest >= total {
                break;
            }
            let r = l2_ref(entry[0], h.cluster_bits).map_err(|w| img.corrupt(w))?;
            if stride == 2 {
                let bitmap = entry[1];
                let full = matches!(r, L2Ref::Compressed { .. })
                    || (bitmap as u32 | (bitmap >> 32) as u32) == u32::MAX;
                if full || bitmap != 0 {
                    out.push((guest, full));
                }
            } else if r != L2Ref::None || entry[0] & 1 != 0 {
                out.push((guest, true));
            }
        }
    }
    Ok(out)
}

/// Copies guest clusters `clusters` from `from` to `to`, in runs of contiguous clusters.
fn copy_clusters(
    from: &FormatAccess<File>,
    from_path: &Path,
    to: &mut DataImage,
    clusters: &[u64],
    cs: u64,
) -> Result<()> {
    let size = to.virtual_size();
    let max_run = (4 << 20) / cs + 1;
    let mut buf = Vec::new();
    let mut i = 0;
    while i < clusters.len() {
        let mut n = 1;
        while i + n < clusters.len()
            && clusters[i + n] == clusters[i] + n as u64
            && (n as u64) < max_run
        {
            n += 1;
        }
        let start = clusters[i] * cs;
        let end = ((clusters[i] + n as u64) * cs).min(size);
        buf.resize((end - start) as usize, 0);
        from.read(&mut buf[..], start).map_err(|source| Error::Io {
            op: "read guest data",
            path: from_path.to_path_buf(),
            source,
        })?;
        to.write_at(&buf, start)?;
        i += n;
    }
    Ok(())
}

pub fn commit_overlay(overlay: &Path) -> Result<()> {
    let img = Image::open(overlay, false)?;
    let base = match &img.header.backing_file {
        Some(name) => resolve(overlay, name),
        None => return Err(bad(overlay, "image has no backing file")),
    };
    if img.header.backing_format().is_some_and(|f| f != "qcow2") {
        return Err(Error::Unsupported {
            path: overlay.to_path_buf(),
            what: "backing image not qcow2".into(),
        });
    }
    let mut target = DataImage::open(&base)?;
    if target.virtual_size() != img.header.size {
        return Err(bad(
            overlay,
            "overlay and backing image differ in virtual size",
        ));
    }
    let clusters: Vec<u64> = own_clusters(&img)?.into_iter().map(|(c, _)| c).collect();
    let src = open_read(overlay)?;
    copy_clusters(&src, overlay, &mut target, &clusters, img.cs())?;
    target.flush()
}

pub fn rebase(image: &Path, new_backing: Option<&Path>) -> Result<()> {
    let img = Image::open(image, false)?;
    img.header.check_writable(image)?;
    let cs = img.cs();
    let size = img.header.size;
    let own = own_clusters(&img)?;
    let new_name = new_backing.map(|b| stored_name(b, image)).transpose()?;
    if let Some(b) = new_backing {
        if Image::open(b, false)?.header.size < size {
            return Err(bad(image, "new backing image is smaller than the image"));
        }
    }
    // Copy what would read differently through the new chain.
    {
        let cur = open_read(image)?;
        let new = new_backing.map(open_read).transpose()?;
        let mut owned = own
            .iter()
            .filter(|(_, full)| *full)
            .map(|(c, _)| *c)
            .peekable();
        let mut differ = Vec::new();
        let (mut a, mut b) = (vec![0u8; cs as usize], vec![0u8; cs as usize]);
        for c in 0..size.div_ceil(cs) {
            if owned.peek() == Some(&c) {
                owned.next();
                continue;
            }
            let len = (size - c * cs).min(cs) as usize;
            cur.read(&mut a[..len], c * cs)
                .map_err(|source| Error::Io {
                    op: "read guest data",
                    path: image.to_path_buf(),
                    source,
                })?;
            match (&new, new_backing) {
                (Some(n), Some(p)) => {
                    n.read(&mut b[..len], c * cs).map_err(|source| Error::Io {
                        op: "read guest data",
                        path: p.to_path_buf(),
                        source,
                    })?
                }
                _ => b[..len].fill(0),
            }
            if a[..len] != b[..len] {
                differ.push(c);
            }
        }
        if !differ.is_empty() {
            let mut target = DataImage::open(image)?;
            copy_clusters(&cur, image, &mut target, &differ, cs)?;
            target.flush()?;
        }
    }
    // Switch the backing file name.
    drop(img);
    let img = Image::open(image, true)?;
    let h = &img.header;
    let mut fields = [0u8; 12];
    if let Some(name) = &new_name {
        if name.len() > 1023 {
            return Err(bad(image, "backing file name longer than 1023 bytes"));
        }
        let ext_end = h.header_length as u64
            + h.extensions
                .iter()
                .map(|e| 8 + (e.data.len() as u64).next_multiple_of(8))
                .sum::<u64>()
            + 8;
        let old = (
            h.backing_file_offset,
            h.backing_file_offset + u64::from(h.backing_file_size),
        );
        let len = name.len() as u64;
        let fits = |at: u64| {
            at + len <= cs && (h.backing_file_offset == 0 || at + len <= old.0 || at >= old.1)
        };
        let at = [ext_end, old.1.next_multiple_of(8)]
            .into_iter()
            .find(|a| fits(*a))
            .ok_or_else(|| bad(image, "no room for the backing file name in cluster 0"))?;
        img.file
            .write_all_at(name.as_bytes(), at)
            .map_err(io("write backing file name", image))?;
        img.file
            .sync_all()
            .map_err(io("fsync backing file name", image))?;
        put64(&mut fields, 0, at);
        put32(&mut fields, 8, name.len() as u32);
    }
    img.file
        .write_all_at(&fields, 8)
        .map_err(io("write header (backing file)", image))?;
    img.file.sync_all().map_err(io("fsync header", image))?;
    Ok(())
}
