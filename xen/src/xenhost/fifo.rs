//! Streaming a domain's memory through a named pipe: `xl save -p DOM FIFO` writes into it while
//! domsnap reads it into the caller's sink, and `xl restore -p FIFO` reads what domsnap feeds
//! from the caller's source. Nothing of the memory image touches a file.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

/// Why streaming stopped.
#[derive(Debug)]
pub(crate) enum StreamError {
    /// The named pipe could not be read or written.
    Pipe(io::Error),
    /// The caller's sink or source failed.
    Caller(io::Error),
    /// The `xl` process exited before it opened the pipe.
    NotOpened,
}

const BUF: usize = 1 << 20;
const POLL_MS: i32 = 100;

/// Makes a named pipe at `path`, mode 0600.
pub(crate) fn make(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `file` is readable or hung up, at most `ms` milliseconds; true if it is.
fn poll_in(file: &File, ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Copies what the writer (`child`) puts into the pipe at `fifo` into `sink` until the writer
/// closes it, or until `child` exits without having opened it. Returns the bytes copied.
///
/// The pipe is opened non-blocking, so that a writer that never comes cannot block us; a
/// failing sink closes the pipe early, which makes the writer see a broken pipe.
pub(crate) fn drain(
    fifo: &Path,
    child: &mut Child,
    sink: &mut dyn Write,
) -> Result<u64, StreamError> {
    let mut pipe = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(fifo)
        .map_err(StreamError::Pipe)?;
    widen(&pipe);
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    let mut opened = false;
    loop {
        // Linux does not report a hang-up on a FIFO before its first writer came, so waiting
        // here until a writer has opened the pipe and then closed it is safe.
        if !poll_in(&pipe, POLL_MS).map_err(StreamError::Pipe)? {
            if child.try_wait().map_err(StreamError::Pipe)?.is_some() {
                // Writer gone: take whatever it left in the pipe, then stop.
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            sink.write_all(&buf[..n]).map_err(StreamError::Caller)?;
                            total += n as u64;
                            opened = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(StreamError::Pipe(e)),
                    }
                }
                return if opened {
                    Ok(total)
                } else {
                    Err(StreamError::NotOpened)
                };
            }
            continue;
        }
        match pipe.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                opened = true;
                sink.write_all(&buf[..n]).map_err(StreamError::Caller)?;
                total += n as u64;
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StreamError::Pipe(e)),
        }
    }
}

/// Feeds `source` into the pipe at `fifo` once the reader (`child`) has opened it, then closes
/// the pipe. Returns the bytes written. If `child` exits before opening the pipe:
/// [`StreamError::NotOpened`]; if it exits while reading: a broken-pipe [`StreamError::Pipe`].
pub(crate) fn feed(
    fifo: &Path,
    child: &mut Child,
    source: &mut dyn Read,
) -> Result<u64, StreamError> {
    let mut pipe = loop {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(fifo)
        {
            Ok(f) => break f,
            // ENXIO: no reader yet.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if child.try_wait().map_err(StreamError::Pipe)?.is_some() {
                    return Err(StreamError::NotOpened);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(StreamError::Pipe(e)),
        }
    };
    set_blocking(&pipe).map_err(StreamError::Pipe)?;
    widen(&pipe);
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StreamError::Caller(e)),
        };
        pipe.write_all(&buf[..n]).map_err(StreamError::Pipe)?;
        total += n as u64;
    }
    pipe.flush().map_err(StreamError::Pipe)?;
    Ok(total)
}

/// Asks for a 1 MiB pipe buffer (default 64 KiB): fewer wake-ups of writer and reader. Best
/// effort: an unprivileged process may be limited by `/proc/sys/fs/pipe-max-size`.
fn widen(file: &File) {
    // SAFETY: the fd is open for the lifetime of `file`; F_SETPIPE_SZ takes an int.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETPIPE_SZ, BUF as libc::c_int) };
}

fn set_blocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is open for the lifetime of `file`; F_GETFL takes no argument.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL takes an int of flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
