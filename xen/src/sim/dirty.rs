//! The dirty-page log of a simulated guest: which 4 KiB pages of its memory its vCPU wrote
//! since the log was last reset, as Xen's log-dirty mode tells for a real domain.
//!
//! The guest keeps it in `dirty.log` in the domain directory (mode 0600):
//!
//! ```text
//! 0   4  magic b"DSDL"
//! 4   4  version 1, u32 LE
//! 8   8  base, u64 LE: what the host named the memory the log is relative to when it
//!        reset it (0: nothing; the log is not usable)
//! 16  8  number of pages, u64 LE
//! 24  ..  bitmap, one bit per page (bit i%8 of byte i/8)
//! ```
//!
//! A guest boots with base 0: memory written by anything but its vCPU (a restore, a start)
//! is not in the log. The vCPU sets a page's bit (written through to the file) before it
//! writes the page. The host reads the file while the guest is paused.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

const MAGIC: &[u8; 4] = b"DSDL";
const HEADER: u64 = 24;

/// The guest's side of the log.
#[derive(Debug)]
pub(crate) struct DirtyLog {
    file: File,
    bits: Mutex<Vec<u8>>,
}

fn header(base: u64, pages: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    h[8..16].copy_from_slice(&base.to_le_bytes());
    h[16..24].copy_from_slice(&pages.to_le_bytes());
    h
}

impl DirtyLog {
    /// A new log of `pages` pages with base 0 at `path` (replacing an old one).
    pub(crate) fn create(path: &Path, pages: u64) -> std::io::Result<DirtyLog> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        let bits = vec![0u8; pages.div_ceil(8) as usize];
        file.write_all_at(&header(0, pages), 0)?;
        file.write_all_at(&bits, HEADER)?;
        Ok(DirtyLog {
            file,
            bits: Mutex::new(bits),
        })
    }

    /// Records that `page` is about to be written.
    pub(crate) fn mark(&self, page: u64) -> std::io::Result<()> {
        let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        let i = (page / 8) as usize;
        let Some(byte) = bits.get_mut(i) else {
            return Ok(());
        };
        let bit = 1u8 << (page % 8);
        if *byte & bit == 0 {
            *byte |= bit;
            self.file.write_all_at(&[*byte], HEADER + i as u64)?;
        }
        Ok(())
    }

    /// Clears every bit and records `base`.
    pub(crate) fn reset(&self, base: u64) -> std::io::Result<()> {
        let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        bits.fill(0);
        let pages = bits.len() as u64 * 8;
        self.file.write_all_at(&bits, HEADER)?;
        let mut h = [0u8; HEADER as usize];
        self.file.read_exact_at(&mut h, 0)?;
        let pages = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default()).min(pages);
        self.file.write_all_at(&header(base, pages), 0)
    }
}

/// Reads a log: its base and the pages marked, or `None` if there is no usable log.
pub(crate) fn read(path: &Path) -> std::io::Result<Option<(u64, Vec<u64>)>> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if data.len() < HEADER as usize || &data[..4] != MAGIC || data[4..8] != 1u32.to_le_bytes() {
        return Ok(None);
    }
    let base = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
    let pages = u64::from_le_bytes(data[16..24].try_into().unwrap_or_default());
    let bits = &data[HEADER as usize..];
    if base == 0 || (bits.len() as u64) < pages.div_ceil(8) {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (i, b) in bits.iter().enumerate() {
        if *b == 0 {
            continue;
        }
        for bit in 0..8 {
            let page = i as u64 * 8 + bit;
            if b & (1 << bit) != 0 && page < pages {
                out.push(page);
            }
        }
    }
    Ok(Some((base, out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_reset_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty.log");
        let log = DirtyLog::create(&path, 100).expect("create");
        log.mark(3).expect("mark");
        assert_eq!(read(&path).expect("read"), None, "base 0: not usable");
        log.reset(7).expect("reset");
        for p in [0, 3, 3, 99, 100, 5000] {
            log.mark(p).expect("mark");
        }
        assert_eq!(read(&path).expect("read"), Some((7, vec![0, 3, 99])));
        log.reset(8).expect("reset");
        assert_eq!(read(&path).expect("read"), Some((8, vec![])));
    }
}
