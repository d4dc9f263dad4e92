//! Randomized torture of domsnap, as an operator's bad day would have it: several simulated
//! domains running the counter workload, random operations (create of every kind, revert,
//! delete, the `domain` commands, gc, recover), each possibly killed (`kill -9` after a
//! random delay, or a failpoint that aborts the process or makes a step fail), recovery
//! possibly killed too; after every round one checker ([`check::check`]) proves the
//! invariants.
//!
//! Everything random comes from one seed, printed at the start of a run; `SEED=<n>` replays
//! the same choices (kill delays land on whatever the process is doing at that moment, so a
//! replay of a kill is close, not exact; a failpoint replays exactly).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod check;
pub mod ops;
pub mod rng;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::Env;

/// How long one command may take before the run is declared hung.
const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

/// A domain's run state as `domain info` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Shutoff,
    Running,
    Paused,
}

impl State {
    pub fn parse(s: &str) -> State {
        match s {
            "shutoff" => State::Shutoff,
            "running" => State::Running,
            "paused" => State::Paused,
            other => panic!("unknown run state {other:?}"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Shutoff => "shutoff",
            State::Running => "running",
            State::Paused => "paused",
        }
    }

    pub fn is_active(self) -> bool {
        self != State::Shutoff
    }
}

/// What the model knows of one snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapModel {
    pub checkpoint: bool,
    /// The counter on xvda in the snapshot (read from the snapshot itself).
    pub disk: Option<u64>,
    /// The counter in the checkpoint's memory (learned from a revert to it, paused).
    pub memory: Option<u64>,
    /// Whether the domain had been counting when the checkpoint was taken, so that its
    /// memory and disk counters must belong to one instant.
    pub coherent: Option<bool>,
}

/// What the model expects of one domain.
#[derive(Debug, Clone)]
pub struct DomModel {
    pub name: String,
    pub disks: usize,
    pub external: bool,
    /// The run states the domain may be in now (more than one after an interrupted
    /// `domain` command, which is not journaled).
    pub state: BTreeSet<State>,
    pub snaps: BTreeMap<String, SnapModel>,
    /// A revert that took effect this round: (snapshot, run state asked for).
    pub reverted: Option<(String, State)>,
    /// Whether memory and xvda hold counters of one instant (seen counting since its last
    /// start); a guest just started may not have counted yet.
    pub coherent: bool,
}

impl DomModel {
    pub fn state(&self) -> State {
        assert_eq!(self.state.len(), 1, "{}: state not settled", self.name);
        *self.state.iter().next().unwrap()
    }

    pub fn set_state(&mut self, s: State) {
        self.state = BTreeSet::from([s]);
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Exited with this code.
    Exit(i32),
    /// Killed by our `kill -9`.
    Killed,
    /// Died of a signal we did not send (a failpoint's abort).
    Crashed(i32),
}

/// One command run.
#[derive(Debug, Clone)]
pub struct Ran {
    pub args: Vec<String>,
    pub ended: Ended,
    pub stdout: String,
    pub stderr: String,
    pub millis: u128,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.ended == Ended::Exit(0)
    }

    pub fn interrupted(&self) -> bool {
        matches!(self.ended, Ended::Killed | Ended::Crashed(_))
    }

    pub fn describe(&self) -> String {
        let how = match self.ended {
            Ended::Exit(c) => format!("exit {c}"),
            Ended::Killed => "killed (kill -9)".into(),
            Ended::Crashed(s) => format!("died of signal {s}"),
        };
        let err = self.stderr.trim();
        if err.is_empty() {
            format!("`{}` → {how} ({} ms)", self.args.join(" "), self.millis)
        } else {
            format!(
                "`{}` → {how} ({} ms): {}",
                self.args.join(" "),
                self.millis,
                err.replace('\n', " | ")
            )
        }
    }
}

/// A fault injected into one command.
#[derive(Debug, Clone)]
pub enum Fault {
    None,
    /// `kill -9` after this delay (if it is still running).
    Kill(Duration),
    /// `FAILPOINTS=<spec>`; `crash` when it aborts the process, else it makes a step fail.
    Failpoint {
        spec: String,
        crash: bool,
    },
    /// A power cut of the world's test file system after this delay: every process using
    /// it dies and what was not synced is lost.
    PowerCut(Duration),
}

impl Fault {
    pub fn describe(&self) -> String {
        match self {
            Fault::None => "no fault".into(),
            Fault::Kill(d) => format!("kill -9 after {} ms", d.as_millis()),
            Fault::Failpoint { spec, .. } => format!("FAILPOINTS={spec}"),
            Fault::PowerCut(d) => format!("power cut after {} ms", d.as_millis()),
        }
    }
}

