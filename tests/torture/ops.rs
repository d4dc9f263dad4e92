//! One round: a random action, a random fault, recovery (itself possibly interrupted), and
//! the model brought up to date from the journal's history.

use serde_json::Value;

use super::rng::Rng;
use super::{history, Ended, Fault, Ran, State, World};

/// Crash failpoints (the process aborts there, as `kill -9` would) of each operation, as
/// the engine names them: `engine::<op>::{before,after}-<step>`, the undo steps of a
/// rolled-back create and the points around commit and recovery.
pub const CRASH_POINTS: &[(&str, &str)] = &[
    ("create", "engine::create::after-begin"),
    ("create", "engine::create::before-pause"),
    ("create", "engine::create::after-pause"),
    ("create", "engine::create::before-save-memory"),
    ("create", "engine::create::save-memory-ingested"),
    ("create", "engine::create::after-save-memory"),
    ("create", "engine::create::before-snapshot-disk"),
    ("create", "engine::create::after-snapshot-disk"),
    ("create", "engine::create::before-resume"),
    ("create", "engine::create::after-resume"),
    ("create", "engine::create::before-commit"),
    ("create", "engine::create::before-undo-snapshot-disk"),
    ("create", "engine::create::after-undo-snapshot-disk"),
    ("create", "engine::create::before-undo-save-memory"),
    ("create", "engine::create::after-undo-save-memory"),
    ("revert", "engine::revert::after-begin"),
    ("revert", "engine::revert::before-verify-image"),
    ("revert", "engine::revert::after-verify-image"),
    ("revert", "engine::revert::before-stop-domain"),
    ("revert", "engine::revert::after-stop-domain"),
    ("revert", "engine::revert::before-revert-disk"),
    ("revert", "engine::revert::after-revert-disk"),
    ("revert", "engine::revert::before-discard-image"),
    ("revert", "engine::revert::after-discard-image"),
    ("revert", "engine::revert::before-restore-memory"),
    ("revert", "engine::revert::after-restore-memory"),
    ("revert", "engine::revert::before-set-run-state"),
    ("revert", "engine::revert::after-set-run-state"),
    ("revert", "engine::revert::before-commit"),
    ("delete", "engine::delete::after-begin"),
    ("delete", "engine::delete::before-delete-disk"),
    ("delete", "engine::delete::after-delete-disk"),
    ("delete", "engine::delete::before-release-image"),
    ("delete", "engine::delete::after-release-image"),
    ("delete", "engine::delete::before-commit"),
    ("recover", "engine::recover::after-decide"),
];

/// Failpoints that make a step fail with an error (the command exits 1 and rolls back, or
/// leaves the rest to recovery), by operation.
pub const ERROR_POINTS: &[(&str, &str)] = &[
    ("create", "engine::memstore::after-pack-sync"),
    ("create", "disk::internal::write_l2"),
    ("create", "disk::internal::write_l1"),
    ("create", "disk::internal::write_table"),
    ("create", "disk::internal::write_refcounts"),
    ("create", "disk::internal::sync_new"),
    ("create", "disk::internal::write_header"),
    ("create", "disk::internal::sync_header"),
    ("revert", "disk::internal::write_l1"),
    ("revert", "disk::internal::write_header"),
    ("delete", "disk::internal::write_table"),
    ("delete", "disk::internal::sync_header"),
    ("gc", "engine::memstore::gc::after-commit"),
];

/// What a round does.
#[derive(Debug, Clone)]
pub enum Action {
    Create {
        dom: String,
        name: String,
        disk_only: bool,
        crash_consistent: bool,
        external: bool,
    },
    Revert {
        dom: String,
        name: String,
        flag: Option<State>,
        /// The run state the revert ends in.
        target: State,
    },
    Delete {
        dom: String,
        name: String,
        children: bool,
        /// What a committed delete removes.
        names: Vec<String>,
    },
    Domain {
        dom: String,
        verb: &'static str,
        paused: bool,
    },
    Gc,
    Recover,
    Verify,
}

