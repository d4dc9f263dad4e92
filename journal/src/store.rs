//! The journal's RocksDB database.
//!
//! Column families (every value is a [`crate::record`]):
//!
//! | family      | key                               | value                         |
//! |-------------|-----------------------------------|-------------------------------|
//! | `events`    | seq (u64 BE)                      | [`Event`]                     |
//! | `by_op`     | op (u64 BE) + seq (u64 BE)        | empty                         |
//! | `by_domain` | domain + 0x00 + seq (u64 BE)      | empty                         |
//! | `ops`       | op (u64 BE)                       | [`OpSummary`]                 |
//! | `open_ops`  | op (u64 BE)                       | empty                         |
//! | `catalog`   | domain                            | [`DomainCatalog`]             |
//! | `meta`      | `format`                          | u32 format version            |
//! | `meta`      | `identity`                        | [`JournalIdentity`]           |
//! | `chunks`, `images`, `packs` | owned by the memory image store ([`Table`]) |  |
//!
//! Events are only ever appended. The projections (`by_op`, `by_domain`, `ops`, `open_ops`,
//! `catalog`) and the store's tables are updated in the same `WriteBatch` as the events
//! that change them, written with `sync = true`: after a crash they agree with the log.
//! [`Journal::verify`] recomputes them from the events and reports any difference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

use rocksdb::{
    ColumnFamilyDescriptor, Direction, InfoLogger, IteratorMode, LogLevel, Options, WriteBatch,
    WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, DomainCatalog};
use crate::error::{Error, Result};
use crate::event::{Decision, Event, Millis, OpBegun, OpId, OpKind, Seq};
use crate::identity::{JournalIdentity, WriterLock};
use crate::record;

const FORMAT: u32 = 1;

const CF_EVENTS: &str = "events";
const CF_BY_OP: &str = "by_op";
const CF_BY_DOMAIN: &str = "by_domain";
const CF_OPS: &str = "ops";
const CF_OPEN: &str = "open_ops";
const CF_CATALOG: &str = "catalog";
const CF_META: &str = "meta";

const META_FORMAT: &[u8] = b"format";
const META_IDENTITY: &[u8] = b"identity";

/// Tables the journal keeps for the engine's memory image store. Their updates go in the
/// same batch as the events that justify them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Chunk hash → location and reference count.
    Chunks,
    /// Image id → chunk list and reference count.
    Images,
    /// Pack file id → pack state.
    Packs,
}

impl Table {
    fn cf(self) -> &'static str {
        match self {
            Table::Chunks => "chunks",
            Table::Images => "images",
            Table::Packs => "packs",
        }
    }
}

const ALL_CFS: [&str; 10] = [
    CF_EVENTS,
    CF_BY_OP,
    CF_BY_DOMAIN,
    CF_OPS,
    CF_OPEN,
    CF_CATALOG,
    CF_META,
    "chunks",
    "images",
    "packs",
];

/// How an operation ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Still open: running now, or interrupted and waiting for recovery.
    Open,
    /// Finished normally.
    Committed,
    /// Undone (by itself after an error, or by recovery).
    RolledBack,
    /// Interrupted, then finished by recovery.
    RolledForward,
    /// Abandoned: could neither finish nor be undone.
    Failed,
    /// Still open, and left alone by automatic recovery: only `domsnap recover` continues
    /// it (a failure past a revert's point of no return, a failed recovery).
    NeedsRecovery,
}

impl Outcome {
    /// Whether the operation has not ended ([`Outcome::Open`] or [`Outcome::NeedsRecovery`]).
    pub fn is_open(self) -> bool {
        matches!(self, Outcome::Open | Outcome::NeedsRecovery)
    }

    /// The name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Open => "open",
            Outcome::Committed => "committed",
            Outcome::RolledBack => "rolled-back",
            Outcome::RolledForward => "rolled-forward",
            Outcome::Failed => "failed",
            Outcome::NeedsRecovery => "needs-recovery",
        }
    }
}

