//! The simulated guest's dirty-page log, through the Host trait.
#![allow(clippy::unwrap_used)]

mod common;

use common::{host, wait_counter, MIB};
use xen::Host;

#[test]
fn the_log_holds_exactly_the_pages_the_guest_wrote_since_its_reset() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(dir.path());
    h.define("d", 4 * MIB, &[MIB]).unwrap();
    h.start("d", false).unwrap();
    // A freshly booted guest has no usable log: memory came from elsewhere.
    h.pause("d").unwrap();
    assert_eq!(h.dirty_pages("d").unwrap(), None);
    h.reset_dirty_pages("d", 7).unwrap();
    assert_eq!(
        h.dirty_pages("d").unwrap().unwrap().pages,
        Vec::<u64>::new()
    );
    let n = h.memory_counter("d").unwrap();
    h.unpause("d").unwrap();
    wait_counter(&h, "d", n + 3);
    h.pause("d").unwrap();
    let log = h.dirty_pages("d").unwrap().unwrap();
    assert_eq!(
        (log.base, log.pages),
        (7, vec![0]),
        "the counter lives in page 0"
    );

    // Memory written through the guest: exactly the pages that changed.
    let mut memory = std::fs::read(h.domain("d").unwrap().memory_path.unwrap()).unwrap();
    for p in [5usize, 6, 900, 1023] {
        memory[p * 4096 + 11] ^= 0xff;
    }
    let file = dir.path().join("new-memory");
    std::fs::write(&file, &memory).unwrap();
    h.reset_dirty_pages("d", 8).unwrap();
    h.load_memory("d", &file).unwrap();
    let log = h.dirty_pages("d").unwrap().unwrap();
    assert_eq!((log.base, log.pages.clone()), (8, vec![5, 6, 900, 1023]));
    let mut got = Vec::new();
    h.read_memory_pages("d", &log.pages, &mut |p, data| {
        got.push((p, data.to_vec()));
        Ok(())
    })
    .unwrap();
    for (p, data) in got {
        let p = p as usize;
        assert_eq!(data, memory[p * 4096..(p + 1) * 4096]);
    }
    assert!(h
        .read_memory_pages("d", &[1024], &mut |_, _| Ok(()))
        .is_err());

    // A new boot starts without a usable log again.
    h.destroy("d").unwrap();
    h.start("d", true).unwrap();
    assert_eq!(h.dirty_pages("d").unwrap(), None);
    h.destroy("d").unwrap();
}
