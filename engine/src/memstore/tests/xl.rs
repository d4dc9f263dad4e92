//! Synthetic `xl save` streams, built to the format of Xen 4.17's writers (`xl` header,
//! libxl stream, libxc stream), for the parser's tests.

use super::super::cut::XL_MAGIC;
use super::super::format::PAGE;

/// Pfns per stream (of ≥ 1537 pages) that are XTAB (no data): 512 and 1536.
pub const XTAB_PER_STREAM: usize = 2;

fn record(out: &mut Vec<u8>, kind: u32, body: &[u8]) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.extend(std::iter::repeat_n(
        0u8,
        body.len().next_multiple_of(8) - body.len(),
    ));
}

/// A PV domain's save stream of `memory` (whole pages), its config `config`; `generation`
/// changes the small per-save records (TSC, vCPU context, the emulator blob).
pub fn stream(memory: &[u8], config: &str, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(memory.len() + memory.len() / 256 + 4096);
    // xl header: magic, byte order, mandatory flags (STREAMv2 | JSON), optional flags,
    // optional data length, then the optional data: config length and the config.
    let mut cfg = config.as_bytes().to_vec();
    cfg.push(0);
    out.extend_from_slice(XL_MAGIC);
    out.extend_from_slice(&0x0102_0304u32.to_le_bytes());
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(4 + cfg.len() as u32).to_le_bytes());
    out.extend_from_slice(&(cfg.len() as u32).to_le_bytes());
    out.extend_from_slice(&cfg);
    // libxl stream header and LIBXC_CONTEXT.
    out.extend_from_slice(b"LibxlFmt");
    out.extend_from_slice(&2u32.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    record(&mut out, 1, &[]);
    // libxc image header (big-endian) and domain header.
    out.extend_from_slice(&[0xff; 8]);
    out.extend_from_slice(b"XENF");
    out.extend_from_slice(&3u32.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&[0u8; 6]);
    out.extend_from_slice(&1u32.to_le_bytes()); // x86 PV
    out.extend_from_slice(&12u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&17u32.to_le_bytes());
    record(&mut out, 2, &[8, 0, 0, 0, 3, 0, 0, 0]); // X86_PV_INFO
    record(&mut out, 17, &[0x11; 48]); // X86_CPUID_POLICY
    record(&mut out, 16, &[]); // STATIC_DATA_END
                               // PAGE_DATA in batches of 1024 pfns; pfns 512 and 1536 are XTAB (no data).
    let pages = memory.len() / PAGE;
    for first in (0..pages).step_by(1024) {
        let last = (first + 1024).min(pages);
        let mut body = Vec::new();
        body.extend_from_slice(&((last - first) as u32).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        let xtab = |pfn: usize| pfn == 512 || pfn == 1536;
        for pfn in first..last {
            let kind: u64 = if xtab(pfn) { 0xF } else { 0 };
            body.extend_from_slice(&((kind << 60) | pfn as u64).to_le_bytes());
        }
        for pfn in (first..last).filter(|p| !xtab(*p)) {
            body.extend_from_slice(&memory[pfn * PAGE..(pfn + 1) * PAGE]);
        }
        record(&mut out, 1, &body);
    }
    record(&mut out, 8, &[generation as u8; 24]); // X86_TSC_INFO
    record(&mut out, 7, &vec![generation as u8; PAGE]); // SHARED_INFO
    record(&mut out, 4, &[generation as u8 ^ 0x5a; 200]); // X86_PV_VCPU_BASIC
    record(&mut out, 0, &[]); // libxc END
    let mut emu = vec![0x42u8; 1021];
    emu[0] = generation as u8;
    record(&mut out, 3, &emu); // EMULATOR_CONTEXT
    record(&mut out, 0, &[]); // libxl END
    out
}