/// The `ops` projection: one line of history per operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpSummary {
    /// Operation id.
    pub op: OpId,
    /// Kind.
    pub kind: OpKind,
    /// Domain.
    pub domain: String,
    /// Snapshot.
    pub snapshot: String,
    /// Began.
    pub started: Millis,
    /// Ended, if it has.
    pub ended: Option<Millis>,
    /// How it ended.
    pub outcome: Outcome,
    /// Whether recovery decided to roll it forward.
    pub recovered_forward: bool,
}

impl OpSummary {
    fn begun(b: &OpBegun) -> OpSummary {
        OpSummary {
            op: b.op,
            kind: b.kind,
            domain: b.domain.clone(),
            snapshot: b.snapshot.clone(),
            started: b.at,
            ended: None,
            outcome: Outcome::Open,
            recovered_forward: false,
        }
    }

    /// Updates the summary with a later event of the same operation.
    fn apply(&mut self, event: &Event) {
        match event {
            Event::RecoveryDecided { decision, .. } => {
                self.recovered_forward = *decision == Decision::Forward;
            }
            Event::OpCommitted { at, .. } => {
                self.ended = Some(*at);
                self.outcome = if self.recovered_forward {
                    Outcome::RolledForward
                } else {
                    Outcome::Committed
                };
            }
            Event::OpRolledBack { at, .. } => {
                self.ended = Some(*at);
                self.outcome = Outcome::RolledBack;
            }
            Event::OpFailed { at, .. } => {
                self.ended = Some(*at);
                self.outcome = Outcome::Failed;
            }
            Event::OpNeedsRecovery { .. } => self.outcome = Outcome::NeedsRecovery,
            _ => {}
        }
    }
}

/// Events plus table updates that commit together, atomically and durably.
#[derive(Debug, Default)]
pub struct Batch {
    events: Vec<Event>,
    puts: Vec<(Table, Vec<u8>, Vec<u8>)>,
    deletes: Vec<(Table, Vec<u8>)>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Appends an event.
    pub fn event(&mut self, event: Event) -> &mut Batch {
        self.events.push(event);
        self
    }

    /// Sets `key` in `table` to the record encoding of `value`.
    pub fn put<T: Serialize>(&mut self, table: Table, key: &[u8], value: &T) -> Result<&mut Batch> {
        self.puts
            .push((table, key.to_vec(), record::encode(value)?));
        Ok(self)
    }

    /// Removes `key` from `table`.
    pub fn delete(&mut self, table: Table, key: &[u8]) -> &mut Batch {
        self.deletes.push((table, key.to_vec()));
        self
    }

    /// Bytes of keys and values of its table updates (what it adds to the journal besides
    /// its events), for measurements.
    pub fn table_bytes(&self) -> u64 {
        let puts: usize = self.puts.iter().map(|(_, k, v)| k.len() + v.len()).sum();
        let deletes: usize = self.deletes.iter().map(|(_, k)| k.len()).sum();
        (puts + deletes) as u64
    }

    /// Moves everything of `other` into this batch.
    pub fn extend(&mut self, other: Batch) -> &mut Batch {
        self.events.extend(other.events);
        self.puts.extend(other.puts);
        self.deletes.extend(other.deletes);
        self
    }
}

/// How to open the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The one writer; fails with [`Error::Busy`] while another process holds it.
    Primary,
    /// A reader that works beside a writer in another process; sees what was committed
    /// when it opened.
    ReadOnly,
}

/// The journal database.
pub struct Journal {
    db: DB,
    path: PathBuf,
    mode: Mode,
    identity: Option<JournalIdentity>,
    next_seq: Seq,
    /// Held by a writer for as long as it is open; dropped after `db` (declared after it).
    _lock: Option<WriterLock>,
    /// The private directory of an [empty](Journal::empty) journal, removed after `db`.
    _scratch: Option<Scratch>,
}

/// A private temporary directory, removed when dropped.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field("identity", &self.identity)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

fn db_err(op: &'static str) -> impl Fn(rocksdb::Error) -> Error {
    move |e| Error::Db {
        op,
        message: e.into_string(),
    }
}

