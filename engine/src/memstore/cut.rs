//! Where a memory stream is cut into chunks.
//!
//! - **Raw memory** (the simulated host's stream is its memory file): 4 KiB pages.
//! - **`xl save` streams** (they start with xl's magic): parsed layer by layer — the xl
//!   header, the libxl stream header and records, the libxc image and domain headers and
//!   records (layouts in the Xen sources' `docs/specs/lib{xl,xc}-migration-stream.pandoc`).
//!   Each page of a `PAGE_DATA` record is one chunk; everything else (headers, the pfn
//!   lists, other records) is cut into **framing** chunks at record boundaries, at most
//!   [`CHUNK_MAX`] each. Two saves of one domain then cut into the same sequence of pieces,
//!   and a page that did not change is the same chunk at the same position.
//! - Anything else, and the rest of an `xl` stream from the first thing the parser does not
//!   know (an unknown record or version, `page_shift` ≠ 12, a length that does not add up,
//!   checkpoint records, a truncated stream): **content-defined chunks** (FastCDC v2020,
//!   16/64/256 KiB; a maximal run of zeros is cut without the rolling hash).
//!
//! The chunks of a stream, concatenated, are the stream: restore re-emits it byte for byte
//! whatever way it was cut. The cutter only looks at a bounded window ([`LOOKAHEAD`] bytes)
//! and allocates nothing that depends on the stream's content.

use fastcdc::v2020::{self, Normalization};

use super::format::{is_zero, CHUNK_MAX, PAGE};

/// Bytes the cutter may look at past the current position (less only at the end of the
/// stream).
pub const LOOKAHEAD: usize = CHUNK_MAX;

const CDC_MIN: usize = 16 << 10;
const CDC_AVG: usize = 64 << 10;

/// The 32-byte magic at the start of an `xl save` file.
pub const XL_MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
const XL_HEADER: usize = 48;
const XL_FLAG_JSON: u32 = 1;
const XL_FLAG_STREAM_V2: u32 = 2;
const LIBXL_IDENT: u64 = 0x4c69_6278_6c46_6d74; // "LibxlFmt"
const LIBXC_ID: u32 = 0x5845_4e46; // "XENF"
/// Pfn entries accepted in one `PAGE_DATA` record (`xl save` sends batches of 1024).
const MAX_BATCH: usize = 8192;
/// Largest record accepted (the libxc spec's limit).
const MAX_RECORD: u64 = 128 << 20;
/// Largest xl optional data (the domain's JSON configuration) accepted.
const MAX_XL_OPTIONAL: u64 = 64 << 20;

/// What a piece of the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    /// One page of guest memory (raw memory, or a page of an `xl` `PAGE_DATA` record).
    Page,
    /// Headers, page lists and other records of an `xl save` stream.
    Framing,
    /// A content-defined chunk of a stream the cutter does not know.
    Opaque,
}

/// What the cutter knows about the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Not decided yet (nothing seen).
    Unknown,
    /// Raw memory, cut into pages.
    Raw,
    /// An `xl save` stream, parsed.
    Xl,
    /// A stream cut into content-defined chunks (from the start, or from where the `xl`
    /// parser stopped understanding it).
    Opaque,
}

#[derive(Debug, Clone, Copy)]
enum St {
    Start,
    Raw,
    XlHeader,
    /// `left` framing bytes of known length, then `then`.
    Frame {
        left: u64,
        then: Then,
    },
    LibxlHeader,
    LibxlRecord,
    LibxcImageHeader,
    LibxcDomainHeader,
    LibxcRecord,
    Pages {
        left: u32,
    },
    /// After libxl's END record.
    End,
    Opaque,
}

#[derive(Debug, Clone, Copy)]
enum Then {
    LibxlHeader,
    LibxlRecord,
    LibxcImageHeader,
    LibxcRecord,
    /// After libxl's END record: the stream should end here.
    End,
}

/// Cuts one stream; see the module documentation.
#[derive(Debug, Clone)]
pub struct Cutter {
    st: St,
    masks: (u64, u64),
    /// Why the parser gave up, if it did.
    gave_up: Option<&'static str>,
}

impl Default for Cutter {
    fn default() -> Self {
        Cutter::new()
    }
}

impl Cutter {
    /// A cutter at the start of a stream; the stream's kind is decided by its first bytes.
    pub fn new() -> Cutter {
        Cutter {
            st: St::Start,
            masks: v2020::select_masks(CDC_AVG, Normalization::Level1),
            gave_up: None,
        }
    }

    /// The stream's kind, as far as seen.
    pub fn kind(&self) -> StreamKind {
        match self.st {
            St::Start => StreamKind::Unknown,
            St::Raw => StreamKind::Raw,
            St::Opaque => StreamKind::Opaque,
            _ => StreamKind::Xl,
        }
    }

