//! Bad input, one row a test: every request domsnap must refuse, and every damaged file it
//! must not trust. Each row checks the exit code, that the message names what was wrong
//! (and does not echo 10 000 characters back), and that nothing changed: the domains' run
//! states, the catalog, every disk's snapshot table and (for refused requests) the journal's
//! history are as before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use common::*;

/// Exit code of a refused request (bad input, wrong state).
const EXIT_USER: i32 = 2;
/// Exit code when stored data is damaged.
const EXIT_DAMAGED: i32 = 6;
/// Exit code of `verify` when it finds problems.
const EXIT_PROBLEMS: i32 = 4;

/// A state directory with domain `d`: shut off with disk-only snapshot `s1`, or running
/// with checkpoint `s1`.
fn fixture(running: bool) -> Env {
    let env = Env::new();
    if running {
        env.running_domain("d", "8M", &["16M"]);
    } else {
        env.define("d", "8M", &["16M"]);
    }
    env.run(&["create", "d", "s1"]);
    env
}

/// What must not change: history, catalog, run state, snapshot tables.
fn fingerprint(env: &Env, with_history: bool) -> String {
    let history = if with_history {
        env.json(&["history"]).to_string()
    } else {
        String::new()
    };
    format!(
        "{history}\n{}\n{}\n{:?}",
        env.json(&["list", "d"]),
        env.domain_state("d"),
        env.qemu_tags("d")
    )
}

/// Runs `args`; it must end with `code`, name every string of `mentions` in its message,
/// keep the message short, and change nothing.
fn refused(env: &Env, args: &[&std::ffi::OsStr], code: i32, mentions: &[&str]) -> String {
    let before = fingerprint(env, true);
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().chars().take(40).collect())
        .collect();
    let out = env.cmd(&[]).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{shown:?}: {}\n{err}",
        out.status
    );
    for m in mentions {
        assert!(
            err.contains(m),
            "{shown:?}: the message does not name {m:?}:\n{err}"
        );
    }
    assert!(
        err.len() < 1000,
        "{shown:?}: a message of {} bytes:\n{}",
        err.len(),
        err.chars().take(300).collect::<String>()
    );
    assert_eq!(
        fingerprint(env, true),
        before,
        "{shown:?} changed something"
    );
    err
}

fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(std::ffi::OsString::from).collect()
}

fn refuse(env: &Env, args: &[&str], code: i32, mentions: &[&str]) -> String {
    let args = os(args);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    refused(env, &refs, code, mentions)
}

macro_rules! rows {
    ($($name:ident: running $running:expr, $args:expr, $code:expr, $mentions:expr;)*) => {
        $(
            #[test]
            fn $name() {
                let env = fixture($running);
                refuse(&env, &$args, $code, &$mentions);
            }
        )*
    };
}

