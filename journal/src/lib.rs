//! domsnap's journal: an append-only log of every operation and step, in RocksDB.
//!
//! - [`event`]: the event schema (what is recorded).
//! - [`record`]: how each value is framed on disk (magic, version, CRC-32, bincode).
//! - [`catalog`]: the snapshot catalog, a projection of the events.
//! - [`identity`]: the state directory's id, and the writer lock.
//! - [`store`]: the database, its column families, atomic synced batches, queries,
//!   verification and rebuild of the projections.
//!
//! No RocksDB type leaves this crate.
#![warn(missing_docs)]

pub mod catalog;
mod error;
pub mod event;
pub mod identity;
pub mod record;
pub mod store;

pub use catalog::{Catalog, DomainCatalog};
pub use error::{Error, Result};
pub use event::*;
pub use identity::{JournalIdentity, StateId, WriterLock};
pub use store::{Batch, Journal, Mode, OpSummary, Outcome, Table};
