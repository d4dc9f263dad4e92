//! The simulated host with real guest processes and real qcow2 images: the `Host` contract,
//! then what only the simulation promises (the counter workload, detachment, stale state).

use std::io::{BufRead, BufReader, Cursor, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xen::contract::{qemu_img_check, qemu_img_check_allow_leaks, read_disk_u64};
use xen::sim::{SimHost, Workload};
use xen::{Error, Host, RunState};

mod common;
use common::*;

/// Memory holds m, xvda holds m or m + 1 (the vCPU writes the disk first).
fn assert_consistent(host: &SimHost, name: &str) -> u64 {
    let m = host.memory_counter(name).expect("memory counter");
    let d = read_disk_u64(&xvda(host, name), 0);
    assert!(d == m || d == m + 1, "memory counter {m}, xvda counter {d}");
    m
}

fn guest_pid(host: &SimHost, name: &str) -> i32 {
    let path = host
        .state_dir()
        .join("sim/domains")
        .join(name)
        .join("guest.pid");
    std::fs::read_to_string(path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

#[test]
fn host_contract() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("contract", MIB, &[16 * MIB, 4 * MIB])
        .expect("define");
    xen::contract::run_all(&host, "contract");
}

#[test]
fn define_validates_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    let info = host.define("d1", 2 * MIB, &[8 * MIB, MIB]).expect("define");
    assert_eq!(info.state, RunState::Shutoff);
    assert_eq!(info.memory_bytes, 2 * MIB);
    let targets: Vec<&str> = info.disks.iter().map(|d| d.target.as_str()).collect();
    assert_eq!(targets, ["xvda", "xvdb"]);
    let memory = info.memory_path.clone().expect("memory path");
    let meta = std::fs::metadata(&memory).expect("memory file");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "guest memory is secret"
    );
    assert_eq!(meta.len(), 2 * MIB);
    assert!(meta.blocks() * 512 < MIB, "memory file is sparse");
    for disk in &info.disks {
        qemu_img_check(&disk.path);
    }
    assert_eq!(host.workload("d1").expect("workload"), Workload::Counter);

    assert!(matches!(
        host.define("d1", MIB, &[MIB]),
        Err(Error::DomainExists(_))
    ));
    for bad in ["", ".d", "../d", "a/b", "d d", &"x".repeat(65)] {
        assert!(
            matches!(host.define(bad, MIB, &[MIB]), Err(Error::Invalid(_))),
            "{bad:?}"
        );
    }
    for memory in [0, MIB - 4096, MIB + 1] {
        assert!(host.define("d2", memory, &[MIB]).is_err(), "{memory}");
    }
    assert!(host.define("d2", MIB, &[0]).is_err());
    // A disk the image library refuses: refused, and nothing of d2 is left.
    let refused = host.define("d2", MIB, &[!511]);
    assert!(refused.is_err(), "a disk of 2^64 - 512 bytes: {refused:?}");
    let entries: Vec<String> = std::fs::read_dir(tmp.path().join("sim/domains"))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["d1"], "a refused define leaves nothing behind");
    assert!(matches!(host.domain("d2"), Err(Error::NoSuchDomain(_))));
    let names: Vec<String> = host
        .domains()
        .expect("domains")
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert!(names.contains(&"d1".to_owned()));

    host.undefine("d1").expect("undefine");
    assert!(matches!(host.domain("d1"), Err(Error::NoSuchDomain(_))));
    assert!(!tmp.path().join("sim/domains/d1").exists());
}