impl Action {
    pub fn args(&self) -> Vec<String> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        match self {
            Action::Create {
                dom,
                name,
                disk_only,
                crash_consistent,
                external,
            } => {
                let mut a = s(&["create", dom, name]);
                if *disk_only {
                    a.push("--disk-only".into());
                }
                if *crash_consistent {
                    a.push("--crash-consistent".into());
                }
                if *external {
                    a.push("--external".into());
                }
                a
            }
            Action::Revert {
                dom, name, flag, ..
            } => {
                let mut a = s(&["revert", dom, name]);
                match flag {
                    Some(State::Running) => a.push("--running".into()),
                    Some(State::Paused) => a.push("--paused".into()),
                    _ => {}
                }
                a
            }
            Action::Delete {
                dom,
                name,
                children,
                ..
            } => {
                let mut a = s(&["delete", dom, name]);
                if *children {
                    a.push("--children".into());
                }
                a
            }
            Action::Domain { dom, verb, paused } => {
                let mut a = s(&["domain", verb, dom]);
                if *paused {
                    a.push("--paused".into());
                }
                a
            }
            Action::Gc => s(&["gc"]),
            Action::Recover => s(&["recover"]),
            Action::Verify => s(&["verify"]),
        }
    }

    /// The operation kind in failpoint names.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Create { .. } => "create",
            Action::Revert { .. } => "revert",
            Action::Delete { .. } => "delete",
            Action::Domain { .. } => "domain",
            Action::Gc => "gc",
            Action::Recover => "recover",
            Action::Verify => "verify",
        }
    }
}

/// The catalog of a domain: name → its `list --json` entry.
fn catalog(world: &mut World, dom: &str) -> Result<Vec<Value>, String> {
    Ok(world.json(&["list", dom])?.as_array().unwrap().clone())
}

/// Subtree of `name` (itself first) from `list --json` entries.
fn subtree(list: &[Value], name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i].clone();
        for s in list {
            if s["parent"].as_str() == Some(cur.as_str()) {
                out.push(s["name"].as_str().unwrap().to_string());
            }
        }
        i += 1;
    }
    out
}

/// Chooses a valid action for the model's present state.
pub fn choose(world: &mut World, rng: &mut Rng) -> Result<Action, String> {
    let di = rng.below(world.doms.len() as u64) as usize;
    let dom = world.doms[di].clone();
    let state = dom.state();
    let nsnaps = dom.snaps.len() as u64;
    let active = state.is_active();
    // Weights: create, disk-only, revert, delete, domain command, gc, recover, verify.
    let weights = [
        if active { 26 } else { 0 },
        if active { 5 } else { 12 },
        if nsnaps > 0 { 22 } else { 0 },
        if nsnaps > 0 {
            8 + 6 * nsnaps.saturating_sub(4)
        } else {
            0
        },
        14,
        3,
        1,
        1,
    ];
    let name = dom.name.clone();
    Ok(match rng.weighted(&weights) {
        0 => Action::Create {
            name: world.fresh_name(),
            dom: name,
            disk_only: false,
            crash_consistent: false,
            external: dom.external,
        },
        1 => Action::Create {
            name: world.fresh_name(),
            dom: name,
            disk_only: true,
            crash_consistent: state == State::Running,
            external: dom.external,
        },
        2 => {
            let list = catalog(world, &name)?;
            let snap = rng.pick(&list).clone();
            let checkpoint = snap["kind"] == "checkpoint";
            let flag = match rng.below(10) {
                0..=3 => Some(State::Paused),
                4..=5 => Some(State::Running),
                _ => None,
            };
            let target = match (flag, checkpoint) {
                (Some(f), _) => f,
                (None, true) => State::parse(snap["domain_state"].as_str().unwrap()),
                (None, false) => State::Shutoff,
            };
            Action::Revert {
                dom: name,
                name: snap["name"].as_str().unwrap().to_string(),
                flag,
                target,
            }
        }
        3 => {
            let list = catalog(world, &name)?;
            let snap = rng.pick(&list)["name"].as_str().unwrap().to_string();
            let children = rng.chance(25);
            let names = if children {
                subtree(&list, &snap)
            } else {
                vec![snap.clone()]
            };
            Action::Delete {
                dom: name,
                name: snap,
                children,
                names,
            }
        }
        4 => {
            let verbs: &[&'static str] = match state {
                State::Running => &["pause", "pause", "shutdown", "destroy"],
                State::Paused => &["unpause", "unpause", "unpause", "destroy"],
                State::Shutoff => &["start"],
            };
            let verb = *rng.pick(verbs);
            Action::Domain {
                dom: name,
                verb,
                paused: verb == "start" && rng.chance(25),
            }
        }
        5 => Action::Gc,
        6 => Action::Recover,
        _ => Action::Verify,
    })
}

