//! Helpers shared by the simulated host's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xen::sim::{SimHost, VcpuStatus};
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

/// Waits until the vCPU of `name` has stopped and waits to be let run: from then on its
/// counter cannot move until it is unpaused (no sleep needed to show that).
pub fn wait_parked(host: &SimHost, name: &str) -> VcpuStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = host.vcpu(name).expect("vcpu status");
        if v.parked {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "vCPU of {name} never parked: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the vCPU of `name` has run at least `at_least` iterations of its workload.
pub fn wait_steps(host: &SimHost, name: &str, at_least: u64) -> VcpuStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = host.vcpu(name).expect("vcpu status");
        if v.steps >= at_least {
            return v;
        }
        assert!(Instant::now() < deadline, "vCPU of {name} stuck: {v:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
