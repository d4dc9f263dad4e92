//! The real Ceph cluster of a test binary: started once (by `tests/ceph-lab/up.sh`, on free
//! loopback ports, in a directory of its own), shared by every test of the binary, and
//! stopped by a watcher process when the test binary exits — passed, failed or killed.
//!
//! With `DOMSNAP_TEST_CEPH=DIR` the cluster `up.sh DIR` started beforehand is used instead
//! (and left running). A cluster that cannot be started or reached fails the test that
//! asked for it: tests that need Ceph never skip.
//!
//! Include with `#[path = "…/tests/ceph-lab/cluster.rs"] mod ceph_lab;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// How to reach the cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The directory `up.sh` made (logs in `log/`).
    pub dir: PathBuf,
    /// Its `ceph.conf`.
    pub conf: PathBuf,
    /// A pool domsnap's tests may use (each test in a namespace of its own).
    pub pool: String,
    /// radosgw's S3 endpoint, `http://127.0.0.1:PORT`.
    pub s3_endpoint: String,
    /// A bucket domsnap's tests may use (each test under a key prefix of its own).
    pub s3_bucket: String,
    /// An S3 access key and secret of a user of radosgw.
    pub s3_access_key: String,
    /// The secret of that key.
    pub s3_secret_key: String,
}

impl Cluster {
    /// The environment `up.sh` wrote (`export NAME=VALUE` lines), for child processes.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("CEPH_CONF".into(), self.conf.display().to_string()),
            ("DOMSNAP_RADOS_POOL".into(), self.pool.clone()),
            ("DOMSNAP_S3_ENDPOINT".into(), self.s3_endpoint.clone()),
            ("DOMSNAP_S3_BUCKET".into(), self.s3_bucket.clone()),
            ("DOMSNAP_S3_ACCESS_KEY".into(), self.s3_access_key.clone()),
            ("DOMSNAP_S3_SECRET_KEY".into(), self.s3_secret_key.clone()),
        ]
    }

    /// Runs a Ceph command-line tool (`ceph`, `rados`, `rbd`, `radosgw-admin`) against the
    /// cluster; panics with its output if it fails. Returns its standard output.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .env("CEPH_CONF", &self.conf)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A namespace (or bucket suffix) no other test or run uses.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| match std::env::var_os("DOMSNAP_TEST_CEPH") {
        Some(dir) => read_env(Path::new(&dir)),
        None => start(),
    })
}

fn lab_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("ceph-lab")
}

fn start() -> Cluster {
    let dir = std::env::temp_dir().join(format!("domsnap-ceph-{}", std::process::id()));
    if dir.exists() {
        let _ = Command::new(lab_dir().join("down.sh")).arg(&dir).status();
    }
    let port = free_ports();
    // The watcher outlives this process in a session of its own and stops the cluster once
    // this process is gone, however it ended.
    let watcher = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; exec {down} {dir}",
        pid = std::process::id(),
        down = lab_dir().join("down.sh").display(),
        dir = dir.display()
    );
    Command::new("setsid")
        .args(["-f", "bash", "-c", &watcher])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("cannot start the cluster's watcher (setsid)");
    let out = Command::new(lab_dir().join("up.sh"))
        .arg(&dir)
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("cannot run tests/ceph-lab/up.sh (run tests/setup.sh to install Ceph)");
    assert!(
        out.status.success(),
        "tests/ceph-lab/up.sh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    read_env(&dir)
}

/// Three consecutive free loopback ports (monitor v2, v1, radosgw).
fn free_ports() -> u16 {
    let seed = std::process::id() as u16;
    for i in 0..200u16 {
        let base = 20000 + (seed.wrapping_mul(7).wrapping_add(i * 13) % 20000);
        if (0..3).all(|k| TcpListener::bind(("127.0.0.1", base + k)).is_ok()) {
            return base;
        }
    }
    panic!("no three consecutive free ports on 127.0.0.1 between 20000 and 40000");
}

fn read_env(dir: &Path) -> Cluster {
    let text = std::fs::read_to_string(dir.join("env"))
        .unwrap_or_else(|e| panic!("cannot read {}/env: {e}", dir.display()));
    let vars: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .collect();
    let var = |name: &str| {
        vars.get(name)
            .unwrap_or_else(|| panic!("{}/env has no {name}", dir.display()))
            .to_string()
    };
    Cluster {
        dir: dir.to_path_buf(),
        conf: PathBuf::from(var("CEPH_CONF")),
        pool: var("DOMSNAP_RADOS_POOL"),
        s3_endpoint: var("DOMSNAP_S3_ENDPOINT"),
        s3_bucket: var("DOMSNAP_S3_BUCKET"),
        s3_access_key: var("DOMSNAP_S3_ACCESS_KEY"),
        s3_secret_key: var("DOMSNAP_S3_SECRET_KEY"),
    }
}
