//! Image locking compatible with QEMU's, so that this crate and QEMU (including the Xen
//! qdisk device model and `qemu-img`) never modify an image the other has open.
//!
//! QEMU takes open-file-description (OFD) byte-range locks on the image file: a read lock
//! on byte `100 + p` for each permission `p` it holds (0 consistent read, 1 write, 2 write
//! unchanged, 3 resize) and on byte `200 + p` for each permission it refuses to share.
//! It refuses to open an image when its needs conflict with a lock held by someone else.
//!
//! - Metadata changes (snapshot operations, repair, rebase) take a write lock on bytes
//!   100..=104 and 200..=204: they fail with [`Error::Locked`] while any QEMU or
//!   [`crate::DataImage`] has the image open, and QEMU cannot open it meanwhile.
//! - A [`crate::DataImage`] holds read locks as a QEMU writer does: 100 and 101 (it reads
//!   and writes) and 201, 203 (it does not share write or resize).
//!
//! OFD locks belong to the open file and vanish when it is closed, also on a crash.

use crate::error::{Error, Result};
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;
use std::fs::File;
use std::path::Path;

/// Conflicts are retried for a moment: a process forked by another thread holds copies of
/// our descriptors (and so our locks) until it executes its program.
const ATTEMPTS: u32 = 25;
const PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

fn flock(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

fn lock(file: &File, path: &Path, kind: libc::c_int, start: i64, len: i64) -> Result<()> {
    let fl = flock(kind, start, len);
    for _ in 0..ATTEMPTS {
        match fcntl(file, FcntlArg::F_OFD_SETLK(&fl)) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => std::thread::sleep(PAUSE),
            Err(e) => {
                return Err(Error::Io {
                    op: "lock image",
                    path: path.to_path_buf(),
                    source: e.into(),
                })
            }
        }
    }
    Err(Error::Locked {
        path: path.to_path_buf(),
    })
}

/// Waits until no other open file holds a lock conflicting with a write lock on `byte`.
fn unlocked(file: &File, path: &Path, byte: i64) -> Result<()> {
    for _ in 0..ATTEMPTS {
        let mut probe = flock(libc::F_WRLCK, byte, 1);
        fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| Error::Io {
            op: "probe image lock",
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        if probe.l_type == libc::F_UNLCK as libc::c_short {
            return Ok(());
        }
        std::thread::sleep(PAUSE);
    }
    Err(Error::Locked {
        path: path.to_path_buf(),
    })
}

/// Exclusive access for a metadata change (the file must be open for writing).
pub fn exclusive(file: &File, path: &Path) -> Result<()> {
    lock(file, path, libc::F_WRLCK, 100, 5)?;
    lock(file, path, libc::F_WRLCK, 200, 5)
}

/// The locks of a guest-data writer.
pub fn writer(file: &File, path: &Path) -> Result<()> {
    for byte in [100, 101, 201, 203] {
        lock(file, path, libc::F_RDLCK, byte, 1)?;
    }
    // Refuse if someone (a QEMU reader or writer) does not share what we need.
    for byte in [200, 201] {
        unlocked(file, path, byte)?;
    }
    Ok(())
}