/// How often a read-only open is tried before its error is reported.
const READ_ONLY_ATTEMPTS: u32 = 20;

/// The manifest `CURRENT` names in the database `path`, and its length: what changes with
/// every change of the database's set of files.
fn manifest_state(path: &Path) -> Option<(String, u64)> {
    let current = std::fs::read_to_string(path.join("CURRENT")).ok()?;
    let name = current.trim_end().to_string();
    let len = std::fs::metadata(path.join(&name)).ok()?.len();
    Some((name, len))
}

fn writer_options(create: bool) -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(create);
    opts.create_missing_column_families(true);
    opts.set_keep_log_file_num(4);
    opts.set_max_log_file_size(1 << 20);
    opts
}

fn cf_descriptors() -> impl Iterator<Item = ColumnFamilyDescriptor> {
    ALL_CFS
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()))
}

/// Creates `path` mode 0700 (whatever the umask) if needed, and fsyncs its parent.
fn make_private_dir(path: &Path) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if !path.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|source| Error::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn domain_key(domain: &str, seq: Seq) -> Vec<u8> {
    let mut k = Vec::with_capacity(domain.len() + 9);
    k.extend_from_slice(domain.as_bytes());
    k.push(0);
    k.extend_from_slice(&be(seq));
    k
}

fn seq_of(key: &[u8], what: &str) -> Result<u64> {
    let tail: [u8; 8] = key
        .get(key.len().saturating_sub(8)..)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| Error::Corruption {
            what: what.to_string(),
            why: "short key".into(),
        })?;
    Ok(u64::from_be_bytes(tail))
}

impl Journal {
    /// Opens the journal in directory `path`, for tests and tools that own their directory:
    /// [`Mode::Primary`] takes the [`WriterLock`] and opens the journal, creating it with a
    /// [fresh](JournalIdentity::fresh) identity if there is none; [`Mode::ReadOnly`] is
    /// [`Journal::open_read_only`]. Engines decide themselves whether a missing journal may
    /// be created: [`Journal::exists`], [`Journal::open_writer`], [`Journal::create`].
    pub fn open(path: &Path, mode: Mode) -> Result<Journal> {
        match mode {
            Mode::ReadOnly => Journal::open_read_only(path),
            Mode::Primary => {
                let lock = WriterLock::acquire(path)?;
                if Journal::exists(path) {
                    Journal::open_writer(path, lock)
                } else {
                    Journal::create(path, lock, JournalIdentity::fresh()?)
                }
            }
        }
    }

    /// Whether directory `path` holds a journal (a RocksDB database: its `CURRENT` file).
    pub fn exists(path: &Path) -> bool {
        path.join("CURRENT").is_file()
    }

    /// Opens the existing journal in `path` for writing, holding `lock` (taken on this
    /// `path`) for as long as it is open. [`Error::Missing`] if there is no journal.
    pub fn open_writer(path: &Path, lock: WriterLock) -> Result<Journal> {
        if !Journal::exists(path) {
            return Err(Error::Missing(path.to_path_buf()));
        }
        let opts = writer_options(false);
        let db = DB::open_cf_descriptors(&opts, path, cf_descriptors()).map_err(db_err("open"))?;
        Journal::with_db(db, path, Mode::Primary, Some(lock))
    }

    /// Creates a new journal in `path` (the directory is created mode 0700 if needed) that
    /// belongs to `identity`, holding `lock` (taken on this `path`). [`Error::Exists`] if
    /// `path` holds a journal already. The identity and the format version are written in
    /// one synced batch before this returns.
    pub fn create(path: &Path, lock: WriterLock, identity: JournalIdentity) -> Result<Journal> {
        if Journal::exists(path) {
            return Err(Error::Exists(path.to_path_buf()));
        }
        if identity.first_seq == 0 {
            return Err(Error::Encode(
                "a journal's first sequence number is 1 or more".into(),
            ));
        }
        make_private_dir(path)?;
        let opts = writer_options(true);
        let db =
            DB::open_cf_descriptors(&opts, path, cf_descriptors()).map_err(db_err("create"))?;
        let mut wb = WriteBatch::default();
        let meta = db.cf_handle(CF_META).ok_or_else(|| Error::Db {
            op: "create",
            message: format!("column family {CF_META} missing"),
        })?;
        wb.put_cf(meta, META_FORMAT, record::encode(&FORMAT)?);
        wb.put_cf(meta, META_IDENTITY, record::encode(&identity)?);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(wb, &wo).map_err(db_err("create"))?;
        Journal::with_db(db, path, Mode::Primary, Some(lock))
    }

