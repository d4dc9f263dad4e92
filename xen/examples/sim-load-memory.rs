//! Writes a file into the memory of a running simulated domain through its guest, as the
//! guest's own vCPU would (the pages that change are in its dirty-page log): the way
//! `benches/compare.sh` gives a domain memory of a chosen content.
//!
//! `sim-load-memory STATE_DIR DOMAIN FILE` (STATE_DIR is domsnap's `--state`).

use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, state, domain, file] = args.as_slice() else {
        eprintln!("usage: sim-load-memory STATE_DIR DOMAIN FILE");
        std::process::exit(2);
    };
    let host = match xen::sim::SimHost::open(Path::new(state)) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("sim-load-memory: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = host.load_memory(domain, Path::new(file)) {
        eprintln!("sim-load-memory: {e}");
        std::process::exit(1);
    }
}