#[test]
fn counter_is_consistent_after_pause() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("c", MIB, &[8 * MIB]).expect("define");
    host.start("c", true).expect("start paused");
    // The vCPU thread is up and waits: it has run nothing and stored nothing.
    let v = wait_parked(&host, "c");
    assert_eq!(v.steps, 0, "paused at boot");
    assert_eq!(
        host.memory_counter("c").expect("counter"),
        0,
        "paused at boot"
    );
    host.unpause("c").expect("unpause");
    let mut last = 0;
    for round in 0..5 {
        wait_counter(&host, "c", last + 10);
        host.pause("c").expect("pause");
        let m = assert_consistent(&host, "c");
        assert!(m > last, "round {round}: {m} <= {last}");
        let v = wait_parked(&host, "c");
        assert_eq!(
            host.memory_counter("c").expect("counter"),
            m,
            "paused vCPU moved"
        );
        assert_eq!(
            host.vcpu("c").expect("vcpu").steps,
            v.steps,
            "paused vCPU ran"
        );
        last = m;
        host.unpause("c").expect("unpause");
    }
    let mut image = Vec::new();
    host.save_memory("c", &mut image).expect("save");
    assert_eq!(state(&host, "c"), RunState::Paused);
    let m = assert_consistent(&host, "c");
    assert_eq!(
        image[..8],
        m.to_le_bytes(),
        "saved memory holds the counter"
    );
    assert_eq!(image.len() as u64, MIB);
    host.destroy("c").expect("destroy");
}

#[test]
fn restore_counts_on_from_the_saved_counter() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("r", MIB, &[8 * MIB]).expect("define");
    host.start("r", false).expect("start");
    wait_counter(&host, "r", 20);
    let mut image = Vec::new();
    host.save_memory("r", &mut image).expect("save");
    let saved = u64::from_le_bytes(image[..8].try_into().expect("8 bytes"));
    host.create_disk_snapshot("r", "xvda", "cp1")
        .expect("snapshot");

    // Run on past the checkpoint, then revert: disk snapshot + memory.
    host.unpause("r").expect("unpause");
    wait_counter(&host, "r", saved + 50);
    host.destroy("r").expect("destroy");
    host.apply_disk_snapshot("r", "xvda", "cp1").expect("apply");
    assert_eq!(read_disk_u64(&xvda(&host, "r"), 0), saved);
    host.restore_memory("r", &mut Cursor::new(&image))
        .expect("restore");
    assert_eq!(state(&host, "r"), RunState::Paused);
    assert_eq!(host.memory_counter("r").expect("counter"), saved);
    let memory = host
        .domain("r")
        .expect("domain")
        .memory_path
        .expect("memory path");
    assert_eq!(
        std::fs::metadata(&memory)
            .expect("memory")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let v = wait_parked(&host, "r");
    assert_eq!(v.steps, 0, "restored paused: the vCPU has not run");
    assert_eq!(
        host.memory_counter("r").expect("counter"),
        saved,
        "restored paused"
    );
    host.unpause("r").expect("unpause");
    wait_counter(&host, "r", saved + 10);
    host.pause("r").expect("pause");
    let m = assert_consistent(&host, "r");
    assert!(m > saved);
    host.shutdown("r").expect("shutdown");
    assert_eq!(state(&host, "r"), RunState::Shutoff);
    // Destroyed once above: leaked clusters are possible, corruption is not.
    qemu_img_check_allow_leaks(&xvda(&host, "r"));
}

#[test]
fn guest_outlives_the_command_that_started_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("k", MIB, &[8 * MIB]).expect("define");
    let mut starter = Command::new(GUEST_EXE)
        .arg("start-and-wait")
        .arg(tmp.path())
        .arg("k")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn starter");
    let mut out = BufReader::new(starter.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read starter");
    assert_eq!(line.trim(), "started");
    starter.kill().expect("kill -9 the starter");
    starter.wait().expect("reap the starter");
    // The guest holds none of the starter's descriptors: its stdout pipe reaches EOF.
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("read to EOF");

    assert_eq!(state(&host, "k"), RunState::Running);
    let n = host.memory_counter("k").expect("counter");
    wait_counter(&host, "k", n + 10);
    host.pause("k").expect("pause");
    assert_consistent(&host, "k");
    host.destroy("k").expect("destroy");
    assert_eq!(state(&host, "k"), RunState::Shutoff);
}

