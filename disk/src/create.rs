//! Creating empty images and overlays.
//!
//! A new image is laid out as: cluster 0 header (and, for overlays, the backing format
//! extension and the backing file name), then the refcount table, the refcount blocks and the
//! L1 table, all zero-initialised except for the refcounts of these clusters. The file is
//! written under a temporary name and `fsync`ed, then hard-linked to its final name (which
//! never replaces an existing file), the temporary name removed, and the directory `fsync`ed
//! so that the new name is durable too.

use crate::error::{io, Error, Result};
use crate::format::{put32, put64, EXT_BACKING_FORMAT, MAGIC};
use crate::meta::set_refcount;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub fn create(
    path: &Path,
    virtual_size: u64,
    cluster_size: Option<u32>,
    backing: Option<&str>,
) -> Result<()> {
    let cs = u64::from(cluster_size.unwrap_or(65536));
    let bad = |what: String| Error::InvalidArgument {
        path: path.to_path_buf(),
        what,
    };
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(bad(format!(
            "cluster size {cs} is not a power of two in 512..=2 MiB"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    let l1_size = virtual_size.div_ceil(cs).div_ceil(cs / 8);
    if l1_size > crate::format::MAX_L1_ENTRIES {
        return Err(bad(format!(
            "virtual size {virtual_size} too large for cluster size {cs}"
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let bits = 16u32;
    let epb = cs * 8 / u64::from(bits);
    // Clusters: header, refcount table, refcount blocks, L1 table.
    let mut rb = 1u64;
    let mut rt = 1u64;
    loop {
        let total = 1 + rt + rb + l1_clusters;
        let need_rb = total.div_ceil(epb);
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb == rb && need_rt == rt {
            break;
        }
        rb = need_rb;
        rt = need_rt;
    }
    let total = 1 + rt + rb + l1_clusters;
    let rt_off = cs;
    let rb_off = rt_off + rt * cs;
    let l1_off = rb_off + rb * cs;

    let mut head = vec![0u8; cs as usize];
    put32(&mut head, 0, MAGIC);
    put32(&mut head, 4, 3);
    put32(&mut head, 20, cluster_bits);
    put64(&mut head, 24, virtual_size);
    put32(&mut head, 36, l1_size as u32);
    put64(&mut head, 40, l1_off);
    put64(&mut head, 48, rt_off);
    put32(&mut head, 56, rt as u32);
    put32(&mut head, 96, 4);
    put32(&mut head, 100, 112);
    let mut at = 112usize;
    if let Some(name) = backing {
        if name.len() > 1023 || name.is_empty() {
            return Err(bad("backing file name must be 1..=1023 bytes".into()));
        }
        let fmt = b"qcow2";
        put32(&mut head, at, EXT_BACKING_FORMAT);
        put32(&mut head, at + 4, fmt.len() as u32);
        head[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt);
        at += (8 + fmt.len()).next_multiple_of(8);
        at += 8; // end of extensions (type 0)
        if at + name.len() > cs as usize {
            return Err(bad(
                "backing file name does not fit in the header cluster".into()
            ));
        }
        head[at..at + name.len()].copy_from_slice(name.as_bytes());
        put64(&mut head, 8, at as u64);
        put32(&mut head, 16, name.len() as u32);
    }
    let mut body = vec![0u8; ((total - 1) * cs) as usize];
    for b in 0..rb {
        let off = (b * 8) as usize;
        body[off..off + 8].copy_from_slice(&(rb_off + b * cs).to_be_bytes());
        for j in 0..epb {
            let c = b * epb + j;
            if c >= total {
                break;
            }
            let blk = ((rb_off - cs + b * cs) as usize)..((rb_off + b * cs) as usize);
            set_refcount(&mut body[blk], j as usize, bits, 1);
        }
    }
    if path.exists() {
        return Err(Error::AlreadyExists {
            path: path.to_path_buf(),
        });
    }
    // Written under a temporary name, then linked to the final name (which fails rather
    // than replace an existing file): a crash never leaves a half-written image behind
    // `path`.
    let tmp = temp_name(path)?;
    let result = write_new(&tmp, &head, &body, cs).and_then(|()| {
        std::fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::AlreadyExists {
                path: path.to_path_buf(),
            },
            _ => Error::Io {
                op: "link new image",
                path: path.to_path_buf(),
                source: e,
            },
        })
    });
    let removed = std::fs::remove_file(&tmp).map_err(io("remove temporary image", &tmp));
    result?;
    removed?;
    sync_dir(path)?;
    Ok(())
}

fn temp_name(path: &Path) -> Result<std::path::PathBuf> {
    let name = path.file_name().ok_or_else(|| Error::InvalidArgument {
        path: path.to_path_buf(),
        what: "no file name".into(),
    })?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp-{}", std::process::id()));
    Ok(path.with_file_name(tmp))
}

fn write_new(tmp: &Path, head: &[u8], body: &[u8], cs: u64) -> Result<()> {
    // Disk images hold guest data: private to their owner, whatever the umask.
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io("create temporary image", tmp))?;
    file.write_all_at(head, 0)
        .map_err(io("write header", tmp))?;
    file.write_all_at(body, cs)
        .map_err(io("write tables", tmp))?;
    file.sync_all().map_err(io("fsync new image", tmp))
}

/// `fsync`s the directory holding `path`, making a new directory entry durable.
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}
