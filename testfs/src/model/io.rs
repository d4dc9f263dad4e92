//! File data: reads, writes, truncation, allocation.

use std::sync::Arc;

use super::{now, Data, FaultOn, Ino, Model, Res, BLOCK};

impl Model {
    pub(super) fn truncate(&mut self, ino: Ino, new: u64) -> Res<()> {
        let Data::File { size, blocks } = &mut self.node_mut(ino)?.data else {
            return Err(libc::EISDIR);
        };
        let first_gone = new.div_ceil(BLOCK);
        let gone: Vec<u64> = blocks.range(first_gone..).map(|(k, _)| *k).collect();
        for k in &gone {
            blocks.remove(k);
        }
        // Zero the tail of a block cut in the middle (bytes past the end read as zero).
        if !new.is_multiple_of(BLOCK) {
            if let Some(b) = blocks.get_mut(&(new / BLOCK)) {
                Arc::make_mut(b)[(new % BLOCK) as usize..].fill(0);
            }
        }
        *size = new;
        self.used_blocks -= gone.len() as u64;
        Ok(())
    }

    /// Reads up to `len` bytes at `off`.
    pub fn read(&self, ino: Ino, off: u64, len: u32) -> Res<Vec<u8>> {
        if self.frozen {
            return Err(libc::EIO);
        }
        let Data::File { size, blocks } = &self.node(ino)?.data else {
            return Err(libc::EISDIR);
        };
        let end = (off + u64::from(len)).min(*size);
        if off >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - off) as usize];
        let mut pos = off;
        while pos < end {
            let b = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = ((BLOCK as usize) - within).min((end - pos) as usize);
            if let Some(block) = blocks.get(&b) {
                let at = (pos - off) as usize;
                out[at..at + n].copy_from_slice(&block[within..within + n]);
            }
            pos += n as u64;
        }
        Ok(out)
    }

    /// Writes `data` at `off`; returns the bytes written.
    pub fn write(&mut self, ino: Ino, off: u64, data: &[u8]) -> Res<u32> {
        self.check(FaultOn::Write, ino, None)?;
        let end = off + data.len() as u64;
        let new_blocks = {
            let Data::File { blocks, .. } = &self.node(ino)?.data else {
                return Err(libc::EISDIR);
            };
            (off / BLOCK..end.div_ceil(BLOCK))
                .filter(|b| !blocks.contains_key(b))
                .count() as u64
        };
        if new_blocks > 0 {
            self.check(FaultOn::Grow, ino, None)?;
        }
        if let Some(cap) = self.capacity {
            if (self.used_blocks + new_blocks) * BLOCK > cap {
                self.fired
                    .push((FaultOn::Write, self.path(ino), libc::ENOSPC));
                return Err(libc::ENOSPC);
            }
        }
        self.used_blocks += new_blocks;
        let n = self.node_mut(ino)?;
        let t = now();
        n.mtime = t;
        n.ctime = t;
        let Data::File { size, blocks } = &mut n.data else {
            unreachable!("checked above");
        };
        let mut pos = off;
        while pos < end {
            let b = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let k = ((BLOCK as usize) - within).min((end - pos) as usize);
            let block = blocks
                .entry(b)
                .or_insert_with(|| Arc::new([0u8; BLOCK as usize]));
            let at = (pos - off) as usize;
            Arc::make_mut(block)[within..within + k].copy_from_slice(&data[at..at + k]);
            pos += k as u64;
        }
        *size = (*size).max(end);
        Ok(data.len() as u32)
    }

    /// `fallocate`: mode 0 extends the size; `FALLOC_FL_KEEP_SIZE` changes nothing visible;
    /// `FALLOC_FL_PUNCH_HOLE` zeroes the range.
    pub fn fallocate(&mut self, ino: Ino, off: u64, len: u64, mode: i32) -> Res<()> {
        self.check(FaultOn::Write, ino, None)?;
        let Data::File { size, .. } = &self.node(ino)?.data else {
            return Err(libc::EISDIR);
        };
        let size = *size;
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            let end = (off + len).min(size);
            if off < end {
                let zeros = vec![0u8; (end - off) as usize];
                self.write(ino, off, &zeros)?;
            }
            return Ok(());
        }
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        if let Some(cap) = self.capacity {
            if (self.used_blocks * BLOCK).saturating_add(len) > cap {
                return Err(libc::ENOSPC);
            }
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && off + len > size {
            if let Data::File { size, .. } = &mut self.node_mut(ino)?.data {
                *size = off + len;
            }
        }
        Ok(())
    }
}