#[test]
fn a_killed_guest_is_shut_off_and_starts_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("s", MIB, &[8 * MIB]).expect("define");
    host.start("s", false).expect("start");
    wait_counter(&host, "s", 5);
    let pid = guest_pid(&host, "s");
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(&host, "s") != RunState::Shutoff {
        assert!(
            Instant::now() < deadline,
            "killed guest still counts as active"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A guest process killed in the middle of its writes (as QEMU may crash) leaves an
    // image with at most leaked clusters, never a reference to an unallocated one.
    let xvda = host.domain("s").expect("domain").disks[0].path.clone();
    qemu_img_check_allow_leaks(&xvda);
    // A snapshot makes the next write copy cluster and table (allocations); kill again
    // right after the guest has started writing.
    host.create_disk_snapshot("s", "xvda", "before")
        .expect("snapshot");
    let before = host.memory_counter("s").expect("counter");
    host.start("s", false).expect("start");
    wait_counter(&host, "s", before + 1);
    let pid = guest_pid(&host, "s");
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill")
        .success());
    while state(&host, "s") != RunState::Shutoff {
        std::thread::sleep(Duration::from_millis(10));
    }
    qemu_img_check_allow_leaks(&xvda);
    // Stale pid file and socket are left; start copes with them.
    host.start("s", false).expect("start after kill");
    let n = host.memory_counter("s").expect("counter");
    wait_counter(&host, "s", n + 5);
    let pid = guest_pid(&host, "s");
    host.destroy("s").expect("destroy");
    // Our child, yet no zombie: the host collects its exit status in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "guest {pid} left as a zombie");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(
        host.pause("s"),
        Err(Error::WrongState {
            state: RunState::Shutoff,
            ..
        })
    ));
}

#[test]
fn shutdown_flushes_and_undefine_needs_shutoff() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("g", MIB, &[8 * MIB]).expect("define");
    host.shutdown("g").expect("shutdown of a shut-off domain");
    host.start("g", false).expect("start");
    wait_counter(&host, "g", 10);
    assert!(matches!(host.undefine("g"), Err(Error::WrongState { .. })));
    host.shutdown("g").expect("shutdown");
    assert_eq!(state(&host, "g"), RunState::Shutoff);
    let m = assert_consistent(&host, "g");
    assert!(m >= 10);
    qemu_img_check(&xvda(&host, "g"));
    host.undefine("g").expect("undefine");
    assert!(host.domains().expect("domains").is_empty());
}

#[test]
fn long_names_and_idle_workload() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    let name = "n".repeat(64);
    host.define_with_workload(&name, MIB, &[MIB], Workload::Idle)
        .expect("define");
    host.start(&name, false)
        .expect("start (socket path over 100 bytes)");
    // The idle vCPU has run: a counter of 0 is its doing, not a guest that has not started.
    wait_steps(&host, &name, 3);
    host.pause(&name).expect("pause");
    assert_eq!(host.memory_counter(&name).expect("counter"), 0, "idle");
    host.set_workload(&name, Workload::Counter)
        .expect("set workload");
    host.destroy(&name).expect("destroy");
    host.start(&name, false).expect("start");
    wait_counter(&host, &name, 5);
    host.destroy(&name).expect("destroy");
}

#[test]
fn a_failed_start_leaves_the_domain_shut_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    host(tmp.path()).define("f", MIB, &[MIB]).expect("define");
    let broken = SimHost::open(tmp.path())
        .expect("open")
        .with_guest_exe("/bin/false");
    let err = broken
        .start("f", false)
        .expect_err("a guest that exits at once");
    assert!(
        matches!(err, Error::DeviceModel { .. }),
        "{err:?} should name the guest"
    );
    assert_eq!(state(&broken, "f"), RunState::Shutoff);
    let dir = tmp.path().join("sim/domains/f");
    assert!(!dir.join("guest.pid").exists() && !dir.join("control.sock").exists());
    let missing = SimHost::open(tmp.path())
        .expect("open")
        .with_guest_exe(tmp.path().join("no-such-exe"));
    assert!(missing.start("f", false).is_err());
    // The right executable still starts it.
    let host = host(tmp.path());
    host.start("f", true).expect("start");
    host.destroy("f").expect("destroy");
}