/// A state directory with domains, and the model of what they must look like.
pub struct World {
    pub env: Env,
    /// The test file system the state directory is on, for power cuts (dropped after
    /// `env`, which destroys the domains first).
    pub fs: Option<testfs::TestFs>,
    /// Power cuts not yet accounted for by the model.
    pub cut: bool,
    pub doms: Vec<DomModel>,
    /// Highest operation id already accounted for.
    pub last_op: u64,
    /// Snapshot names are never reused within a world.
    pub next_name: u64,
    /// What happened, for the report of a failed run.
    pub log: Vec<String>,
    /// Known defects met (tolerated unless `TORTURE_STRICT` is set), by name: how often.
    pub known: BTreeMap<&'static str, u64>,
    /// `history --json` as read at the end of the last round.
    pub history: Vec<Value>,
    /// Milliseconds taken by uninterrupted commands, by kind: (sum, count), so that kills
    /// land inside commands, whatever this machine's speed.
    pub durations: BTreeMap<&'static str, (u64, u64)>,
    logs: tempfile::TempDir,
    runs: u64,
    /// The mount point of `fs` (removed last).
    _mount: Option<tempfile::TempDir>,
}

impl World {
    /// Three domains running the counter workload: `a` (one disk) and `b` (two disks) take
    /// internal snapshots, `c` (one disk) external ones.
    pub fn new() -> World {
        World::build(Env::new(), None, None)
    }

    /// The same, with the state directory on a fresh test file system, for power cuts.
    pub fn on_testfs() -> World {
        let mount = tempfile::Builder::new()
            .prefix("ds-fs-")
            .tempdir_in("/tmp")
            .unwrap();
        let fs = testfs::TestFs::mount(mount.path()).unwrap();
        let env = Env::new_in(fs.path());
        let world = World::build(env, Some(fs), Some(mount));
        // The host was provisioned before the first power cut: the directories of the
        // simulated host (which never syncs its own parents) and of the state directory
        // itself are on disk, as a file system would have them some seconds later.
        sync_dirs(world.fs.as_ref().unwrap().path());
        world
    }

    fn build(env: Env, fs: Option<testfs::TestFs>, mount: Option<tempfile::TempDir>) -> World {
        let specs: [(&str, usize, bool); 3] = [("a", 1, false), ("b", 2, false), ("c", 1, true)];
        let mut doms = Vec::new();
        for (name, disks, external) in specs {
            let sizes = vec!["16M"; disks];
            env.running_domain(name, "8M", &sizes);
            doms.push(DomModel {
                name: name.into(),
                disks,
                external,
                state: BTreeSet::from([State::Running]),
                snaps: BTreeMap::new(),
                reverted: None,
                coherent: true,
            });
        }
        let last_op = history(&env)
            .iter()
            .map(|o| o["id"].as_u64().unwrap())
            .max()
            .unwrap_or(0);
        World {
            env,
            fs,
            cut: false,
            doms,
            last_op,
            next_name: 1,
            log: Vec::new(),
            known: BTreeMap::new(),
            history: Vec::new(),
            durations: BTreeMap::new(),
            logs: tempfile::tempdir().unwrap(),
            runs: 0,
            _mount: mount,
        }
    }

    pub fn dom(&self, name: &str) -> &DomModel {
        self.doms.iter().find(|d| d.name == name).unwrap()
    }

    pub fn dom_mut(&mut self, name: &str) -> &mut DomModel {
        self.doms.iter_mut().find(|d| d.name == name).unwrap()
    }

    pub fn note(&mut self, line: String) {
        if std::env::var_os("TORTURE_VERBOSE").is_some() {
            eprintln!("{line}");
        }
        self.log.push(line);
    }

    /// The last lines of the log, for a failure report.
    pub fn tail(&self, n: usize) -> String {
        let start = self.log.len().saturating_sub(n);
        self.log[start..].join("\n")
    }

