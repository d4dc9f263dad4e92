//! State identity: the journal and the stores it governs know they belong together.
//!
//! A state directory gets a random [`StateId`] when its first journal is created. The
//! journal keeps it in its `meta` family ([`journal::JournalIdentity`], with its first
//! sequence number); every store the journal governs keeps a **mark** beside its data, the
//! `identity` (a [`journal::record`]: magic, version, CRC-32, then a [`Mark`]):
//!
//! | where                               | what it governs                     | high-water op id           |
//! |-------------------------------------|-------------------------------------|----------------------------|
//! | object `identity` of the memory store (`<state>/memory/identity`) | the memory image store | updated at every `OpBegun` |
//! | file `<state>/<host>/identity`      | the host's directory (`sim`, `xen`) | as when written            |
//!
//! The **high-water** op id is written (synced, atomically replaced) after every `OpBegun`
//! has been journaled and before the operation's first step runs, so no step ever touches a
//! disk or a store under an operation id the high-water mark does not cover.
//!
//! Before a writer changes anything it checks ([`Check`]): a journal exists if any mark
//! does (or if the memory store holds packs or manifests), its state id is the marks' id, and its last
//! sequence number is at least every high-water mark (an older copy of the journal put back
//! would reuse operation ids that disks and stores already carry). Any mismatch stops every
//! writer with [`Mismatch`]; readers report it. The way out is `domsnap recover --adopt`
//! ([`crate::adopt`]).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use journal::{Journal, OpId, Seq, StateId};
use serde::{Deserialize, Serialize};
use store::ObjectStore;

use crate::error::{Error, Result};

/// What a store's `identity` file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The state directory the store belongs to.
    pub state: StateId,
    /// The highest operation id that may have touched anything: no id at or below it may
    /// ever be given again.
    pub high_water: OpId,
}

/// The name of a mark: a file in a directory, an object in an object store.
pub const MARK_NAME: &str = "identity";

/// Where one store keeps its mark.
#[derive(Clone)]
enum Place {
    /// The file `identity` in a directory (the host directories).
    File(PathBuf),
    /// The object `identity` of an object store (the memory image store).
    Object(Arc<dyn ObjectStore>),
}

/// One store's mark.
#[derive(Clone)]
pub struct Marker {
    /// What the store is, for messages (`memory store`, `sim host directory`).
    pub what: String,
    place: Place,
}

impl std::fmt::Debug for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Marker({}: {})", self.what, self.location())
    }
}

impl PartialEq for Marker {
    fn eq(&self, other: &Marker) -> bool {
        self.what == other.what && self.location() == other.location()
    }
}

impl Marker {
    /// The mark file of the store in directory `dir`.
    pub fn in_dir(what: impl Into<String>, dir: &Path) -> Marker {
        Marker {
            what: what.into(),
            place: Place::File(dir.join(MARK_NAME)),
        }
    }

    /// The mark object of an object store.
    pub fn in_store(what: impl Into<String>, store: Arc<dyn ObjectStore>) -> Marker {
        Marker {
            what: what.into(),
            place: Place::Object(store),
        }
    }

    /// Where the mark is, for humans: a path, or the store's location and the object name.
    pub fn location(&self) -> String {
        match &self.place {
            Place::File(path) => path.display().to_string(),
            Place::Object(store) => format!("{}/{MARK_NAME}", store.location()),
        }
    }

    /// Whether the mark can be written: its directory exists, or its store is writable.
    pub fn writable(&self) -> bool {
        match &self.place {
            Place::File(path) => path.parent().is_some_and(Path::is_dir),
            Place::Object(store) => !store.read_only(),
        }
    }

    /// The mark, or `None` if there is none.
    pub fn read(&self) -> Result<Option<Mark>> {
        let bytes = match &self.place {
            Place::File(path) => {
                let mut bytes = Vec::new();
                match File::open(path) {
                    Ok(mut f) => f.read_to_end(&mut bytes).map_err(io("read", path))?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io("open", path)(e)),
                };
                bytes
            }
            Place::Object(store) => match store.get(MARK_NAME).map_err(memory_error)? {
                Some(bytes) => bytes,
                None => return Ok(None),
            },
        };
        let mark = journal::record::decode(&bytes, || self.location())?;
        Ok(Some(mark))
    }

    /// Replaces the mark atomically and durably. A file: a temporary file (mode 0600)
    /// written and synced, renamed over the mark, the directory synced (the directory must
    /// exist). An object: [`ObjectStore::replace`].
    pub fn write(&self, mark: &Mark) -> Result<()> {
        let bytes = journal::record::encode(mark)?;
        let path = match &self.place {
            Place::Object(store) => return store.replace(MARK_NAME, &bytes).map_err(memory_error),
            Place::File(path) => path,
        };
        let tmp = path.with_file_name(format!(".{MARK_NAME}.tmp"));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io("set mode of", &tmp))?;
        file.write_all(&bytes).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory", dir))
    }
}

fn memory_error(e: store::Error) -> Error {
    Error::Memory(crate::memstore::Error::from(e))
}

fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> Error + 'p {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A journal that does not belong with the stores beside it. Writers stop; readers report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// The journal is gone, but stores say the state directory had one.
    #[error(
        "the journal {} is missing, but the {what} ({}) belongs to state {state}; \
         a new empty journal would forget every snapshot and reuse operation ids",
        journal.display(), mark
    )]
    JournalMissing {
        /// Where the journal should be.
        journal: PathBuf,
        /// The store that remembers it.
        what: String,
        /// Where its mark is.
        mark: String,
        /// The state id it carries.
        state: StateId,
    },
    /// The journal is gone, and the memory store holds packs nothing else accounts for.
    #[error(
        "the journal {} is missing, but the memory store holds {store}",
        journal.display()
    )]
    JournalMissingBesideData {
        /// Where the journal should be.
        journal: PathBuf,
        /// What the store holds (packs or manifests).
        store: String,
    },
    /// The journal belongs to another state directory.
    #[error(
        "the journal {} belongs to state {journal_state}, the {what} ({}) to state {store_state}",
        journal.display(), mark
    )]
    OtherState {
        /// The journal.
        journal: PathBuf,
        /// Its state id.
        journal_state: StateId,
        /// The store.
        what: String,
        /// Where its mark is.
        mark: String,
        /// The store's state id.
        store_state: StateId,
    },
    /// The journal records no state id (written before journals did) but the stores have one.
    #[error(
        "the journal {} records no state id, but the {what} ({}) belongs to state {store_state}",
        journal.display(), mark
    )]
    Unidentified {
        /// The journal.
        journal: PathBuf,
        /// The store.
        what: String,
        /// Where its mark is.
        mark: String,
        /// The store's state id.
        store_state: StateId,
    },
    /// The journal ends before operations the stores have seen: an older copy.
    #[error(
        "the journal {} ends at sequence {last_seq}, but the {what} ({}) has seen operation \
         {high_water}: this is an older copy of the journal",
        journal.display(), mark
    )]
    Older {
        /// The journal.
        journal: PathBuf,
        /// Its last sequence number.
        last_seq: Seq,
        /// The store.
        what: String,
        /// Where its mark is.
        mark: String,
        /// The store's high-water op id.
        high_water: OpId,
    },
}

impl Mismatch {
    /// What the operator can do, in words.
    pub fn remedy(&self) -> &'static str {
        "nothing was changed; put this state directory's journal back in place, or run \
         `domsnap recover --adopt` to build a new one from what is on disk"
    }
}

/// The marks found beside a journal, and what the journal must satisfy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Check {
    /// Every marker, with its mark if the file exists.
    pub marks: Vec<(Marker, Option<Mark>)>,
    /// The memory store holds packs or manifests: where.
    pub packs_present: Option<String>,
}

impl Check {
    /// Reads every marker in `markers`; `memory` is the memory store, looked at for packs
    /// and manifests.
    pub fn read(markers: &[Marker], memory: &dyn ObjectStore) -> Result<Check> {
        let mut marks = Vec::new();
        for m in markers {
            marks.push((m.clone(), m.read()?));
        }
        let mut packs_present = None;
        for prefix in ["packs/", "manifests/"] {
            if !memory.list(prefix).map_err(memory_error)?.is_empty() {
                packs_present = Some(format!("{}/{prefix}", memory.location()));
                break;
            }
        }
        Ok(Check {
            marks,
            packs_present,
        })
    }

    /// What is wrong when there is no journal at `path` (`None`: nothing, a new state
    /// directory).
    pub fn without_journal(&self, path: &Path) -> Option<Mismatch> {
        if let Some((marker, Some(mark))) = self.marks.iter().find(|(_, m)| m.is_some()) {
            return Some(Mismatch::JournalMissing {
                journal: path.to_path_buf(),
                what: marker.what.clone(),
                mark: marker.location(),
                state: mark.state,
            });
        }
        self.packs_present
            .as_ref()
            .map(|store| Mismatch::JournalMissingBesideData {
                journal: path.to_path_buf(),
                store: store.clone(),
            })
    }

    /// What is wrong with `journal` beside these marks (`None`: they belong together).
    pub fn against(&self, journal: &Journal) -> Option<Mismatch> {
        let path = journal.path().to_path_buf();
        let last_seq = journal.next_seq() - 1;
        for (marker, mark) in &self.marks {
            let Some(mark) = mark else { continue };
            let Some(id) = journal.identity() else {
                return Some(Mismatch::Unidentified {
                    journal: path,
                    what: marker.what.clone(),
                    mark: marker.location(),
                    store_state: mark.state,
                });
            };
            if id.state != mark.state {
                return Some(Mismatch::OtherState {
                    journal: path,
                    journal_state: id.state,
                    what: marker.what.clone(),
                    mark: marker.location(),
                    store_state: mark.state,
                });
            }
            if last_seq < mark.high_water {
                return Some(Mismatch::Older {
                    journal: path,
                    last_seq,
                    what: marker.what.clone(),
                    mark: marker.location(),
                    high_water: mark.high_water,
                });
            }
        }
        None
    }
}
