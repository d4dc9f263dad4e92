//! Differential runs: random sequences of qemu-io writes and snapshot operations, mixed
//! between this crate and qemu-img, checked after every step against an in-memory model.
#![allow(dead_code, clippy::unwrap_used)]

use super::*;
use std::path::{Path, PathBuf};

/// xorshift64*: small, seeded, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone)]
struct Saved {
    name: String,
    data: Vec<u8>,
    alloc: Vec<bool>,
}

pub struct Sim {
    pub img: PathBuf,
    raw: PathBuf,
    cs: u64,
    data: Vec<u8>,
    /// Guest clusters allocated in the active layer (qemu refuses compressed writes there).
    alloc: Vec<bool>,
    snaps: Vec<Saved>,
    pub rng: Rng,
    counter: u64,
    pub steps: u64,
    log: Vec<String>,
    /// Whether writes may go through DataImage (imago refuses zstd and extended L2).
    pub data_image: bool,
}

impl Sim {
    /// `img` must exist already (created by qemu-img or this crate) with `size` bytes of zeros.
    pub fn new(img: PathBuf, dir: &Path, size: u64, cs: u64, seed: u64) -> Sim {
        Sim {
            img,
            raw: dir.join("model.raw"),
            cs,
            data: vec![0; size as usize],
            alloc: vec![false; size.div_ceil(cs) as usize],
            snaps: Vec::new(),
            rng: Rng::new(seed),
            counter: 0,
            steps: 0,
            log: Vec::new(),
            data_image: true,
        }
    }

    fn note(&mut self, what: String) {
        self.log.push(what);
    }

    fn context(&self) -> String {
        let tail: Vec<&String> = self.log.iter().rev().take(8).collect();
        format!("{} after steps (latest first) {tail:?}", self.img.display())
    }

    fn mark(&mut self, off: u64, len: u64, byte: u8) {
        self.data[off as usize..(off + len) as usize].fill(byte);
        for c in off / self.cs..(off + len).div_ceil(self.cs) {
            self.alloc[c as usize] = true;
        }
    }

    pub fn write(&mut self) {
        let size = self.data.len() as u64;
        let len = (1 + self.rng.below(4 * self.cs / 512).min(size / 512 - 1)) * 512;
        let off = self.rng.below((size - len) / 512 + 1) * 512;
        let byte = 1 + self.rng.below(250) as u8;
        if self.rng.chance(30) && self.data_image {
            let mut d = disk::DataImage::open(&self.img).unwrap();
            d.write_at(&vec![byte; len as usize], off).unwrap();
            d.flush().unwrap();
            self.note(format!("DataImage write {byte:#x} {off} {len}"));
        } else if self.rng.chance(10) {
            qemu_io(&self.img, &format!("write -z {off} {len}"));
            self.note(format!("qemu-io write -z {off} {len}"));
            self.mark(off, len, 0);
            return;
        } else {
            qemu_io(&self.img, &format!("write -P {byte} {off} {len}"));
            self.note(format!("qemu-io write -P {byte:#x} {off} {len}"));
        }
        self.mark(off, len, byte);
    }

    pub fn write_compressed(&mut self) {
        let free: Vec<usize> = (0..self.alloc.len()).filter(|c| !self.alloc[*c]).collect();
        if free.is_empty() {
            return self.write();
        }
        let c = free[self.rng.below(free.len() as u64) as usize] as u64;
        let len = self.cs.min(self.data.len() as u64 - c * self.cs);
        let byte = 1 + self.rng.below(250) as u8;
        qemu_io(
            &self.img,
            &format!("write -c -P {byte} {} {len}", c * self.cs),
        );
        self.note(format!("qemu-io write -c -P {byte:#x} cluster {c}"));
        self.mark(c * self.cs, len, byte);
    }

    pub fn create(&mut self, ours: bool) {
        self.counter += 1;
        let name = format!("s{}", self.counter);
        if ours {
            disk::create_snapshot(&self.img, &name).unwrap();
        } else {
            qemu_img(&["snapshot", "-c", &name, s(&self.img)]);
        }
        self.note(format!("create {name} ours={ours}"));
        self.snaps.push(Saved {
            name,
            data: self.data.clone(),
            alloc: self.alloc.clone(),
        });
    }

    pub fn apply(&mut self, ours: bool) {
        if self.snaps.is_empty() {
            return self.create(ours);
        }
        let sn = self.snaps[self.rng.below(self.snaps.len() as u64) as usize].clone();
        if ours {
            disk::apply_snapshot(&self.img, &sn.name).unwrap();
        } else {
            qemu_img(&["snapshot", "-a", &sn.name, s(&self.img)]);
        }
        self.note(format!("apply {} ours={ours}", sn.name));
        self.data = sn.data;
        self.alloc = sn.alloc;
    }

    pub fn delete(&mut self, ours: bool) {
        if self.snaps.is_empty() {
            return self.create(ours);
        }
        let i = self.rng.below(self.snaps.len() as u64) as usize;
        let name = self.snaps.remove(i).name;
        if ours {
            disk::delete_snapshot(&self.img, &name).unwrap();
        } else {
            qemu_img(&["snapshot", "-d", &name, s(&self.img)]);
        }
        self.note(format!("delete {name} ours={ours}"));
    }

    /// One random step, then the full verification.
    pub fn step(&mut self) {
        let ours = self.rng.chance(50);
        match self.rng.below(100) {
            0..=34 => self.write(),
            35..=44 => self.write_compressed(),
            45..=66 => self.create(ours),
            67..=84 => self.apply(ours),
            _ => self.delete(ours),
        }
        self.steps += 1;
        self.verify();
    }

    pub fn verify(&mut self) {
        let ctx = self.context();
        let (code, text) = qemu_check(&self.img);
        assert_eq!(code, 0, "qemu-img check: {text}\n{ctx}");
        let ours = disk::check(&self.img).unwrap();
        assert!(ours.is_clean(), "disk::check: {ours:?}\n{ctx}");
        std::fs::write(&self.raw, &self.data).unwrap();
        assert!(same_content(&self.img, &self.raw), "content differs\n{ctx}");
        let want: Vec<String> = self.snaps.iter().map(|s| s.name.clone()).collect();
        let mut listed: Vec<String> = disk::list_snapshots(&self.img)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        let mut by_qemu = qemu_snapshots(&self.img);
        listed.sort();
        by_qemu.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(listed, want_sorted, "disk::list_snapshots\n{ctx}");
        assert_eq!(by_qemu, want_sorted, "qemu-img snapshot -l\n{ctx}");
    }

    /// Applies every remaining snapshot once (alternating tools) and checks its content.
    pub fn verify_all_snapshots(&mut self) {
        for i in 0..self.snaps.len() {
            let sn = self.snaps[i].clone();
            if i % 2 == 0 {
                disk::apply_snapshot(&self.img, &sn.name).unwrap();
            } else {
                qemu_img(&["snapshot", "-a", &sn.name, s(&self.img)]);
            }
            self.note(format!("apply {} (final)", sn.name));
            self.data = sn.data;
            self.alloc = sn.alloc;
            self.verify();
        }
    }
}
