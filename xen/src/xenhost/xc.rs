//! Domain run state, pause and unpause through libxenctrl.
//!
//! The FFI functions are swapped for an in-memory fake in unit tests (see `fake` below), so
//! the code around them runs without a hypervisor.

use std::io;

use crate::RunState;

#[cfg(test)]
use fake::{
    xc_domain_getinfolist, xc_domain_pause, xc_domain_unpause, xc_interface_close,
    xc_interface_open,
};
#[cfg(not(test))]
use xenctrl_sys::{
    xc_domain_getinfolist, xc_domain_pause, xc_domain_unpause, xc_interface_close,
    xc_interface_open,
};
use xenctrl_sys::{
    xc_domaininfo_t, xc_interface, XEN_DOMINF_dying, XEN_DOMINF_paused, XEN_DOMINF_shutdown,
};

/// What the hypervisor says about one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct XcDomain {
    /// Domain id.
    pub domid: u32,
    /// `XEN_DOMINF_*` flags.
    pub flags: u32,
    /// Pages the domain holds.
    pub tot_pages: u64,
    /// The domain's handle: the UUID of its configuration (`c_info.uuid`).
    pub handle: [u8; 16],
}

impl XcDomain {
    /// The run state domsnap sees: a dying domain is on its way out (shut off); a shut-down
    /// domain kept by `on_crash = "preserve"` cannot run, like a paused one.
    pub fn run_state(&self) -> RunState {
        if self.flags & XEN_DOMINF_dying != 0 {
            RunState::Shutoff
        } else if self.flags & (XEN_DOMINF_paused | XEN_DOMINF_shutdown) != 0 {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Whether the toolstack (controller) holds the domain paused.
    pub fn paused(&self) -> bool {
        self.flags & XEN_DOMINF_paused != 0
    }
}

impl From<&xc_domaininfo_t> for XcDomain {
    fn from(info: &xc_domaininfo_t) -> XcDomain {
        XcDomain {
            domid: u32::from(info.domain),
            flags: info.flags,
            tot_pages: info.tot_pages,
            handle: info.handle,
        }
    }
}

/// An open libxenctrl handle.
#[derive(Debug)]
pub(crate) struct Xc {
    handle: *mut xc_interface,
}

// SAFETY: libxenctrl handles may be used from any thread (each call does its own hypercall
// through the privcmd fd); `Xc` never hands out the raw pointer.
unsafe impl Send for Xc {}
// SAFETY: as above; libxenctrl serialises what it needs internally.
unsafe impl Sync for Xc {}

impl Xc {
    /// Opens the privileged command interface (dom0 only).
    pub fn open() -> io::Result<Xc> {
        // SAFETY: null loggers select libxenctrl's default stderr logger; no flags.
        let handle = unsafe { xc_interface_open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if handle.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Xc { handle })
    }

    /// The domain with id `domid`, if it exists.
    pub fn domain(&self, domid: u32) -> io::Result<Option<XcDomain>> {
        let mut info = xc_domaininfo_t::default();
        // SAFETY: `handle` is open; `info` is a valid buffer for one entry.
        let n = unsafe { xc_domain_getinfolist(self.handle, domid, 1, &mut info) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // getinfolist returns domains with id >= domid: a gap means `domid` is gone.
        if n == 0 || u32::from(info.domain) != domid {
            return Ok(None);
        }
        Ok(Some(XcDomain::from(&info)))
    }

    /// Every domain of the hypervisor (Domain-0 included), by increasing id.
    pub fn domains(&self) -> io::Result<Vec<XcDomain>> {
        const BATCH: usize = 256;
        let mut out = Vec::new();
        let mut first = 0u32;
        loop {
            let mut buf = vec![xc_domaininfo_t::default(); BATCH];
            // SAFETY: `handle` is open; `buf` has room for BATCH entries.
            let n = unsafe {
                xc_domain_getinfolist(self.handle, first, BATCH as u32, buf.as_mut_ptr())
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            out.extend(buf[..n].iter().map(XcDomain::from));
            match buf[..n].last() {
                Some(last) if n == BATCH => first = u32::from(last.domain) + 1,
                _ => return Ok(out),
            }
        }
    }

    /// Raises the domain's pause count.
    pub fn pause(&self, domid: u32) -> io::Result<()> {
        // SAFETY: `handle` is open; the call takes plain integers.
        check(unsafe { xc_domain_pause(self.handle, domid) })
    }

    /// Lowers the domain's pause count.
    pub fn unpause(&self, domid: u32) -> io::Result<()> {
        // SAFETY: `handle` is open; the call takes plain integers.
        check(unsafe { xc_domain_unpause(self.handle, domid) })
    }
}

impl Drop for Xc {
    fn drop(&mut self) {
        // SAFETY: `handle` was returned by xc_interface_open and is closed once, here.
        unsafe { xc_interface_close(self.handle) };
    }
}

fn check(rc: std::os::raw::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A hypervisor kept in files, with the libxenctrl signatures, for unit tests: domain `N` is
/// the file `<dir>/xc/N` holding "FLAGS PAUSE_COUNT" (so a fake `xl` script can create and
/// destroy domains too). The directory is set per test thread.
#[cfg(test)]
#[allow(clippy::missing_safety_doc)]
pub(crate) mod fake {
    use std::cell::RefCell;
    use std::fs;
    use std::os::raw::{c_int, c_uint};
    use std::path::PathBuf;

    use xenctrl_sys::{xc_domaininfo_t, xc_interface, xentoollog_logger, XEN_DOMINF_paused};

    thread_local! {
        static DIR: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
        static FAIL_OPEN: RefCell<bool> = const { RefCell::new(false) };
    }

    /// Uses `<dir>/xc/` as this thread's hypervisor.
    pub fn use_dir(dir: PathBuf) {
        fs::create_dir_all(dir.join("xc")).expect("fake xc dir");
        DIR.with(|d| *d.borrow_mut() = Some(dir));
    }

    fn path(domid: u32) -> PathBuf {
        DIR.with(|d| d.borrow().clone())
            .expect("fake xc: use_dir first")
            .join("xc")
            .join(domid.to_string())
    }

    /// Adds (or replaces) a domain.
    pub fn set_domain(domid: u32, flags: u32, pause_count: u32) {
        fs::write(path(domid), format!("{flags} {pause_count}")).expect("fake xc write");
    }

    /// The flags and pause count of a domain.
    pub fn get(domid: u32) -> Option<(u32, u32)> {
        let s = fs::read_to_string(path(domid)).ok()?;
        let mut it = s.split_whitespace().map(|x| x.parse::<u32>().unwrap_or(0));
        Some((it.next().unwrap_or(0), it.next().unwrap_or(0)))
    }

    /// The handle of a domain: the UUID in the third field of its file, else [`DEFAULT_UUID`].
    fn handle(domid: u32) -> [u8; 16] {
        let s = fs::read_to_string(path(domid)).unwrap_or_default();
        let uuid = s.split_whitespace().nth(2).unwrap_or(DEFAULT_UUID);
        super::super::config::parse_uuid(uuid).unwrap_or_default()
    }

    /// The UUID of every fake domain whose file does not name one.
    pub const DEFAULT_UUID: &str = "d0d0d0d0-0000-4000-8000-000000000001";

    /// Makes `xc_interface_open` fail, as off a Xen host.
    pub fn fail_open(fail: bool) {
        FAIL_OPEN.with(|f| *f.borrow_mut() = fail);
    }

    pub unsafe fn xc_interface_open(
        _logger: *mut xentoollog_logger,
        _dombuild_logger: *mut xentoollog_logger,
        _flags: c_uint,
    ) -> *mut xc_interface {
        if FAIL_OPEN.with(|f| *f.borrow()) {
            return std::ptr::null_mut();
        }
        std::ptr::NonNull::dangling().as_ptr()
    }

    pub unsafe fn xc_interface_close(_xch: *mut xc_interface) -> c_int {
        0
    }

    pub unsafe fn xc_domain_getinfolist(
        _xch: *mut xc_interface,
        first: u32,
        max: c_uint,
        info: *mut xc_domaininfo_t,
    ) -> c_int {
        let dir = path(0)
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default();
        let mut ids: Vec<u32> = fs::read_dir(dir)
            .map(|r| {
                r.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        let mut n = 0;
        for domid in ids.into_iter().filter(|&d| d >= first) {
            if n == max as usize {
                break;
            }
            let Some((flags, count)) = get(domid) else {
                continue;
            };
            let i = xc_domaininfo_t {
                domain: domid as u16,
                flags: flags | if count > 0 { XEN_DOMINF_paused } else { 0 },
                tot_pages: 32768,
                handle: handle(domid),
                ..Default::default()
            };
            // SAFETY: the caller gives room for `max` entries.
            unsafe { *info.add(n) = i };
            n += 1;
        }
        n as c_int
    }

    fn change(domid: u32, f: impl FnOnce(u32) -> Option<u32>) -> c_int {
        match get(domid).and_then(|(flags, c)| Some((flags, f(c)?))) {
            Some((flags, c)) => {
                set_domain(domid, flags, c);
                0
            }
            None => {
                // SAFETY: errno is thread-local.
                unsafe { *libc::__errno_location() = libc::EINVAL };
                -1
            }
        }
    }

    pub unsafe fn xc_domain_pause(_xch: *mut xc_interface, domid: u32) -> c_int {
        change(domid, |c| Some(c + 1))
    }

    pub unsafe fn xc_domain_unpause(_xch: *mut xc_interface, domid: u32) -> c_int {
        change(domid, |c| c.checked_sub(1))
    }
}
