//! Helpers shared by the simulated host's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xen::sim::SimHost;
use xen::{Host, RunState};

pub const MIB: u64 = 1 << 20;
/// The stand-in guest binary of this crate.
pub const GUEST_EXE: &str = env!("CARGO_BIN_EXE_sim-guest");

/// A simulated host in `dir` whose guests run [`GUEST_EXE`].
pub fn host(dir: &Path) -> SimHost {
    SimHost::open(dir)
        .expect("open sim host")
        .with_guest_exe(GUEST_EXE)
}

pub fn state(host: &SimHost, name: &str) -> RunState {
    host.domain(name).expect("domain").state
}

/// The current image of disk xvda.
pub fn xvda(host: &SimHost, name: &str) -> PathBuf {
    host.domain(name)
        .expect("domain")
        .disk("xvda")
        .expect("xvda")
        .path
        .clone()
}

/// Waits until the counter in memory reaches at least `at_least`.
pub fn wait_counter(host: &SimHost, name: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = host.memory_counter(name).expect("memory counter");
        if n >= at_least {
            return n;
        }
        assert!(Instant::now() < deadline, "counter stuck at {n}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
