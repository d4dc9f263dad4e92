//! Export bundles: a snapshot of a domain — its catalog entry, its memory image and every
//! disk's content at the snapshot — as objects in any [`store::ObjectStore`] (a directory,
//! a Ceph pool, an S3 bucket), so that another host can import it and revert to it.
//!
//! # Layout
//!
//! ```text
//! bundles/<domain>/<snapshot>   descriptor: "domsnap-bundle 1 <BLAKE3 of body>\n" + JSON
//!                               (catalog entry, memory part, disk parts, manifest names)
//! manifests/<BLAKE3>            a memory image in 4 KiB pages, or a disk in clusters:
//!                               unit index → chunk hash; units not listed are zeros
//! packs/<BLAKE3>                chunks (pages, clusters) back to back, about 32 MiB
//! index/<BLAKE3>                where the chunks of one export lie: chunk → pack, offset, length
//! ```
//!
//! Every object but the descriptor is named by the BLAKE3 hash of its content, and every
//! chunk is named (in the manifests and indexes) by the hash of its bytes, so everything a
//! bundle holds can be verified. The descriptor carries a checksum of its body and a format
//! version (`format::VERSION`); a reader refuses versions it does not know.
//!
//! # Incremental, shared
//!
//! Several bundles share one destination: an export first reads the destination's indexes
//! and sends only chunks that no pack there holds yet (a second checkpoint of a domain whose
//! memory changed a little sends little; domains cloned from one template share pages).
//!
//! # Crash safety
//!
//! An export writes packs, flushes, then its index, flushes, then the manifests, flushes,
//! and last replaces the descriptor (durable when it returns): a bundle is visible only
//! once everything it names is durable. An interrupted export leaves at most packs (and an
//! index) no descriptor names; an earlier bundle of the same snapshot stays whole. Import
//! ([`open`]) checks the whole bundle — descriptor, manifests, presence and length of every
//! chunk's pack — before the caller changes anything, and every chunk is verified against
//! its hash as it is read.
#![warn(missing_docs)]

mod error;
mod export;
pub mod format;
mod import;

pub use error::{Error, Result};
pub use export::{export, DiskSource, ExportReport, PACK_TARGET, PAGE};
pub use format::{Descriptor, DiskPart, MemoryPart, SnapshotInfo};
pub use import::{list, open, Bundle};

/// The descriptor object of a domain's snapshot; domain and snapshot names must be object
/// name components (domsnap's names always are).
pub fn descriptor_name(domain: &str, snapshot: &str) -> Result<String> {
    for n in [domain, snapshot] {
        if n.contains('/') {
            return Err(Error::Invalid(format!(
                "{n:?} cannot name a bundle: it holds '/'"
            )));
        }
    }
    let name = format!("bundles/{domain}/{snapshot}");
    store::check_name(&name)
        .map_err(|e| Error::Invalid(format!("{domain}/{snapshot} cannot name a bundle: {e}")))?;
    Ok(name)
}
