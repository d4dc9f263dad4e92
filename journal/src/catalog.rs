//! The snapshot catalog: a projection of the events, kept in the same write batch as the
//! event that changes it, and rebuildable from the events alone ([`Catalog::replay`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{CatalogChange, Event, SnapshotMeta};

/// One domain's snapshots and which one is current.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainCatalog {
    /// The snapshot the domain's present state descends from.
    pub current: Option<String>,
    /// Snapshots by name.
    pub snapshots: BTreeMap<String, SnapshotMeta>,
}

impl DomainCatalog {
    /// Applies a committed change. Pure: the same events give the same catalog.
    pub fn apply(&mut self, change: &CatalogChange) {
        match change {
            CatalogChange::Created(meta) => {
                self.current = Some(meta.name.clone());
                self.snapshots.insert(meta.name.clone(), meta.clone());
            }
            CatalogChange::Reverted { name } => self.current = Some(name.clone()),
            CatalogChange::Adopted { snapshots, current } => {
                self.snapshots = snapshots
                    .iter()
                    .map(|s| (s.name.clone(), s.clone()))
                    .collect();
                self.current = current.clone();
            }
            CatalogChange::Deleted { names } => {
                for name in names {
                    let Some(gone) = self.snapshots.remove(name) else {
                        continue;
                    };
                    for snap in self.snapshots.values_mut() {
                        if snap.parent.as_deref() == Some(name) {
                            snap.parent = gone.parent.clone();
                        }
                    }
                    if self.current.as_deref() == Some(name) {
                        self.current = gone.parent.clone();
                    }
                }
            }
            CatalogChange::Unchanged => {}
        }
    }

    /// Children of `name` (or roots for `None`), by creation time.
    pub fn children(&self, name: Option<&str>) -> Vec<&SnapshotMeta> {
        let mut kids: Vec<_> = self
            .snapshots
            .values()
            .filter(|s| s.parent.as_deref() == name)
            .collect();
        kids.sort_by_key(|s| (s.created, s.op));
        kids
    }

    /// `name` and every snapshot below it, descendants before ancestors.
    pub fn subtree(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        for child in self.children(Some(name)) {
            out.extend(self.subtree(&child.name));
        }
        out.push(name.to_string());
        out
    }
}

/// Every domain's catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    /// By domain name.
    pub domains: BTreeMap<String, DomainCatalog>,
}

impl Catalog {
    /// Rebuilds the catalog from events in journal order.
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a Event>) -> Catalog {
        let mut domains_of_ops = BTreeMap::new();
        let mut catalog = Catalog::default();
        for event in events {
            match event {
                Event::OpBegun(b) => {
                    domains_of_ops.insert(b.op, b.domain.clone());
                }
                Event::OpCommitted { op, change, .. } => {
                    if let Some(domain) = domains_of_ops.get(op) {
                        catalog
                            .domains
                            .entry(domain.clone())
                            .or_default()
                            .apply(change);
                    }
                }
                _ => {}
            }
        }
        catalog
            .domains
            .retain(|_, d| !d.snapshots.is_empty() || d.current.is_some());
        catalog
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{DomainState, SnapshotKind};

    fn snap(name: &str, parent: Option<&str>, created: u64) -> SnapshotMeta {
        SnapshotMeta {
            domain: "d".into(),
            name: name.into(),
            parent: parent.map(Into::into),
            kind: SnapshotKind::DiskOnly,
            created,
            op: created,
            domain_state: DomainState::Shutoff,
            memory_image: None,
            memory_bytes: 0,
            disks: vec![],
            description: None,
            crash_consistent: false,
        }
    }

    #[test]
    fn delete_reparents_children_and_moves_current() {
        let mut c = DomainCatalog::default();
        c.apply(&CatalogChange::Created(snap("a", None, 1)));
        c.apply(&CatalogChange::Created(snap("b", Some("a"), 2)));
        c.apply(&CatalogChange::Created(snap("c", Some("b"), 3)));
        c.apply(&CatalogChange::Reverted { name: "b".into() });
        c.apply(&CatalogChange::Deleted {
            names: vec!["b".into()],
        });
        assert_eq!(c.snapshots["c"].parent.as_deref(), Some("a"));
        assert_eq!(c.current.as_deref(), Some("a"));
        assert_eq!(c.subtree("a"), vec!["c".to_string(), "a".to_string()]);
    }

    #[test]
    fn subtree_lists_descendants_first() {
        let mut c = DomainCatalog::default();
        c.apply(&CatalogChange::Created(snap("a", None, 1)));
        c.apply(&CatalogChange::Created(snap("b", Some("a"), 2)));
        c.apply(&CatalogChange::Created(snap("c", Some("a"), 3)));
        c.apply(&CatalogChange::Created(snap("d", Some("b"), 4)));
        assert_eq!(c.subtree("a"), vec!["d", "b", "c", "a"]);
        c.apply(&CatalogChange::Deleted {
            names: c.subtree("b"),
        });
        assert_eq!(c.snapshots.len(), 2);
        assert_eq!(c.current.as_deref(), Some("a"));
    }
}