#[test]
fn a_stale_pid_file_naming_a_live_process_is_not_a_domain() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("p", MIB, &[MIB]).expect("define");
    let dir = tmp.path().join("sim/domains/p");
    // Our own pid: alive, but not holding the lock a guest holds.
    std::fs::write(dir.join("guest.pid"), format!("{}\n", std::process::id())).expect("pid");
    std::fs::write(dir.join("control.sock"), b"").expect("sock");
    assert_eq!(state(&host, "p"), RunState::Shutoff);
    host.destroy("p").expect("destroy kills nobody");
    assert!(!dir.join("guest.pid").exists(), "stale files cleaned");
    std::fs::write(dir.join("guest.pid"), format!("{}\n", std::process::id())).expect("pid");
    host.start("p", false).expect("start over stale files");
    assert_eq!(state(&host, "p"), RunState::Running);
    host.destroy("p").expect("destroy");
}

#[test]
fn define_over_a_leftover_directory_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    let domains = tmp.path().join("sim/domains");
    std::fs::create_dir_all(domains.join("x")).expect("mkdir");
    std::fs::write(domains.join("x/junk"), b"junk").expect("junk");
    assert!(host.define("x", MIB, &[MIB]).is_err());
    let entries: Vec<String> = std::fs::read_dir(&domains)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["x"], "no work directory left behind");
    assert!(host.domains().expect("domains").is_empty());
}

#[test]
fn sigterm_shuts_the_guest_down_gracefully() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("t", MIB, &[8 * MIB]).expect("define");
    host.start("t", false).expect("start");
    wait_counter(&host, "t", 10);
    let pid = guest_pid(&host, "t");
    for signal in ["-HUP", "-TERM"] {
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        if signal == "-HUP" {
            // Once the guest says it ignored the signal, it must still run.
            let log = tmp.path().join("sim/domains/t/guest.log");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("SIGHUP ignored")
            {
                assert!(Instant::now() < deadline, "SIGHUP never handled");
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(state(&host, "t"), RunState::Running, "SIGHUP is ignored");
            let n = host.memory_counter("t").expect("counter");
            wait_counter(&host, "t", n + 2);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(&host, "t") != RunState::Shutoff {
        assert!(Instant::now() < deadline, "SIGTERM did not shut it down");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_consistent(&host, "t");
    qemu_img_check(&xvda(&host, "t"));
}

#[test]
fn concurrent_starts_boot_one_guest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = host(tmp.path());
    host.define("two", MIB, &[MIB]).expect("define");
    let results: Vec<xen::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let host = host.clone();
                s.spawn(move || host.start("two", false))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for r in results.iter().filter(|r| r.is_err()) {
        assert!(matches!(r, Err(Error::WrongState { .. })), "{r:?}");
    }
    assert_eq!(state(&host, "two"), RunState::Running);
    host.destroy("two").expect("destroy");
    assert_eq!(state(&host, "two"), RunState::Shutoff);
}

#[test]
fn a_guest_that_never_answers_is_killed_with_its_children() {
    let tmp = tempfile::tempdir().expect("tempdir");
    host(tmp.path()).define("h", MIB, &[MIB]).expect("define");
    let script = tmp.path().join("hang.sh");
    let marker = tmp.path().join("child.pid");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nsleep 60 &\necho $! > {}\nwait\n",
            marker.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let hanging = SimHost::open(tmp.path())
        .expect("open")
        .with_guest_exe(&script)
        .with_start_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let err = hanging.start("h", false).expect_err("never answers");
    assert!(started.elapsed() < Duration::from_secs(5), "bounded wait");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert_eq!(state(&hanging, "h"), RunState::Shutoff);
    let child: i32 = std::fs::read_to_string(&marker)
        .expect("marker")
        .trim()
        .parse()
        .expect("pid");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{child}")).exists() {
        // A zombie until init collects it is fine; a live `sleep` is not.
        let status = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        if status.contains(") Z ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's child {child} survived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
