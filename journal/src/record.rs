//! Record framing for every value the journal stores.
//!
//! ```text
//! offset  size  field
//! 0       3     magic  b"DSJ"
//! 3       1     format version (VERSION)
//! 4       4     CRC-32 (crc32fast, IEEE) of the payload, little-endian
//! 8       ..    payload: bincode 1.3.3, fixed-width little-endian integers, ≤ MAX_PAYLOAD
//! ```
//!
//! The same framing holds events, catalog entries and index values, so a flipped bit
//! anywhere is reported as [`Error::Corruption`] with the key it was found under, never
//! decoded into a wrong value.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// The record magic.
pub const MAGIC: &[u8; 3] = b"DSJ";
/// The format version written by this build.
pub const VERSION: u8 = 1;
/// Largest payload accepted (a memory image manifest of a 256 GiB domain fits).
pub const MAX_PAYLOAD: u64 = 256 << 20;
const HEADER: usize = 8;

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_PAYLOAD)
}

/// Frames `value` as a record.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let payload = codec()
        .serialize(value)
        .map_err(|e| Error::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks and decodes a record; `what` names where it was read from, for errors.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: impl Fn() -> String) -> Result<T> {
    let corrupt = |why: &str| Error::Corruption {
        what: what(),
        why: why.to_string(),
    };
    if bytes.len() < HEADER || &bytes[..3] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    if bytes[3] != VERSION {
        return Err(corrupt(&format!("unknown record version {}", bytes[3])));
    }
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let payload = &bytes[HEADER..];
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    codec()
        .deserialize(payload)
        .map_err(|e| corrupt(&format!("undecodable payload: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::event::*;

    fn sample_events() -> Vec<Event> {
        let meta = SnapshotMeta {
            domain: "web01".into(),
            name: "before-upgrade".into(),
            parent: Some("base".into()),
            kind: SnapshotKind::Checkpoint,
            created: 1_700_000_000_000,
            op: 7,
            domain_state: DomainState::Running,
            memory_image: Some("ab".repeat(32)),
            memory_bytes: 64 << 20,
            disks: vec![DiskSnapshot {
                target: "xvda".into(),
                path: "/var/lib/xvda.qcow2".into(),
                tag: "before-upgrade@7".into(),
                external: false,
            }],
            description: Some("pre".into()),
            crash_consistent: false,
        };
        vec![
            Event::OpBegun(OpBegun {
                op: 7,
                at: 1,
                kind: OpKind::Create,
                domain: "web01".into(),
                snapshot: "before-upgrade".into(),
                user: "root".into(),
                pid: 42,
                host: "sim".into(),
                prior_state: DomainState::Running,
                steps: vec!["save-memory".into(), "snapshot-disk:xvda".into()],
                params: OpParams {
                    snapshot: Some(meta.clone()),
                    ..OpParams::default()
                },
            }),
            Event::StepBegun {
                op: 7,
                step: "save-memory".into(),
                at: 2,
            },
            Event::StepDone {
                op: 7,
                step: "save-memory".into(),
                at: 3,
                detail: StepDetail {
                    bytes_read: Some(1),
                    bytes_new: Some(0),
                    image: Some("cd".into()),
                    note: None,
                },
            },
            Event::StepFailed {
                op: 7,
                step: "x".into(),
                at: 4,
                error: "boom".into(),
            },
            Event::RecoveryDecided {
                op: 7,
                at: 5,
                decision: Decision::Forward,
                reason: "all data steps done".into(),
            },
            Event::OpCommitted {
                op: 7,
                at: 6,
                change: CatalogChange::Created(meta.clone()),
            },
            Event::OpCommitted {
                op: 10,
                at: 9,
                change: CatalogChange::Adopted {
                    snapshots: vec![meta],
                    current: None,
                },
            },
            Event::OpRolledBack {
                op: 8,
                at: 7,
                reason: "r".into(),
            },
            Event::OpFailed {
                op: 9,
                at: 8,
                error: "e".into(),
            },
            Event::OpNoted {
                op: 10,
                at: 9,
                note: OpNote::Instance {
                    step: Some("restore-memory".into()),
                    instance: 42,
                },
            },
            Event::OpNoted {
                op: 10,
                at: 9,
                note: OpNote::DomainSpec {
                    memory_bytes: 64 << 20,
                    disk_sizes: vec![1 << 30],
                    workload: Some("idle".into()),
                },
            },
            Event::OpNeedsRecovery {
                op: 10,
                at: 10,
                error: "restore failed".into(),
            },
            Event::OpCommitted {
                op: 11,
                at: 11,
                change: CatalogChange::Unchanged,
            },
        ]
    }

    #[test]
    fn every_event_round_trips() {
        for event in sample_events() {
            let bytes = encode(&event).unwrap();
            let back: Event = decode(&bytes, || "test".into()).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn projections_round_trip() {
        use crate::catalog::DomainCatalog;
        use crate::store::{OpSummary, Outcome};
        let mut catalog = DomainCatalog::default();
        for e in sample_events() {
            if let Event::OpCommitted { change, .. } = &e {
                catalog.apply(change);
            }
        }
        assert_eq!(catalog.snapshots.len(), 1);
        let back: DomainCatalog = decode(&encode(&catalog).unwrap(), || "t".into()).unwrap();
        assert_eq!(back, catalog);
        let summary = OpSummary {
            op: 7,
            kind: OpKind::Revert,
            domain: "web01".into(),
            snapshot: "s".into(),
            started: 1,
            ended: Some(2),
            outcome: Outcome::RolledForward,
            recovered_forward: true,
        };
        let back: OpSummary = decode(&encode(&summary).unwrap(), || "t".into()).unwrap();
        assert_eq!(back, summary);
    }

    #[test]
    fn any_flipped_bit_is_corruption() {
        let bytes = encode(&sample_events()[0]).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                let r: Result<Event> = decode(&bad, || format!("byte {i}"));
                assert!(
                    matches!(r, Err(Error::Corruption { .. })),
                    "flip at byte {i} bit {bit} not caught"
                );
            }
        }
    }

    #[test]
    fn truncated_record_is_corruption() {
        let bytes = encode(&sample_events()[2]).unwrap();
        for len in 0..bytes.len() {
            let r: Result<Event> = decode(&bytes[..len], || "t".into());
            assert!(matches!(r, Err(Error::Corruption { .. })), "len {len}");
        }
    }

    #[test]
    fn layout_is_pinned() {
        // The on-disk format must not drift with a dependency update.
        let bytes = encode(&Event::StepBegun {
            op: 1,
            step: "a".into(),
            at: 2,
        })
        .unwrap();
        assert_eq!(&bytes[..4], b"DSJ\x01");
        assert_eq!(
            &bytes[8..],
            &[
                1, 0, 0, 0, // variant StepBegun
                1, 0, 0, 0, 0, 0, 0, 0, // op
                1, 0, 0, 0, 0, 0, 0, 0, b'a', // step
                2, 0, 0, 0, 0, 0, 0, 0, // at
            ]
        );
    }
}
