//! A stand-in for the `domsnap` binary in the `xen` crate's own tests (which cannot run
//! guests with their test-harness executable):
//!
//! - `sim-guest __sim-guest <state_dir> <name>`: a simulated guest process, as
//!   `domsnap __sim-guest …` is in production;
//! - `sim-guest start-and-wait <state_dir> <name>`: starts the domain running with this
//!   executable as guest, prints `started`, then sleeps until killed (the tests kill it with
//!   SIGKILL to show that the domain outlives the command that started it).

use std::ffi::OsString;
use std::path::PathBuf;

use xen::sim::SimHost;
use xen::Host;

fn main() {
    let mut args = std::env::args_os().skip(1);
    let command = args.next();
    if command.as_deref() == Some(std::ffi::OsStr::new(xen::sim::GUEST_ARG)) {
        xen::sim::guest_main_from_args(args)
    }
    if command.as_deref() == Some(std::ffi::OsStr::new("start-and-wait")) {
        let rest: Vec<OsString> = args.collect();
        if let [state_dir, name] = rest.as_slice() {
            std::process::exit(start_and_wait(PathBuf::from(state_dir), name));
        }
    }
    eprintln!(
        "usage: sim-guest {} <state_dir> <name> | sim-guest start-and-wait <state_dir> <name>",
        xen::sim::GUEST_ARG
    );
    std::process::exit(64);
}

fn start_and_wait(state_dir: PathBuf, name: &OsString) -> i32 {
    let Some(name) = name.to_str() else {
        eprintln!("domain name is not UTF-8");
        return 64;
    };
    let host = match std::env::current_exe() {
        Ok(exe) => SimHost::open(&state_dir).map(|h| h.with_guest_exe(exe)),
        Err(e) => {
            eprintln!("current_exe: {e}");
            return 1;
        }
    };
    match host.and_then(|host| host.start(name, false)) {
        Ok(()) => {
            println!("started");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Err(e) => {
            eprintln!("start {name}: {e}");
            1
        }
    }
}