/// Chooses the fault of a round: none, a `kill -9` at a random moment, or a failpoint.
pub fn fault_for(world: &World, action: &Action, rng: &mut Rng) -> Fault {
    let kind = action.kind();
    if world.fs.is_some() && rng.chance(45) {
        return Fault::PowerCut(world.kill_delay(kind, rng));
    }
    match rng.below(10) {
        0..=3 => Fault::None,
        4..=6 => Fault::Kill(world.kill_delay(kind, rng)),
        _ => {
            // Undo points fire only while a failed create is rolled back: see below.
            let crash: Vec<&str> = CRASH_POINTS
                .iter()
                .filter(|(k, n)| *k == kind && !n.contains("-undo-"))
                .map(|(_, n)| *n)
                .collect();
            let errors: Vec<&str> = ERROR_POINTS
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, n)| *n)
                .collect();
            if crash.is_empty() && errors.is_empty() {
                return Fault::Kill(world.kill_delay(kind, rng));
            }
            let use_error = crash.is_empty() || (!errors.is_empty() && rng.chance(30));
            let (name, is_crash) = if use_error {
                (*rng.pick(&errors), false)
            } else {
                (*rng.pick(&crash), true)
            };
            // Steps that run once per disk can be hit on a later pass.
            let skip = if name.contains("-disk") && rng.chance(40) {
                "1*off->"
            } else {
                ""
            };
            let mut spec = format!("{name}={skip}return");
            // An error, then a crash while it is rolled back.
            if !is_crash && kind == "create" && rng.chance(30) {
                let undo = *rng.pick(&[
                    "engine::create::before-undo-snapshot-disk",
                    "engine::create::after-undo-snapshot-disk",
                    "engine::create::before-undo-save-memory",
                ]);
                spec.push_str(&format!(";{undo}=return"));
            }
            Fault::Failpoint {
                spec,
                crash: is_crash,
            }
        }
    }
}

/// Whether the way a command ended is allowed for its fault.
fn allowed(ran: &Ran, fault: &Fault) -> bool {
    match (ran.ended, fault) {
        (Ended::Exit(0), _) => true,
        (Ended::Killed, Fault::Kill(_)) => true,
        // A failpoint's abort (SIGABRT), possibly after a step failed.
        (Ended::Crashed(6), Fault::Failpoint { .. }) => true,
        // A step failed by an error failpoint: exit 1, rolled back or left to recovery; or
        // exit 5, past a revert's point of no return, marked as needing `domsnap recover`.
        (Ended::Exit(1 | 5), Fault::Failpoint { crash: false, .. }) => true,
        // Killed by the cut, or failed on the frozen file system just before.
        (Ended::Killed | Ended::Exit(1), Fault::PowerCut(_)) => true,
        _ => false,
    }
}

