//! Durability: what `fsync` makes durable, and the power cut.

use std::collections::{HashMap, HashSet};

use super::{Data, FaultOn, Ino, Model, Node, Res, ROOT};

impl Model {
    /// `fsync` / `fdatasync` of a file: its data, size and mode become durable. Of a
    /// directory: its entries become durable (and the inodes they name exist, empty until
    /// their own fsync).
    pub fn fsync(&mut self, ino: Ino) -> Res<()> {
        self.check(FaultOn::Fsync, ino, None)?;
        let node = self.node(ino)?.clone();
        match &node.data {
            Data::Dir(entries) => {
                for child in entries.values() {
                    if !self.dur.contains_key(child) {
                        let empty = self.node(*child)?.empty_like();
                        self.dur.insert(*child, empty);
                    }
                }
                match self.dur.get_mut(&ino) {
                    Some(d) => {
                        d.data = node.data.clone();
                        d.mode = node.mode;
                        d.uid = node.uid;
                        d.gid = node.gid;
                    }
                    None => {
                        self.dur.insert(ino, node);
                    }
                }
                self.gc_durable();
            }
            _ => match self.dur.get_mut(&ino) {
                // A directory's fsync keeps the entries it made durable; a file's fsync
                // brings everything of the file.
                Some(d) => {
                    d.data = node.data.clone();
                    d.mode = node.mode;
                    d.uid = node.uid;
                    d.gid = node.gid;
                    d.mtime = node.mtime;
                }
                None => {
                    self.dur.insert(ino, node);
                }
            },
        }
        Ok(())
    }

    /// Drops durable inodes that no durable directory names and that are gone from the
    /// current tree too (they can never be named again).
    fn gc_durable(&mut self) {
        let reachable = reach(&self.dur);
        self.dur
            .retain(|ino, _| reachable.contains(ino) || self.cur.contains_key(ino));
    }

    /// The power cut: the current tree becomes what was durable. Open handles are gone
    /// (the processes that held them died with the power), faults stay armed, and the file
    /// system works again.
    pub fn reboot(&mut self) {
        let reachable = reach(&self.dur);
        self.dur.retain(|ino, _| reachable.contains(ino));
        self.cur = self.dur.clone();
        self.opens.clear();
        self.used_blocks = self
            .cur
            .values()
            .map(|n| match &n.data {
                Data::File { blocks, .. } => blocks.len() as u64,
                _ => 0,
            })
            .sum();
        self.frozen = false;
        self.draining = false;
    }
}

/// Inodes reachable from the root through durable directories.
fn reach(tree: &HashMap<Ino, Node>) -> HashSet<Ino> {
    let mut seen = HashSet::new();
    let mut stack = vec![ROOT];
    while let Some(i) = stack.pop() {
        if !seen.insert(i) {
            continue;
        }
        if let Some(Node {
            data: Data::Dir(e), ..
        }) = tree.get(&i)
        {
            stack.extend(e.values().copied());
        }
    }
    seen
}

impl Model {
    /// Every path of the current tree (`durable = false`) or of the durable one, with the
    /// inode and size of each: for failure reports.
    pub fn listing(&self, durable: bool) -> Vec<String> {
        let tree = if durable { &self.dur } else { &self.cur };
        let mut out = Vec::new();
        let mut stack = vec![(ROOT, String::new())];
        while let Some((ino, path)) = stack.pop() {
            match tree.get(&ino).map(|n| &n.data) {
                Some(Data::Dir(e)) => {
                    out.push(format!("{path}/ (inode {ino})"));
                    for (name, child) in e {
                        stack.push((*child, format!("{path}/{}", name.to_string_lossy())));
                    }
                }
                Some(Data::File { size, .. }) => {
                    out.push(format!("{path} (inode {ino}, {size} bytes)"));
                }
                Some(_) => out.push(format!("{path} (inode {ino})")),
                None => out.push(format!("{path} (inode {ino} missing)")),
            }
        }
        out.sort();
        out
    }
}
