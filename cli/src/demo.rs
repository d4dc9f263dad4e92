//! `domsnap demo`: a tour on the simulated host, in a fresh state directory. Every step is a
//! real `domsnap` command, printed before it runs.

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

const DOMAIN: &str = "demo01";

struct Demo {
    exe: PathBuf,
    state: PathBuf,
}

impl Demo {
    /// Runs `domsnap --state DIR args…`, echoing the command and its output.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        println!("\n$ domsnap {}", args.join(" "));
        let out = Command::new(&self.exe)
            .arg("--state")
            .arg(&self.state)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{stdout}");
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("`domsnap {}` failed ({})", args.join(" "), out.status);
        }
        Ok(stdout)
    }

    fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = Command::new(&self.exe)
            .arg("--state")
            .arg(&self.state)
            .args(&all)
            .output()?;
        if !out.status.success() {
            bail!(
                "`domsnap {}` failed: {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The guest's counter in memory (offset 0 of the memory file).
    fn memory_counter(&self) -> anyhow::Result<u64> {
        let info = self.json(&["domain", "info", DOMAIN])?;
        let path = info["memory"]["path"]
            .as_str()
            .context("domain info has no memory path")?;
        let mut buf = [0u8; 8];
        std::fs::File::open(path)?.read_exact(&mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }
}

fn say(text: &str) {
    println!("\n# {text}");
}

/// Runs the demo in `state` (default: a new temporary directory, removed afterwards unless
/// `keep`).
pub fn run(state: Option<PathBuf>, keep: bool, json: bool) -> anyhow::Result<()> {
    if json {
        bail!(crate::Usage(
            "demo prints a narrated tour; it has no --json output".into()
        ));
    }
    let exe = std::env::current_exe().context("locating the domsnap executable")?;
    let (state, temp) = match state {
        Some(dir) => (dir, None),
        None => {
            let dir = std::env::temp_dir().join(format!("domsnap-demo-{}", std::process::id()));
            (dir.clone(), Some(dir))
        }
    };
    let demo = Demo { exe, state };
    println!("domsnap demo: state directory {}", demo.state.display());
    let result = tour(&demo);
    // Never leave a guest process behind.
    let _ = Command::new(&demo.exe)
        .arg("--state")
        .arg(&demo.state)
        .args(["domain", "destroy", DOMAIN])
        .output();
    match (&temp, keep) {
        (Some(dir), false) => {
            let _ = std::fs::remove_dir_all(dir);
        }
        _ => println!("\nstate kept in {}", demo.state.display()),
    }
    result?;
    println!("\ndemo finished: every check passed");
    Ok(())
}

fn wait_for_progress(demo: &Demo, past: u64) -> anyhow::Result<u64> {
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        let n = demo.memory_counter()?;
        if n > past + 100 {
            return Ok(n);
        }
    }
    bail!("the guest's counter does not advance")
}

fn tour(demo: &Demo) -> anyhow::Result<()> {
    say("A simulated Xen domain: 64 MiB of memory, two qcow2 disks. Its vCPU counts: n += 1, writes n to disk xvda, then to memory.");
    demo.run(&[
        "domain", "define", DOMAIN, "--memory", "64M", "--disk", "256M", "--disk", "64M",
    ])?;
    demo.run(&["domain", "start", DOMAIN, "--workload", "counter"])?;
    let n0 = wait_for_progress(demo, 0)?;
    println!("counter in memory: {n0}");

    say("A checkpoint of the running domain: paused, memory saved into the chunk store, both disks snapshotted, resumed.");
    demo.run(&[
        "create",
        DOMAIN,
        "before-upgrade",
        "--description",
        "taken while running",
    ])?;

    say("Pause, note the counter, and take a checkpoint of the paused domain.");
    demo.run(&["domain", "pause", DOMAIN])?;
    let at_snapshot = demo.memory_counter()?;
    println!("counter in memory while paused: {at_snapshot}");
    demo.run(&["create", DOMAIN, "paused-cp"])?;
    demo.run(&["domain", "unpause", DOMAIN])?;
    let later = wait_for_progress(demo, at_snapshot)?;
    println!("the guest ran on: counter now {later}");

    say("A second checkpoint of nearly the same memory stores almost nothing new (see bytes new).");
    demo.run(&["create", DOMAIN, "again"])?;

    say("Revert to paused-cp: memory and disks come back to that instant.");
    demo.run(&["revert", DOMAIN, "paused-cp", "--paused"])?;
    let reverted = demo.memory_counter()?;
    println!("counter in memory after revert: {reverted} (at the snapshot: {at_snapshot})");
    if reverted != at_snapshot {
        bail!("revert did not restore the counter: {reverted} != {at_snapshot}");
    }
    demo.run(&["domain", "unpause", DOMAIN])?;

    say("Shut the domain down and take a disk-only snapshot (consistent: the domain is off).");
    demo.run(&["domain", "shutdown", DOMAIN])?;
    demo.run(&["create", DOMAIN, "offline", "--disk-only"])?;

    say("The snapshot tree; `again` is deleted and its children move to its parent.");
    demo.run(&["list", DOMAIN, "--tree"])?;
    demo.run(&["delete", DOMAIN, "again"])?;
    demo.run(&["list", DOMAIN])?;

    say("Revert to the running checkpoint: the domain comes back running.");
    demo.run(&["revert", DOMAIN, "before-upgrade"])?;
    demo.run(&["domain", "info", DOMAIN])?;

    say("Everything domsnap did, step by step, from the journal.");
    demo.run(&["history", DOMAIN])?;

    say("The journal, the catalog, every disk's qcow2 snapshot table and the chunk store agree.");
    demo.run(&["verify", "--deep"])?;
    demo.run(&["gc"])?;
    Ok(())
}