rows! {
    create_on_an_unknown_domain: running false,
        ["create", "nosuch", "s2"], EXIT_USER, ["nosuch"];
    revert_on_an_unknown_domain: running false,
        ["revert", "nosuch", "s1"], EXIT_USER, ["nosuch"];
    delete_on_an_unknown_domain: running false,
        ["delete", "nosuch", "s1"], EXIT_USER, ["nosuch"];
    list_of_an_unknown_domain: running false,
        ["list", "nosuch"], EXIT_USER, ["nosuch"];
    revert_to_an_unknown_snapshot: running false,
        ["revert", "d", "nosuch"], EXIT_USER, ["nosuch"];
    delete_of_an_unknown_snapshot: running false,
        ["delete", "d", "nosuch"], EXIT_USER, ["nosuch"];
    info_of_an_unknown_snapshot: running false,
        ["info", "d", "nosuch"], EXIT_USER, ["nosuch"];
    a_duplicate_snapshot: running false,
        ["create", "d", "s1"], EXIT_USER, ["s1", "already"];
    a_duplicate_domain: running false,
        ["domain", "define", "d", "--memory", "8M"], EXIT_USER, ["d"];
    a_slash_in_a_snapshot_name: running false,
        ["create", "d", "a/b"], EXIT_USER, ["a/b"];
    a_slash_in_a_domain_name: running false,
        ["create", "a/b", "s2"], EXIT_USER, ["a/b"];
    a_slash_in_a_new_domain_name: running false,
        ["domain", "define", "../d", "--memory", "8M"], EXIT_USER, ["../d"];
    dot_dot_as_a_snapshot_name: running false,
        ["create", "d", ".."], EXIT_USER, [".."];
    dot_dot_as_a_domain_name: running false,
        ["list", ".."], EXIT_USER, [".."];
    a_path_as_a_revert_target: running false,
        ["revert", "d", "../../etc/passwd"], EXIT_USER, ["../../etc/passwd"];
    an_empty_snapshot_name: running false,
        ["create", "d", ""], EXIT_USER, ["empty"];
    a_hidden_snapshot_name: running false,
        ["create", "d", ".s"], EXIT_USER, [".s"];
    a_tag_like_snapshot_name: running false,
        ["create", "d", "s@12"], EXIT_USER, ["s@12"];
    a_running_domain_disk_only_without_consent: running true,
        ["create", "d", "s2", "--disk-only"], EXIT_USER, ["crash-consistent"];
    crash_consistent_without_disk_only: running true,
        ["create", "d", "s2", "--crash-consistent"], EXIT_USER, ["--crash-consistent"];
    both_running_and_paused: running false,
        ["revert", "d", "s1", "--running", "--paused"], EXIT_USER, ["--paused"];
    a_bad_memory_size: running false,
        ["domain", "define", "e", "--memory", "8Q"], EXIT_USER, ["8Q"];
    a_bad_since: running false,
        ["history", "--since", "yesterday-ish"], EXIT_USER, ["yesterday-ish"];
}

#[test]
fn a_name_of_ten_thousand_characters() {
    let env = fixture(false);
    let long = "x".repeat(10_000);
    refuse(
        &env,
        &["create", "d", &long],
        EXIT_USER,
        &["10000 characters"],
    );
    refuse(
        &env,
        &["create", &long, "s2"],
        EXIT_USER,
        &["10000 characters"],
    );
    refuse(&env, &["list", &long], EXIT_USER, &["10000 characters"]);
}

#[test]
fn a_name_that_is_not_utf8() {
    let env = fixture(false);
    let bad = std::ffi::OsStr::from_bytes(b"s\xff2");
    let create = std::ffi::OsStr::new("create");
    let d = std::ffi::OsStr::new("d");
    refused(&env, &[create, d, bad], EXIT_USER, &["UTF-8"]);
    refused(&env, &[create, bad, d], EXIT_USER, &["UTF-8"]);
}

#[test]
fn a_name_with_a_nul_is_refused_before_it_reaches_anything() {
    // argv cannot carry a NUL: the name check itself is the row.
    for what in ["domain", "snapshot"] {
        let e = engine::names::check(what, "a\0b").unwrap_err();
        assert!(e.is_user_error(), "{e}");
        assert!(e.to_string().contains("\\0"), "{e}");
    }
}