/// Runs `recover` until it succeeds; each attempt but the last may be interrupted too: by
/// `kill -9`, or at a failpoint of the interrupted operation's kind (recovery runs the same
/// steps) or of recovery itself.
pub fn recover(world: &mut World, rng: &mut Rng, kind: &'static str) -> Result<(), String> {
    for attempt in 0..4 {
        let fault = if attempt < 3 && rng.chance(35) {
            if world.fs.is_some() && rng.chance(40) {
                Fault::PowerCut(world.kill_delay("recover", rng))
            } else if rng.chance(50) {
                Fault::Kill(world.kill_delay("recover", rng))
            } else {
                let points: Vec<&str> = CRASH_POINTS
                    .iter()
                    .filter(|(k, _)| *k == kind || *k == "recover")
                    .map(|(_, n)| *n)
                    .collect();
                let name = *rng.pick(&points);
                Fault::Failpoint {
                    spec: format!("{name}=return"),
                    crash: true,
                }
            }
        } else {
            Fault::None
        };
        let ran = world.run(&["recover", "--json", "--wait", "120"], &fault);
        world.note(format!(
            "    recovery: {} with {}",
            ran.describe(),
            fault.describe()
        ));
        if ran.ok() && matches!(fault, Fault::None) {
            world.took("recover", ran.millis);
            return Ok(());
        }
        if !allowed(&ran, &fault) {
            return Err(format!("recovery ended badly: {}", ran.describe()));
        }
    }
    unreachable!("the last attempt has no fault")
}