    /// Why an `xl` stream stopped being parsed (and was cut content-defined from there).
    pub fn gave_up(&self) -> Option<&'static str> {
        self.gave_up
    }

    /// The next piece of the stream, which starts at `pending[0]`: its length (≥ 1, ≤
    /// `pending.len()`, ≤ [`CHUNK_MAX`]) and kind. `pending` must hold at least
    /// [`LOOKAHEAD`] bytes unless the stream ends with it (`eof`). `pending` must not be
    /// empty.
    pub fn next(&mut self, pending: &[u8], eof: bool) -> (usize, PieceKind) {
        debug_assert!(!pending.is_empty());
        loop {
            if let Some(cut) = self.step(pending, eof) {
                let (n, kind) = cut;
                return (n.clamp(1, pending.len().min(CHUNK_MAX)), kind);
            }
        }
    }

    fn give_up(&mut self, why: &'static str) -> Option<(usize, PieceKind)> {
        self.gave_up = Some(why);
        self.st = St::Opaque;
        None
    }

    /// One move of the state machine: a piece, or `None` after a change of state.
    fn step(&mut self, p: &[u8], eof: bool) -> Option<(usize, PieceKind)> {
        let need = |n: usize| p.len() >= n;
        match self.st {
            St::Start => {
                if need(XL_MAGIC.len()) && p.starts_with(XL_MAGIC) {
                    self.st = St::XlHeader;
                } else if need(XL_MAGIC.len()) || eof {
                    self.st = St::Raw;
                } else {
                    return Some((p.len(), PieceKind::Opaque));
                }
                None
            }
            St::Raw => Some((PAGE.min(p.len()), PieceKind::Page)),
            St::End => self.give_up("bytes after the end of the xl stream"),
            St::Opaque => Some((self.cdc(p), PieceKind::Opaque)),
            St::Frame { left, then } => {
                let n = (left.min(CHUNK_MAX as u64) as usize).min(p.len());
                if n == 0 {
                    self.st = self.resume(then);
                    return None;
                }
                let left = left - n as u64;
                self.st = if left == 0 {
                    self.resume(then)
                } else {
                    St::Frame { left, then }
                };
                Some((n, PieceKind::Framing))
            }
            St::XlHeader => {
                if !need(XL_HEADER) {
                    return self.give_up("truncated xl header");
                }
                let le = |at: usize| u32::from_le_bytes(word(p, at));
                if le(32) != 0x0102_0304 {
                    return self.give_up("xl header: foreign byte order");
                }
                let mandatory = le(36);
                if mandatory & !(XL_FLAG_JSON | XL_FLAG_STREAM_V2) != 0
                    || mandatory & XL_FLAG_STREAM_V2 == 0
                {
                    return self.give_up("xl header: unknown mandatory flags or not stream v2");
                }
                let optional = u64::from(le(44));
                if optional > MAX_XL_OPTIONAL {
                    return self.give_up("xl header: optional data too long");
                }
                self.st = St::Frame {
                    left: XL_HEADER as u64 + optional,
                    then: Then::LibxlHeader,
                };
                None
            }
            St::LibxlHeader => {
                if !need(16) {
                    return self.give_up("truncated libxl header");
                }
                let ident = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
                let version = u32::from_be_bytes(word(p, 8));
                let options = u32::from_be_bytes(word(p, 12));
                if ident != LIBXL_IDENT || version != 2 || options & !2 != 0 {
                    return self.give_up("libxl header: unknown ident, version or options");
                }
                self.st = St::Frame {
                    left: 16,
                    then: Then::LibxlRecord,
                };
                None
            }
            St::LibxlRecord => {
                let Some((kind, len)) = record_header(p) else {
                    return self.give_up("truncated libxl record");
                };
                match kind {
                    // END
                    0 if len == 0 => self.frame(8, Then::End),
                    // LIBXC_CONTEXT: the libxc stream follows.
                    1 if len == 0 => self.frame(8, Then::LibxcImageHeader),
                    // EMULATOR_XENSTORE_DATA, EMULATOR_CONTEXT
                    2 | 3 if u64::from(len) <= MAX_RECORD => {
                        self.frame(8 + padded(len), Then::LibxlRecord)
                    }
                    _ => self.give_up("libxl: unknown or checkpoint record"),
                }
            }
            St::LibxcImageHeader => {
                if !need(24) {
                    return self.give_up("truncated libxc image header");
                }
                let marker = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
                let id = u32::from_be_bytes(word(p, 8));
                let version = u32::from_be_bytes(word(p, 12));
                let options = u16::from_be_bytes([p[16], p[17]]);
                if marker != u64::MAX || id != LIBXC_ID || !(2..=3).contains(&version) {
                    return self.give_up("libxc image header: unknown marker, id or version");
                }
                if options & 1 != 0 {
                    return self.give_up("libxc image header: big-endian stream");
                }
                self.st = St::LibxcDomainHeader;
                Some((24, PieceKind::Framing))
            }
            St::LibxcDomainHeader => {
                if !need(16) {
                    return self.give_up("truncated libxc domain header");
                }
                let kind = u32::from_le_bytes(word(p, 0));
                let page_shift = u16::from_le_bytes([p[4], p[5]]);
                if !(1..=4).contains(&kind) || page_shift != 12 {
                    return self.give_up("libxc domain header: unknown type or page_shift != 12");
                }
                self.frame(16, Then::LibxcRecord)
            }
            St::LibxcRecord => {
                let Some((kind, len)) = record_header(p) else {
                    return self.give_up("truncated libxc record");
                };
                if u64::from(len) > MAX_RECORD {
                    return self.give_up("libxc record longer than 128 MiB");
                }
                match kind {
                    // END: back to the libxl stream.
                    0 if len == 0 => self.frame(8, Then::LibxlRecord),
                    1 => self.page_data(p, len),
                    2..=13 | 16..=18 => self.frame(8 + padded(len), Then::LibxcRecord),
                    _ => self.give_up("libxc: unknown or checkpoint record"),
                }
            }
            St::Pages { left } => {
                if !need(PAGE) {
                    return self.give_up("truncated page data");
                }
                self.st = if left > 1 {
                    St::Pages { left: left - 1 }
                } else {
                    St::LibxcRecord
                };
                Some((PAGE, PieceKind::Page))
            }
        }
    }

    /// A `PAGE_DATA` record at `p`: its header and pfn list as one framing piece, then
    /// one page per pfn whose type carries data.
    fn page_data(&mut self, p: &[u8], len: u32) -> Option<(usize, PieceKind)> {
        if len < 8 {
            return self.give_up("PAGE_DATA record too short");
        }
        if p.len() < 16 {
            return self.give_up("truncated PAGE_DATA record");
        }
        let count = u32::from_le_bytes(word(p, 8)) as usize;
        if count == 0 || count > MAX_BATCH {
            return self.give_up("PAGE_DATA: pfn count out of range");
        }
        let head = 16 + 8 * count;
        if p.len() < head {
            return self.give_up("truncated PAGE_DATA pfn list");
        }
        let mut pages = 0u64;
        for i in 0..count {
            let at = 16 + 8 * i;
            let entry = u64::from_le_bytes(p[at..at + 8].try_into().unwrap_or_default());
            match entry >> 60 {
                0..=4 | 9..=12 => pages += 1,
                13..=15 => {}
                _ => return self.give_up("PAGE_DATA: invalid page type"),
            }
        }
        if u64::from(len) != 8 + 8 * count as u64 + PAGE as u64 * pages {
            return self.give_up("PAGE_DATA: length does not match its pages");
        }
        self.st = if pages > 0 {
            St::Pages { left: pages as u32 }
        } else {
            St::LibxcRecord
        };
        Some((head, PieceKind::Framing))
    }

    fn frame(&mut self, left: u64, then: Then) -> Option<(usize, PieceKind)> {
        self.st = St::Frame { left, then };
        None
    }

    fn resume(&mut self, then: Then) -> St {
        match then {
            Then::LibxlHeader => St::LibxlHeader,
            Then::LibxlRecord => St::LibxlRecord,
            Then::LibxcImageHeader => St::LibxcImageHeader,
            Then::LibxcRecord => St::LibxcRecord,
            Then::End => St::End,
        }
    }

    fn cdc(&self, p: &[u8]) -> usize {
        if p.len() >= CHUNK_MAX && is_zero(&p[..CHUNK_MAX]) {
            return CHUNK_MAX;
        }
        let (mask_s, mask_l) = self.masks;
        let (_, n) = v2020::cut(
            p,
            CDC_MIN,
            CDC_AVG,
            CHUNK_MAX,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        n
    }
}

fn word(p: &[u8], at: usize) -> [u8; 4] {
    p.get(at..at + 4)
        .and_then(|w| w.try_into().ok())
        .unwrap_or_default()
}

/// A record header (type, body length), both little-endian.
fn record_header(p: &[u8]) -> Option<(u32, u32)> {
    (p.len() >= 8).then(|| {
        (
            u32::from_le_bytes(word(p, 0)),
            u32::from_le_bytes(word(p, 4)),
        )
    })
}

/// A body length padded to a multiple of 8.
fn padded(len: u32) -> u64 {
    u64::from(len).div_ceil(8) * 8
}

/// Cuts a whole in-memory stream: (offset, length, kind) of every piece.
pub fn cut_all(stream: &[u8]) -> (Vec<(usize, usize, PieceKind)>, Cutter) {
    let mut cutter = Cutter::new();
    let mut out = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let end = stream.len().min(at + LOOKAHEAD);
        let eof = end == stream.len();
        let (n, kind) = cutter.next(&stream[at..end], eof);
        out.push((at, n, kind));
        at += n;
    }
    (out, cutter)
}