// --- Damaged files ----------------------------------------------------------------------

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// The largest file of the memory store: the pack holding the checkpoint's chunks.
fn pack_file(env: &Env) -> PathBuf {
    files_under(&env.state().join("memory"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a pack file")
}

fn flip_byte(path: &Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x5a;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

/// A revert to a damaged checkpoint: refused before the domain is touched, the damage
/// named; `verify --deep` finds it.
fn damaged_memory_is_refused(damage: impl FnOnce(&Path), mentions: &[&str]) {
    let env = fixture(true);
    env.run(&["domain", "pause", "d"]);
    let pack = pack_file(&env);
    damage(&pack);
    let before = fingerprint(&env, false);
    let out = env.try_run(&["revert", "d", "s1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_DAMAGED), "{err}");
    for m in mentions {
        assert!(err.contains(m), "revert does not name {m:?}:\n{err}");
    }
    assert_eq!(
        fingerprint(&env, false),
        before,
        "the revert changed something"
    );
    let out = env.try_run(&["verify", "--deep"]);
    assert_eq!(out.status.code(), Some(EXIT_PROBLEMS), "{out:?}");
}

#[test]
fn a_corrupted_chunk() {
    damaged_memory_is_refused(
        |pack| {
            let len = std::fs::metadata(pack).unwrap().len();
            flip_byte(pack, len / 2);
        },
        &["verify-image"],
    );
}

#[test]
fn a_truncated_pack() {
    damaged_memory_is_refused(
        |pack| {
            let len = std::fs::metadata(pack).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(pack).unwrap();
            f.set_len(len / 2).unwrap();
            f.sync_all().unwrap();
        },
        &["verify-image"],
    );
}

/// The qcow2 image of xvda (shut-off domain).
fn xvda(env: &Env) -> PathBuf {
    env.disk_paths("d")[0].1.clone()
}

#[test]
fn a_qcow2_image_with_a_damaged_header() {
    let env = fixture(false);
    let img = xvda(&env);
    flip_byte(&img, 0); // the magic
    let before = fingerprint_without_tables(&env);
    let out = env.try_run(&["create", "d", "s2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(EXIT_USER | EXIT_DAMAGED)),
        "{err}"
    );
    assert!(
        err.contains(img.to_str().unwrap()),
        "the image is not named:\n{err}"
    );
    assert_eq!(fingerprint_without_tables(&env), before);
    assert!(!env.snapshot_names("d").contains("s2"));
    let out = env.try_run(&["verify"]);
    assert_eq!(out.status.code(), Some(EXIT_PROBLEMS), "{out:?}");
}

fn fingerprint_without_tables(env: &Env) -> String {
    format!("{}\n{}", env.json(&["list", "d"]), env.domain_state("d"))
}

#[test]
fn a_qcow2_image_with_a_damaged_snapshot_table() {
    let env = fixture(false);
    let img = xvda(&env);
    let mut header = [0u8; 72];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact(&mut header)
        .unwrap();
    let table = u64::from_be_bytes(header[64..72].try_into().unwrap());
    assert_ne!(table, 0, "the image has a snapshot table");
    // The first entry's L1 offset: misaligned, beyond the end of the file.
    let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.seek(SeekFrom::Start(table)).unwrap();
    f.write_all(&[0xff; 8]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let before = fingerprint_without_tables(&env);
    let out = env.try_run(&["revert", "d", "s1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(EXIT_USER | EXIT_DAMAGED)),
        "{err}"
    );
    assert!(
        err.contains(img.to_str().unwrap()),
        "the image is not named:\n{err}"
    );
    assert_eq!(fingerprint_without_tables(&env), before);
    let out = env.try_run(&["verify", "--disks"]);
    assert_eq!(out.status.code(), Some(EXIT_PROBLEMS), "{out:?}");
}

#[test]
fn a_journal_record_with_a_bad_crc_in_the_middle() {
    let env = fixture(false);
    env.run(&["create", "d", "s2"]);
    env.run(&["create", "d", "s3"]);
    let db_path = env.state().join("journal");
    let seq = {
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &db_path).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &db_path, &cfs).unwrap();
        let events = db.cf_handle("events").unwrap();
        let keys: Vec<Vec<u8>> = db
            .iterator_cf(events, rocksdb::IteratorMode::Start)
            .map(|kv| kv.unwrap().0.to_vec())
            .collect();
        let key = keys[keys.len() / 2].clone();
        let mut value = db.get_cf(events, &key).unwrap().unwrap();
        let last = value.len() - 1;
        value[last] ^= 0x01; // the payload changes, its CRC does not
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        db.put_cf_opt(events, &key, &value, &opts).unwrap();
        u64::from_be_bytes(key.try_into().unwrap())
    };
    let out = env.try_run(&["history"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_DAMAGED), "{err}");
    assert!(
        err.contains("checksum") && err.contains(&seq.to_string()),
        "history does not name the damaged record (event {seq}):\n{err}"
    );
    let out = env.try_run(&["verify"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "verify passes a damaged journal"
    );
    assert!(text.contains(&seq.to_string()), "{text}");
}