    /// Opens the journal in `path` read-only: beside a writer in another process, on a
    /// read-only file system, seeing what was committed when it opened. Nothing is written
    /// in `path`: no lock file, and RocksDB's info log goes nowhere. [`Error::Missing`] if
    /// there is no journal.
    pub fn open_read_only(path: &Path) -> Result<Journal> {
        if !Journal::exists(path) {
            return Err(Error::Missing(path.to_path_buf()));
        }
        let mut opts = Options::default();
        opts.set_info_logger(InfoLogger::new_callback_logger(LogLevel::Fatal, |_, _| {}));
        // A writer that opens (recovering its predecessor's log into a table file) or
        // flushes writes a manifest edit and then deletes the files it made obsolete. A
        // read-only open that read the manifest before the edit and lists the files after
        // the deletion would silently miss committed events, or fail to find a file. So a
        // view is kept only if the manifest did not change while it was being opened.
        let mut attempts = 0;
        let db = loop {
            attempts += 1;
            let before = manifest_state(path);
            match DB::open_cf_for_read_only(&opts, path, ALL_CFS, false) {
                Ok(db) if before.is_some() && manifest_state(path) == before => break db,
                Ok(_) if attempts < READ_ONLY_ATTEMPTS => {}
                Ok(_) => {
                    return Err(Error::Db {
                        op: "open read-only",
                        message: format!(
                        "the journal's manifest kept changing while it was read ({attempts} tries)"
                    ),
                    })
                }
                Err(e) if attempts < READ_ONLY_ATTEMPTS => {
                    // The same race, seen as a file that is gone; a real error stays.
                    let _ = e;
                }
                Err(e) => return Err(db_err("open read-only")(e)),
            }
            std::thread::sleep(std::time::Duration::from_millis(10 * u64::from(attempts)));
        };
        Journal::with_db(db, path, Mode::ReadOnly, None)
    }