    /// Runs `domsnap <args>` with `fault`; never panics on the outcome.
    pub fn run(&mut self, args: &[&str], fault: &Fault) -> Ran {
        self.runs += 1;
        let out_path = self.logs.path().join(format!("{}.out", self.runs));
        let err_path = self.logs.path().join(format!("{}.err", self.runs));
        let mut cmd: Command = self.env.cmd(args);
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out_path).unwrap())
            .stderr(File::create(&err_path).unwrap());
        if let Fault::Failpoint { spec, .. } = fault {
            cmd.env("FAILPOINTS", spec);
        }
        let start = Instant::now();
        let mut child = cmd.spawn().unwrap();
        let kill_at = match fault {
            Fault::Kill(d) | Fault::PowerCut(d) => Some(start + *d),
            _ => None,
        };
        let mut killed = false;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            let now = Instant::now();
            if let Some(at) = kill_at {
                if !killed && now >= at {
                    if let Fault::PowerCut(_) = fault {
                        let pid = child.id();
                        let fs = self
                            .fs
                            .as_mut()
                            .expect("a power cut needs the test file system");
                        let cut = fs.power_cut(&[pid]).unwrap();
                        self.cut = true;
                        self.log
                            .push(format!("    power cut: killed {:?}", cut.killed));
                    } else {
                        // SIGKILL; the child may have exited a moment ago (then it is a
                        // zombie until waited for, and the kill does nothing).
                        let _ = child.kill();
                    }
                    killed = true;
                    continue;
                }
            }
            assert!(
                now - start < COMMAND_DEADLINE,
                "domsnap {} hung for {COMMAND_DEADLINE:?}\n{}",
                args.join(" "),
                self.tail(30)
            );
            let next = match kill_at {
                Some(at) if !killed => at.saturating_duration_since(now),
                _ => Duration::from_millis(2),
            };
            std::thread::sleep(next.min(Duration::from_millis(2)));
        };
        let millis = start.elapsed().as_millis();
        if let (Fault::PowerCut(_), false) = (fault, killed) {
            // The command ended first: the power goes right after it (what it reported
            // done must survive).
            let fs = self
                .fs
                .as_mut()
                .expect("a power cut needs the test file system");
            let cut = fs.power_cut(&[]).unwrap();
            self.cut = true;
            self.log.push(format!(
                "    power cut after the command: killed {:?}",
                cut.killed
            ));
        }
        use std::os::unix::process::ExitStatusExt;
        let ended = match (status.code(), status.signal()) {
            (Some(c), _) => Ended::Exit(c),
            (None, Some(9)) if killed => Ended::Killed,
            (None, Some(s)) => Ended::Crashed(s),
            (None, None) => unreachable!("a status is a code or a signal"),
        };
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        Ran {
            args: args.iter().map(|s| s.to_string()).collect(),
            ended,
            stdout,
            stderr,
            millis,
        }
    }

    /// Runs a command that must succeed, with `--json`; returns its output.
    pub fn json(&mut self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let ran = self.run(&all, &Fault::None);
        if !ran.ok() {
            return Err(format!("{} failed: {}", args.join(" "), ran.describe()));
        }
        serde_json::from_str(&ran.stdout)
            .map_err(|e| format!("{}: bad JSON ({e}): {}", args.join(" "), ran.stdout))
    }

    pub fn fresh_name(&mut self) -> String {
        let n = self.next_name;
        self.next_name += 1;
        format!("s{n}")
    }

    /// The simulated host, for the checker's direct looks (run state, pause for image
    /// checks, counters) that must not go through the commands under test.
    pub fn host(&self) -> xen::sim::SimHost {
        xen::sim::SimHost::open(self.env.state()).unwrap()
    }

    /// The run state of a domain as the host sees it.
    pub fn host_state(&self, dom: &str) -> Result<State, String> {
        use xen::Host;
        let info = self
            .host()
            .domain(dom)
            .map_err(|e| format!("domain {dom}: {e}"))?;
        Ok(State::parse(&info.state.to_string()))
    }

    /// Records how long an uninterrupted command of `kind` took.
    pub fn took(&mut self, kind: &'static str, millis: u128) {
        let e = self.durations.entry(kind).or_insert((0, 0));
        e.0 += millis as u64;
        e.1 += 1;
    }

    /// A moment to kill a command of `kind` at: uniform over its typical duration.
    pub fn kill_delay(&self, kind: &'static str, rng: &mut rng::Rng) -> Duration {
        let mean = match self.durations.get(kind) {
            Some((sum, n)) if *n > 0 => sum / n,
            _ => 150,
        };
        Duration::from_millis(rng.below(mean * 5 / 4 + 1))
    }

    /// Meets a known defect: counted and tolerated, or an error under `TORTURE_STRICT=1`.
    pub fn known_defect(&mut self, name: &'static str, what: &str) -> Result<(), String> {
        self.note(format!("    known defect {name}: {what}"));
        if std::env::var_os("TORTURE_STRICT").is_some() {
            return Err(format!("known defect {name}: {what}"));
        }
        *self.known.entry(name).or_default() += 1;
        Ok(())
    }

    pub fn log_dir(&self) -> PathBuf {
        self.logs.path().to_path_buf()
    }
}

/// Fsyncs every directory under `root`, and `root`.
fn sync_dirs(root: &std::path::Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
        File::open(&d).unwrap().sync_all().unwrap();
    }
}

/// `history --json` (every operation, oldest first).
pub fn history(env: &Env) -> Vec<Value> {
    env.json(&["history"]).as_array().unwrap().clone()
}
