//! The one checker run after every round. It holds when:
//!
//! 1. no operation is open or failed (`history`);
//! 2. `verify --deep` is clean: the catalog equals the catalog rebuilt from the events, every
//!    disk's snapshot table lists the catalog's tags, the memory store's counts agree, and
//!    every chunk of every catalog image is present and hashes to its id;
//! 3. every domain is in the run state the model promises (a crash never leaves one paused);
//! 4. the catalog holds exactly the snapshots the journal's outcomes say it should;
//! 5. every disk image is clean for `qemu-img check`, and its snapshot table, as
//!    `qemu-img` reads it, lists exactly the catalog's tags; every frozen image of an external
//!    snapshot exists and is clean;
//! 6. after a revert, the domain's counters are exactly the snapshot's: xvda holds what
//!    the snapshot's own xvda holds, memory what it held at every earlier revert to it, and
//!    (for a checkpoint of a domain that had been counting) memory and disk belong to one
//!    instant (`disk ∈ {memory, memory + 1}`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use xen::Host;

use crate::common::{disk_u64, qemu_snapshot_names};

use super::{Ended, Fault, State, World};

/// `qemu-img check` of one image; `Err` with its report unless clean (no corruption, no leak).
fn qemu_check(path: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(path)
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img check {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The counter at offset 0 of an internal snapshot's content.
fn snapshot_counter(image: &Path, tag: &str, scratch: &Path) -> Result<u64, String> {
    let raw = scratch.join("snap.raw");
    let _ = std::fs::remove_file(&raw);
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw", "-l"])
        .arg(format!("snapshot.name={tag}"))
        .arg(image)
        .arg(&raw)
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert -l snapshot.name={tag} {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let bytes = std::fs::read(&raw).map_err(|e| format!("read {}: {e}", raw.display()))?;
    let _ = std::fs::remove_file(&raw);
    Ok(u64::from_le_bytes(bytes[..8].try_into().unwrap()))
}

fn memory_counter(path: &Path) -> Result<u64, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(u64::from_le_bytes(bytes[..8].try_into().unwrap()))
}

/// Checks every invariant; returns every problem found (empty: all hold).
pub fn check(world: &mut World) -> Result<(), String> {
    let mut problems: Vec<String> = Vec::new();

    // 1. Nothing open, nothing abandoned (the history the round ended with).
    for op in &world.history {
        let outcome = op["outcome"].as_str().unwrap_or("?");
        if outcome == "open" || outcome == "failed" || outcome == "needs-recovery" {
            problems.push(format!("operation {} is {outcome}: {op}", op["id"]));
        }
    }

    // 2. verify --deep.
    let ran = world.run(&["verify", "--deep", "--json"], &Fault::None);
    if ran.ended != Ended::Exit(0) {
        problems.push(format!("verify --deep: {}\n{}", ran.describe(), ran.stdout));
    }

    // 3. Run states, as the host sees them.
    let host = world.host();
    let mut infos: BTreeMap<String, xen::DomainInfo> = BTreeMap::new();
    for info in host
        .domains()
        .map_err(|e| format!("the host's domains: {e}"))?
    {
        infos.insert(info.name.clone(), info);
    }
    let names: Vec<String> = world.doms.iter().map(|d| d.name.clone()).collect();
    let mut paused_by_us = Vec::new();
    for name in &names {
        let info = infos
            .get(name)
            .ok_or_else(|| format!("domain {name} is gone from the host"))?;
        let actual = State::parse(&info.state.to_string());
        let model = world.dom(name);
        if !model.state.contains(&actual) {
            problems.push(format!(
                "domain {name} is {} but should be {:?}",
                actual.name(),
                model.state
            ));
        }
        world.dom_mut(name).set_state(actual);
        if actual == State::Running {
            // Paused for the image checks (the guest writes xvda all the time).
            host.pause(name)
                .map_err(|e| format!("pausing {name} to check it: {e}"))?;
            paused_by_us.push(name.clone());
        }
    }

    // 4.–6. Per domain: catalog, images, counters.
    for name in &names {
        if let Err(p) = check_domain(world, name, &infos[name], paused_by_us.contains(name)) {
            problems.extend(p);
        }
    }

    for name in &paused_by_us {
        host.unpause(name)
            .map_err(|e| format!("unpausing {name} after the check: {e}"))?;
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn check_domain(
    world: &mut World,
    name: &str,
    info: &xen::DomainInfo,
    was_running: bool,
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let list = world
        .json(&["list", name])
        .map_err(|e| vec![e])?
        .as_array()
        .unwrap()
        .clone();
    let catalog: BTreeMap<String, Value> = list
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s.clone()))
        .collect();

    // 4. The catalog holds what the outcomes say.
    let expected: BTreeSet<&String> = world.dom(name).snaps.keys().collect();
    let present: BTreeSet<&String> = catalog.keys().collect();
    if expected != present {
        problems.push(format!(
            "{name}: catalog has {present:?}, the journal's outcomes say {expected:?}"
        ));
    }

    // 5. Images.
    let disks: Vec<(String, PathBuf)> = info
        .disks
        .iter()
        .map(|d| (d.target.clone(), d.path.clone()))
        .collect();
    for (target, path) in &disks {
        if let Err(e) = qemu_check(path) {
            problems.push(e);
        }
        let tags: BTreeSet<String> = catalog
            .values()
            .flat_map(|s| s["disks"].as_array().unwrap().clone())
            .filter(|d| d["target"] == target.as_str() && d["external"] == false)
            .map(|d| d["tag"].as_str().unwrap().to_string())
            .collect();
        let table = qemu_snapshot_names(path);
        if table != tags {
            problems.push(format!(
                "{name}/{target}: qemu-img lists {table:?}, the catalog {tags:?}"
            ));
        }
    }
    for s in catalog.values() {
        for d in s["disks"].as_array().unwrap() {
            if d["external"] == true {
                let frozen = PathBuf::from(d["path"].as_str().unwrap());
                if !frozen.exists() {
                    problems.push(format!(
                        "{name}/{}: frozen image {} of {} is missing",
                        d["target"],
                        frozen.display(),
                        s["name"]
                    ));
                } else if let Err(e) = qemu_check(&frozen) {
                    problems.push(e);
                }
            }
        }
    }

    // Learn what is new: each snapshot's xvda counter, read from the snapshot itself.
    let scratch = world.log_dir();
    for (snap, s) in &catalog {
        let known = world
            .dom(name)
            .snaps
            .get(snap)
            .is_some_and(|m| m.disk.is_some());
        if known {
            continue;
        }
        let xvda = s["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["target"] == "xvda")
            .cloned();
        let Some(xvda) = xvda else { continue };
        let counter = if xvda["external"] == true {
            Ok(disk_u64(Path::new(xvda["path"].as_str().unwrap())))
        } else {
            let current = &disks.iter().find(|(t, _)| t == "xvda").unwrap().1;
            snapshot_counter(current, xvda["tag"].as_str().unwrap(), &scratch)
        };
        let coherent = world.dom(name).coherent;
        match counter {
            Ok(c) => {
                let m = world.dom_mut(name).snaps.entry(snap.clone()).or_default();
                m.disk = Some(c);
                m.checkpoint = s["kind"] == "checkpoint";
                if m.checkpoint && m.coherent.is_none() {
                    m.coherent = Some(coherent);
                }
            }
            Err(e) => problems.push(e),
        }
    }

    // 6. Counters after a revert.
    let state = world.dom(name).state();
    let memory_path = info.memory_path.clone();
    let xvda_path = disks
        .iter()
        .find(|(t, _)| t == "xvda")
        .map(|(_, p)| p.clone());
    let live = |problems: &mut Vec<String>| -> Option<(u64, u64)> {
        let m = memory_path.as_deref().map(memory_counter)?;
        let d = disk_u64(xvda_path.as_deref()?);
        match m {
            Ok(m) => Some((m, d)),
            Err(e) => {
                problems.push(e);
                None
            }
        }
    };
    if let Some((snap, target)) = world.dom(name).reverted.clone() {
        let model = world
            .dom(name)
            .snaps
            .get(&snap)
            .cloned()
            .unwrap_or_default();
        match (target, state) {
            (State::Paused, State::Paused) if !was_running => {
                if let Some((m, d)) = live(&mut problems) {
                    if Some(d) != model.disk {
                        problems.push(format!(
                            "{name} reverted to {snap}: xvda counter {d}, the snapshot's is {:?}",
                            model.disk
                        ));
                    }
                    if model.checkpoint {
                        match model.memory {
                            Some(expect) if expect != m => problems.push(format!(
                                "{name} reverted to {snap}: memory counter {m}, earlier reverts \
                                 gave {expect}"
                            )),
                            _ => {}
                        }
                        if model.coherent == Some(true) && d != m && d != m + 1 {
                            problems.push(format!(
                                "{name} reverted to {snap}: memory {m} and xvda {d} are not \
                                 one instant"
                            ));
                        }
                        let entry = world.dom_mut(name).snaps.get_mut(&snap).unwrap();
                        entry.memory = Some(m);
                    }
                }
            }
            (State::Shutoff, State::Shutoff) => {
                if let Some(p) = &xvda_path {
                    let d = disk_u64(p);
                    if Some(d) != model.disk {
                        problems.push(format!(
                            "{name} reverted to {snap} (shut off): xvda counter {d}, the \
                             snapshot's is {:?}",
                            model.disk
                        ));
                    }
                }
            }
            _ => {}
        }
        let coherent = model.checkpoint && model.coherent == Some(true);
        world.dom_mut(name).coherent = coherent;
    }
    // A domain seen counting (running until we paused it) has memory and disk at one
    // instant from now on; its next checkpoints must too.
    if was_running {
        if let Some((m, d)) = live(&mut problems) {
            let counting = d == m || d == m + 1;
            let dom = world.dom_mut(name);
            dom.coherent = dom.coherent || counting;
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}