/// One round: act, interrupt, recover, account for what the journal says happened.
pub fn round(world: &mut World, rng: &mut Rng, n: u64) -> Result<(), String> {
    let action = choose(world, rng)?;
    let fault = fault_for(world, &action, rng);
    let mut args = action.args();
    args.extend(["--wait".to_string(), "120".to_string()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let ran = world.run(&argv, &fault);
    world.note(format!(
        "round {n}: {} with {}",
        ran.describe(),
        fault.describe()
    ));
    if !allowed(&ran, &fault) {
        return Err(format!("unexpected end: {}", ran.describe()));
    }
    if let (
        Ended::Exit(1),
        Action::Create { .. } | Action::Revert { .. },
        Fault::Failpoint { .. },
    ) = (ran.ended, &action, &fault)
    {
        // A failed step is reported with its name and what became of the operation.
        if !ran.stderr.contains("step") {
            return Err(format!("a failed step is not named: {}", ran.describe()));
        }
    }
    if ran.ok() && matches!(fault, Fault::None) {
        world.took(action.kind(), ran.millis);
    }
    if !ran.ok() {
        recover(world, rng, action.kind())?;
    }
    settle(world, &action, &ran)
}

/// Brings the model up to date: the journal's new operations, and `domain` commands
/// (not journaled: an interrupted one is finished by running it again).
fn settle(world: &mut World, action: &Action, ran: &Ran) -> Result<(), String> {
    let cut = std::mem::take(&mut world.cut);
    for d in &mut world.doms {
        d.reverted = None;
        if cut {
            // Every guest died with the power; what a rolled-forward revert starts again
            // is accounted for below.
            d.set_state(State::Shutoff);
            d.coherent = false;
        }
    }
    world.history = history(&world.env);
    let new: Vec<Value> = world
        .history
        .iter()
        .filter(|o| o["id"].as_u64().unwrap() > world.last_op)
        .cloned()
        .collect();
    for op in &new {
        let id = op["id"].as_u64().unwrap();
        world.last_op = world.last_op.max(id);
        let outcome = op["outcome"].as_str().unwrap();
        let (kind, dom, snap) = (
            op["kind"].as_str().unwrap(),
            op["domain"].as_str().unwrap().to_string(),
            op["snapshot"].as_str().unwrap().to_string(),
        );
        world.note(format!("    op {id}: {kind} {dom}/{snap} {outcome}"));
        let took_effect = match outcome {
            "committed" | "rolled-forward" => true,
            "rolled-back" => false,
            _ => return Err(format!("operation {id} ended {outcome}: {op}")),
        };
        if !took_effect {
            continue;
        }
        match (kind, action) {
            ("create", Action::Create { dom: d, name, .. }) if *d == dom && *name == snap => {
                world
                    .dom_mut(&dom)
                    .snaps
                    .insert(snap.clone(), Default::default());
            }
            (
                "revert",
                Action::Revert {
                    dom: d,
                    name,
                    target,
                    ..
                },
            ) if *d == dom && *name == snap => {
                let m = world.dom_mut(&dom);
                m.set_state(*target);
                if cut {
                    // A revert done (or finished by recovery up to its last step) before
                    // the power went is shut off with everything else; one whose run state
                    // recovery still had to set is in it.
                    m.state.insert(State::Shutoff);
                }
                m.reverted = Some((snap.clone(), *target));
            }
            (
                "delete",
                Action::Delete {
                    dom: d,
                    name,
                    names,
                    ..
                },
            ) if *d == dom && *name == snap => {
                let m = world.dom_mut(&dom);
                for n in names {
                    m.snaps.remove(n);
                }
            }
            // A `domain` command is an operation too; what it did is accounted for below,
            // but for a start that took effect across a power cut: done before the power
            // went, the domain is shut off with everything else; finished by recovery
            // afterwards (it is rolled forward), its boot runs.
            (
                k,
                Action::Domain {
                    dom: d,
                    verb,
                    paused,
                },
            ) if *d == dom && k == *verb => {
                if cut && *verb == "start" {
                    let m = world.dom_mut(&dom);
                    m.state.insert(if *paused {
                        State::Paused
                    } else {
                        State::Running
                    });
                }
            }
            _ => {
                return Err(format!(
                    "operation {id} ({kind} {dom}/{snap}) matches no request"
                ))
            }
        }
    }
    if let (Action::Gc, false) = (action, ran.ok()) {
        // An interrupted gc leaves the pack files it replaced on disk, named by nothing;
        // gc is not a journaled operation, so recovery does not finish it.
        let verify = world.run(&["verify", "--json"], &Fault::None);
        if verify.ended == Ended::Exit(4) && verify.stdout.contains("is named by nothing") {
            world.known_defect(
                "interrupted-gc-leaves-packs",
                "after an interrupted gc, verify reports pack files named by nothing",
            )?;
            let again = world.run(&["gc"], &Fault::None);
            if !again.ok() {
                return Err(format!("gc after an interrupted gc: {}", again.describe()));
            }
        }
    }
    if let Action::Domain { dom, verb, paused } = action {
        let target = match (*verb, *paused) {
            ("start", true) | ("pause", _) => State::Paused,
            ("start", false) | ("unpause", _) => State::Running,
            _ => State::Shutoff,
        };
        if cut {
            // The domain died with the power, whatever the command had done.
            return Ok(());
        }
        if ran.interrupted() {
            // Finish what the operator asked for; it may have been done already.
            let mut args = vec!["domain", verb, dom.as_str()];
            if *paused {
                args.push("--paused");
            }
            let again = world.run(&args, &Fault::None);
            world.note(format!("    again: {}", again.describe()));
            // Run again, the command is an operation of this round too.
            world.history = history(&world.env);
            for op in &world.history {
                world.last_op = world.last_op.max(op["id"].as_u64().unwrap());
            }
            if !matches!(again.ended, Ended::Exit(0) | Ended::Exit(2)) {
                return Err(format!("repeating a domain command: {}", again.describe()));
            }
            let now = world.host_state(dom)?;
            if *verb == "start" && !*paused && now == State::Paused {
                // The simulated host boots a guest paused, then unpauses it: recovery
                // finishes an interrupted start on that boot, so it never stays paused.
                return Err(format!("a killed `domain start {dom}` left it paused"));
            }
        }
        if ran.ok() || ran.interrupted() {
            let m = world.dom_mut(dom);
            m.set_state(target);
            if matches!(*verb, "start" | "shutdown" | "destroy") {
                m.coherent = false;
            }
        }
    }
    Ok(())
}