    /// A journal with no events and no identity, read-only, for readers of a state
    /// directory that has none yet. It lives in a private temporary directory (mode 0700,
    /// under `$TMPDIR` or `/tmp`) that is removed when it is dropped.
    pub fn empty() -> Result<Journal> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("domsnap-empty-journal-{}-{n}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| Error::Io {
                path: dir.clone(),
                source,
            })?;
        let scratch = Scratch(dir.clone());
        let mut opts = writer_options(true);
        opts.set_info_logger(InfoLogger::new_callback_logger(LogLevel::Fatal, |_, _| {}));
        let db = DB::open_cf_descriptors(&opts, &dir, cf_descriptors()).map_err(db_err("open"))?;
        let mut journal = Journal::with_db(db, &dir, Mode::ReadOnly, None)?;
        journal._scratch = Some(scratch);
        Ok(journal)
    }

    fn with_db(db: DB, path: &Path, mode: Mode, lock: Option<WriterLock>) -> Result<Journal> {
        let mut journal = Journal {
            db,
            path: path.to_path_buf(),
            mode,
            identity: None,
            next_seq: 1,
            _lock: lock,
            _scratch: None,
        };
        journal.check_format()?;
        journal.identity = journal.read_identity()?;
        let first = journal.identity.map_or(1, |i| i.first_seq);
        journal.next_seq = journal.last_seq()?.max(first - 1) + 1;
        Ok(journal)
    }

    fn read_identity(&self) -> Result<Option<JournalIdentity>> {
        let meta = self.cf(CF_META)?;
        self.db
            .get_cf(meta, META_IDENTITY)
            .map_err(db_err("read"))?
            .map(|bytes| record::decode(&bytes, || "meta/identity".into()))
            .transpose()
    }

    /// Closes the journal and hands back its writer lock (if it was opened for writing), so
    /// the caller can keep others out while it moves the database.
    pub fn close(mut self) -> Option<WriterLock> {
        let lock = self._lock.take();
        drop(self);
        lock
    }

    /// Whose journal this is, and its first sequence number; `None` for a journal written
    /// before journals recorded it (see [`Journal::set_identity`]).
    pub fn identity(&self) -> Option<JournalIdentity> {
        self.identity
    }

    /// Records the identity of a journal that has none yet (one written before journals
    /// recorded it). Refused if it has one: a journal's identity never changes.
    pub fn set_identity(&mut self, identity: JournalIdentity) -> Result<()> {
        if self.mode != Mode::Primary {
            return Err(Error::ReadOnly);
        }
        if let Some(had) = self.identity {
            return Err(Error::Corruption {
                what: "meta/identity".into(),
                why: format!("the journal belongs to state {} already", had.state),
            });
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_cf_opt(
                self.cf(CF_META)?,
                META_IDENTITY,
                record::encode(&identity)?,
                &wo,
            )
            .map_err(db_err("write"))?;
        self.identity = Some(identity);
        self.next_seq = self.next_seq.max(identity.first_seq);
        Ok(())
    }

    fn check_format(&mut self) -> Result<()> {
        let meta = self.cf(CF_META)?;
        match self.db.get_cf(meta, META_FORMAT).map_err(db_err("read"))? {
            Some(bytes) => {
                let found: u32 = record::decode(&bytes, || "meta/format".into())?;
                if found != FORMAT {
                    return Err(Error::Version {
                        found,
                        supported: FORMAT,
                    });
                }
            }
            None if self.mode == Mode::Primary => {
                let mut opts = WriteOptions::default();
                opts.set_sync(true);
                self.db
                    .put_cf_opt(meta, META_FORMAT, record::encode(&FORMAT)?, &opts)
                    .map_err(db_err("write"))?;
            }
            None => {}
        }
        Ok(())
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or_else(|| Error::Db {
            op: "open",
            message: format!("column family {name} missing"),
        })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How it was opened.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Sequence number of the last event (0 if none).
    pub fn last_seq(&self) -> Result<Seq> {
        let mut it = self.db.iterator_cf(self.cf(CF_EVENTS)?, IteratorMode::End);
        match it.next() {
            Some(item) => {
                let (key, _) = item.map_err(db_err("read"))?;
                seq_of(&key, "events")
            }
            None => Ok(0),
        }
    }

    /// Appends one event on its own; returns its sequence number.
    pub fn append(&mut self, event: Event) -> Result<Seq> {
        let mut batch = Batch::new();
        batch.event(event);
        Ok(self.commit(batch)?[0])
    }

    /// Writes the batch atomically with `sync = true`; returns the events' sequence numbers.
    /// An [`Event::OpBegun`] must carry `op` = the sequence number it gets: use
    /// [`Journal::next_seq`] to learn it.
    pub fn commit(&mut self, batch: Batch) -> Result<Vec<Seq>> {
        if self.mode != Mode::Primary {
            return Err(Error::ReadOnly);
        }
        let mut wb = WriteBatch::default();
        let mut seqs = Vec::with_capacity(batch.events.len());
        let mut summaries: BTreeMap<OpId, OpSummary> = BTreeMap::new();
        let mut catalogs: BTreeMap<String, DomainCatalog> = BTreeMap::new();
        let mut seq = self.next_seq;
        for event in &batch.events {
            let op = event.op();
            if let Event::OpBegun(b) = event {
                if b.op != seq {
                    return Err(Error::Encode(format!(
                        "OpBegun carries op {} but gets sequence {seq}",
                        b.op
                    )));
                }
                summaries.insert(op, OpSummary::begun(b));
                wb.put_cf(self.cf(CF_OPEN)?, be(op), []);
            }
            let summary = match summaries.entry(op) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let stored = self.op(op)?.ok_or_else(|| {
                        Error::Encode(format!("event for unknown operation {op}"))
                    })?;
                    e.insert(stored)
                }
            };
            summary.apply(event);
            if event.is_end() {
                wb.delete_cf(self.cf(CF_OPEN)?, be(op));
            }
            if let Event::OpCommitted { change, .. } = event {
                let domain = summary.domain.clone();
                if !catalogs.contains_key(&domain) {
                    let current = self.domain_catalog(&domain)?;
                    catalogs.insert(domain.clone(), current);
                }
                if let Some(c) = catalogs.get_mut(&domain) {
                    c.apply(change);
                }
            }
            wb.put_cf(self.cf(CF_EVENTS)?, be(seq), record::encode(event)?);
            let mut by_op = be(op).to_vec();
            by_op.extend_from_slice(&be(seq));
            wb.put_cf(self.cf(CF_BY_OP)?, by_op, []);
            wb.put_cf(self.cf(CF_BY_DOMAIN)?, domain_key(&summary.domain, seq), []);
            seqs.push(seq);
            seq += 1;
        }
        for (op, summary) in &summaries {
            wb.put_cf(self.cf(CF_OPS)?, be(*op), record::encode(summary)?);
        }
        for (domain, catalog) in &catalogs {
            wb.put_cf(
                self.cf(CF_CATALOG)?,
                domain.as_bytes(),
                record::encode(catalog)?,
            );
        }
        for (table, key, value) in batch.puts {
            wb.put_cf(self.cf(table.cf())?, key, value);
        }
        for (table, key) in batch.deletes {
            wb.delete_cf(self.cf(table.cf())?, key);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(wb, &opts).map_err(db_err("write"))?;
        self.next_seq = seq;
        Ok(seqs)
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// One event.
    pub fn event(&self, seq: Seq) -> Result<Option<Event>> {
        let bytes = self
            .db
            .get_cf(self.cf(CF_EVENTS)?, be(seq))
            .map_err(db_err("read"))?;
        bytes
            .map(|b| record::decode(&b, || format!("events/{seq}")))
            .transpose()
    }

    /// Every event, in order.
    pub fn events(&self) -> Result<Vec<(Seq, Event)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_EVENTS)?, IteratorMode::Start)
        {
            let (key, value) = item.map_err(db_err("read"))?;
            let seq = seq_of(&key, "events")?;
            out.push((seq, record::decode(&value, || format!("events/{seq}"))?));
        }
        Ok(out)
    }

    /// The events of one operation, in order.
    pub fn op_events(&self, op: OpId) -> Result<Vec<Event>> {
        let prefix = be(op);
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_BY_OP)?,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in it {
            let (key, _) = item.map_err(db_err("read"))?;
            if !key.starts_with(&prefix) {
                break;
            }
            let seq = seq_of(&key, "by_op")?;
            let event = self.event(seq)?.ok_or_else(|| Error::Corruption {
                what: format!("by_op/{op}/{seq}"),
                why: "names a missing event".into(),
            })?;
            out.push(event);
        }
        Ok(out)
    }

    /// The summary of one operation.
    pub fn op(&self, op: OpId) -> Result<Option<OpSummary>> {
        let bytes = self
            .db
            .get_cf(self.cf(CF_OPS)?, be(op))
            .map_err(db_err("read"))?;
        bytes
            .map(|b| record::decode(&b, || format!("ops/{op}")))
            .transpose()
    }

    /// Every operation's summary, oldest first.
    pub fn ops(&self) -> Result<Vec<OpSummary>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_OPS)?, IteratorMode::Start) {
            let (key, value) = item.map_err(db_err("read"))?;
            out.push(record::decode(&value, || format!("ops/{key:?}"))?);
        }
        Ok(out)
    }

    /// Operations that began and have not ended, oldest first.
    pub fn open_ops(&self) -> Result<Vec<OpId>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_OPEN)?, IteratorMode::Start) {
            let (key, _) = item.map_err(db_err("read"))?;
            out.push(seq_of(&key, "open_ops")?);
        }
        Ok(out)
    }

    /// Sequence numbers of the events about `domain`, in order.
    pub fn domain_seqs(&self, domain: &str) -> Result<Vec<Seq>> {
        let mut prefix = domain.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_BY_DOMAIN)?,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in it {
            let (key, _) = item.map_err(db_err("read"))?;
            if !key.starts_with(&prefix) || key.len() != prefix.len() + 8 {
                break;
            }
            out.push(seq_of(&key, "by_domain")?);
        }
        Ok(out)
    }

    /// One domain's catalog (empty if it has none).
    pub fn domain_catalog(&self, domain: &str) -> Result<DomainCatalog> {
        let bytes = self
            .db
            .get_cf(self.cf(CF_CATALOG)?, domain.as_bytes())
            .map_err(db_err("read"))?;
        Ok(bytes
            .map(|b| record::decode(&b, || format!("catalog/{domain}")))
            .transpose()?
            .unwrap_or_default())
    }

    /// The stored catalog of every domain.
    pub fn catalog(&self) -> Result<Catalog> {
        let mut catalog = Catalog::default();
        for item in self
            .db
            .iterator_cf(self.cf(CF_CATALOG)?, IteratorMode::Start)
        {
            let (key, value) = item.map_err(db_err("read"))?;
            let domain = String::from_utf8_lossy(&key).into_owned();
            let c: DomainCatalog = record::decode(&value, || format!("catalog/{domain}"))?;
            if !c.snapshots.is_empty() || c.current.is_some() {
                catalog.domains.insert(domain, c);
            }
        }
        Ok(catalog)
    }

    /// Reads `key` from an engine table.
    pub fn get<T: serde::de::DeserializeOwned>(
        &self,
        table: Table,
        key: &[u8],
    ) -> Result<Option<T>> {
        let bytes = self
            .db
            .get_cf(self.cf(table.cf())?, key)
            .map_err(db_err("read"))?;
        bytes
            .map(|b| record::decode(&b, || format!("{}/{key:02x?}", table.cf())))
            .transpose()
    }

    /// Every entry of an engine table whose key starts with `prefix`, in key order.
    pub fn scan<T: serde::de::DeserializeOwned>(
        &self,
        table: Table,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, T)>> {
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(table.cf())?,
            IteratorMode::From(prefix, Direction::Forward),
        );
        for item in it {
            let (key, value) = item.map_err(db_err("read"))?;
            if !key.starts_with(prefix) {
                break;
            }
            let v = record::decode(&value, || format!("{}/{key:02x?}", table.cf()))?;
            out.push((key.to_vec(), v));
        }
        Ok(out)
    }

    /// Like [`Journal::scan`], for the entries whose key is `key_len` bytes long: a table
    /// that holds records of several formats tells them apart by key length.
    pub fn scan_len<T: serde::de::DeserializeOwned>(
        &self,
        table: Table,
        prefix: &[u8],
        key_len: usize,
    ) -> Result<Vec<(Vec<u8>, T)>> {
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(table.cf())?,
            IteratorMode::From(prefix, Direction::Forward),
        );
        for item in it {
            let (key, value) = item.map_err(db_err("read"))?;
            if !key.starts_with(prefix) {
                break;
            }
            if key.len() != key_len {
                continue;
            }
            let v = record::decode(&value, || format!("{}/{key:02x?}", table.cf()))?;
            out.push((key.to_vec(), v));
        }
        Ok(out)
    }

    /// Recomputes every projection from the events and lists where the stored ones differ.
    /// Empty means the catalog, the operation index and the open-operation set agree with
    /// the log.
    pub fn verify(&self) -> Result<Vec<String>> {
        let events = self.events()?;
        let mut problems = Vec::new();
        let first = self.identity.map_or(1, |i| i.first_seq);
        let mut expected_seq = first;
        for (seq, _) in &events {
            if *seq != expected_seq {
                problems.push(if expected_seq == first {
                    format!("the first event has sequence {seq}, the journal starts at {first}")
                } else {
                    format!("event sequence jumps from {} to {seq}", expected_seq - 1)
                });
            }
            expected_seq = seq + 1;
        }
        let rebuilt = Catalog::replay(events.iter().map(|(_, e)| e));
        let stored = self.catalog()?;
        let names: std::collections::BTreeSet<&String> = rebuilt
            .domains
            .keys()
            .chain(stored.domains.keys())
            .collect();
        for domain in names {
            let (r, s) = (rebuilt.domains.get(domain), stored.domains.get(domain));
            if r != s {
                problems.push(format!(
                    "catalog of domain {domain:?} differs from the events: stored {:?}, rebuilt {:?}",
                    s.map(|c| c.snapshots.keys().collect::<Vec<_>>()),
                    r.map(|c| c.snapshots.keys().collect::<Vec<_>>()),
                ));
            }
        }
        let mut summaries: BTreeMap<OpId, OpSummary> = BTreeMap::new();
        for (_, event) in &events {
            match event {
                Event::OpBegun(b) => {
                    summaries.insert(b.op, OpSummary::begun(b));
                }
                other => match summaries.get_mut(&other.op()) {
                    Some(s) => s.apply(other),
                    None => {
                        problems.push(format!("event of operation {} before it began", other.op()))
                    }
                },
            }
        }
        let stored_ops: BTreeMap<OpId, OpSummary> =
            self.ops()?.into_iter().map(|s| (s.op, s)).collect();
        if stored_ops != summaries {
            problems.push("the operation index differs from the events".into());
        }
        let open: Vec<OpId> = summaries
            .values()
            .filter(|s| s.outcome.is_open())
            .map(|s| s.op)
            .collect();
        if open != self.open_ops()? {
            problems.push("the open-operation set differs from the events".into());
        }
        Ok(problems)
    }

    /// Rewrites the catalog and operation projections from the events (after
    /// [`Journal::verify`] reported differences). Engine tables are not touched.
    pub fn rebuild_projections(&mut self) -> Result<()> {
        if self.mode != Mode::Primary {
            return Err(Error::ReadOnly);
        }
        let events = self.events()?;
        let rebuilt = Catalog::replay(events.iter().map(|(_, e)| e));
        let mut wb = WriteBatch::default();
        for name in [CF_CATALOG, CF_OPS, CF_OPEN] {
            let cf = self.cf(name)?;
            for item in self.db.iterator_cf(cf, IteratorMode::Start) {
                let (key, _) = item.map_err(db_err("read"))?;
                wb.delete_cf(cf, key);
            }
        }
        for (domain, c) in &rebuilt.domains {
            wb.put_cf(self.cf(CF_CATALOG)?, domain.as_bytes(), record::encode(c)?);
        }
        let mut summaries: BTreeMap<OpId, OpSummary> = BTreeMap::new();
        for (_, event) in &events {
            match event {
                Event::OpBegun(b) => {
                    summaries.insert(b.op, OpSummary::begun(b));
                }
                other => {
                    if let Some(s) = summaries.get_mut(&other.op()) {
                        s.apply(other);
                    }
                }
            }
        }
        for (op, s) in &summaries {
            wb.put_cf(self.cf(CF_OPS)?, be(*op), record::encode(s)?);
            if s.outcome.is_open() {
                wb.put_cf(self.cf(CF_OPEN)?, be(*op), []);
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(wb, &opts).map_err(db_err("write"))
    }

    /// Overwrites the stored catalog of `domain` (tests of [`Journal::verify`] only).
    #[doc(hidden)]
    pub fn tamper_catalog(&mut self, domain: &str, catalog: &DomainCatalog) -> Result<()> {
        self.db
            .put_cf(
                self.cf(CF_CATALOG)?,
                domain.as_bytes(),
                record::encode(catalog)?,
            )
            .map_err(db_err("write"))
    }
}
