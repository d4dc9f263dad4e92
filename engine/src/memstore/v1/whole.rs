//! The whole-image BLAKE3, computed on a second thread so that it overlaps chunking and
//! chunk hashing (ingest) or reading and chunk checks (restore). Memory: a handful of 1 MiB
//! blocks, recycled.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use crate::memstore::error::{Error, Result};

const BLOCK: usize = 1 << 20;
/// Blocks in flight before the producer waits for the hasher.
const DEPTH: usize = 4;

enum Msg {
    Data(Vec<u8>),
    Zeros(u64),
}

/// A BLAKE3 hasher running on its own thread.
#[derive(Debug)]
pub(super) struct WholeHash {
    tx: Option<SyncSender<Msg>>,
    pool: Receiver<Vec<u8>>,
    current: Vec<u8>,
    thread: Option<JoinHandle<blake3::Hash>>,
}

impl WholeHash {
    pub(super) fn new() -> WholeHash {
        let (tx, rx) = mpsc::sync_channel::<Msg>(DEPTH);
        let (pool_tx, pool) = mpsc::channel::<Vec<u8>>();
        let thread = std::thread::Builder::new()
            .name("memstore-hash".into())
            .spawn(move || {
                let mut hasher = blake3::Hasher::new();
                for msg in rx {
                    match msg {
                        Msg::Data(mut block) => {
                            hasher.update(&block);
                            block.clear();
                            let _ = pool_tx.send(block);
                        }
                        Msg::Zeros(mut n) => {
                            let zeros = [0u8; 64 << 10];
                            while n > 0 {
                                let k = n.min(zeros.len() as u64) as usize;
                                hasher.update(&zeros[..k]);
                                n -= k as u64;
                            }
                        }
                    }
                }
                hasher.finalize()
            })
            .ok();
        WholeHash {
            tx: Some(tx),
            pool,
            current: Vec::with_capacity(BLOCK),
            thread,
        }
    }

    fn send(&mut self, msg: Msg) {
        if let Some(tx) = &self.tx {
            if tx.send(msg).is_err() {
                // The thread is gone (it panicked); finish() reports it.
                self.tx = None;
            }
        }
    }

    fn flush(&mut self) {
        if !self.current.is_empty() {
            let next = self
                .pool
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(BLOCK));
            let full = std::mem::replace(&mut self.current, next);
            self.send(Msg::Data(full));
        }
    }

    /// Adds bytes.
    pub(super) fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = data.len().min(BLOCK - self.current.len());
            self.current.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.current.len() == BLOCK {
                self.flush();
            }
        }
    }

    /// Adds `n` zero bytes.
    pub(super) fn zeros(&mut self, n: u64) {
        self.flush();
        self.send(Msg::Zeros(n));
    }

    /// The hash of everything added.
    pub(super) fn finish(mut self) -> Result<blake3::Hash> {
        self.flush();
        let sent = self.tx.take().is_some();
        let hash = self.thread.take().and_then(|t| t.join().ok());
        match hash {
            Some(hash) if sent => Ok(hash),
            _ => Err(Error::Inconsistent("the image hash thread failed".into())),
        }
    }
}
