//! Human and `--json` output of every command.

use serde_json::json;

use engine::memstore::GcReport;
use engine::recovery::Recovered;
use engine::{AdoptReport, OpView, OpenOp, SnapshotView, VerifyReport};
use journal::DomainCatalog;
use xen::DomainInfo;

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn domain_json(info: &DomainInfo) -> serde_json::Value {
    json!({
        "name": info.name,
        "state": info.state.to_string(),
        "instance": info.instance,
        "memory": {
            "path": info.memory_path.as_ref().map(|p| p.display().to_string()),
            "bytes": info.memory_bytes,
        },
        "disks": info.disks.iter().map(|d| json!({
            "target": d.target,
            "path": d.path.display().to_string(),
            "format": d.format,
        })).collect::<Vec<_>>(),
    })
}

fn open_text(open: &OpenOp) -> String {
    let what = if open.snapshot.is_empty() {
        open.kind.as_str().to_string()
    } else {
        format!("{} of {}", open.kind.as_str(), open.snapshot)
    };
    match (&open.error, open.needs_recovery) {
        (Some(e), true) => format!(
            "operation {} ({what}) needs recovery: {e}; run `domsnap recover`",
            open.op
        ),
        (None, true) => format!(
            "operation {} ({what}) needs recovery; run `domsnap recover`",
            open.op
        ),
        _ => format!(
            "operation {} ({what}) is open: in progress, or interrupted and waiting for the \
             next command that writes to recover it",
            open.op
        ),
    }
}

/// Tells on stderr that `domain` has an unfinished operation.
pub fn warn_unfinished(domain: &str, open: &OpenOp) {
    eprintln!("domsnap: warning: domain {domain}: {}", open_text(open));
}

/// `domain info` (with the domain's unfinished operation) and the result of other `domain`
/// commands.
pub fn domain(info: &DomainInfo, open: Option<&OpenOp>, json: bool) -> anyhow::Result<()> {
    if json {
        let mut v = domain_json(info);
        v["unfinished"] = serde_json::to_value(open)?;
        return print_json(&v);
    }
    println!("domain {}: {}", info.name, info.state);
    if let Some(open) = open {
        println!("  {}", open_text(open));
    }
    println!("  memory  {}", bytes(info.memory_bytes));
    if let Some(p) = &info.memory_path {
        println!("          {}", p.display());
    }
    for d in &info.disks {
        println!("  {:<6}  {} ({})", d.target, d.path.display(), d.format);
    }
    Ok(())
}

/// `domain undefine`.
pub fn undefined(name: &str, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&json!({ "undefined": name }));
    }
    println!("domain {name} undefined");
    Ok(())
}

/// `domain list`.
pub fn domains(list: &[DomainInfo], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::Value::Array(
            list.iter().map(domain_json).collect(),
        ));
    }
    if list.is_empty() {
        println!("no domains");
    }
    for d in list {
        println!(
            "{:<20} {:<8} {:>10}  {} disk(s)",
            d.name,
            d.state.to_string(),
            bytes(d.memory_bytes),
            d.disks.len()
        );
    }
    Ok(())
}

fn snapshot_json(s: &SnapshotView) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or_default()
}

/// `create`.
pub fn created(s: &SnapshotView, ops: &[OpView], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&snapshot_json(s));
    }
    println!(
        "created {} snapshot {} of domain {} (parent: {})",
        s.kind,
        s.name,
        ops.first().map(|o| o.domain.as_str()).unwrap_or("?"),
        s.parent.as_deref().unwrap_or("none")
    );
    if let Some(op) = ops.first() {
        for step in &op.steps {
            let mut line = format!(
                "  {:<24} {:>6} ms",
                step.name,
                step.duration_ms.unwrap_or(0)
            );
            if let (Some(read), Some(new)) = (step.bytes_read, step.bytes_new) {
                line.push_str(&format!("  {} read, {} new", bytes(read), bytes(new)));
            }
            println!("{line}");
        }
    }
    if s.crash_consistent {
        println!("  note: crash-consistent only (disks of a running domain, no memory)");
    }
    Ok(())
}

/// `revert`.
pub fn reverted(domain: &str, name: &str, info: &DomainInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&json!({
            "domain": domain,
            "snapshot": name,
            "state": info.state.to_string(),
        }));
    }
    println!(
        "reverted domain {domain} to snapshot {name}; it is {}",
        info.state
    );
    Ok(())
}

/// `delete`.
pub fn deleted(domain: &str, names: &[String], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&json!({ "domain": domain, "deleted": names }));
    }
    for n in names {
        println!("deleted snapshot {n} of domain {domain}");
    }
    Ok(())
}

/// `list`.
pub fn list(domain: &str, snaps: &[SnapshotView], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::Value::Array(
            snaps.iter().map(snapshot_json).collect(),
        ));
    }
    if snaps.is_empty() {
        println!("domain {domain} has no snapshots");
        return Ok(());
    }
    println!(
        "{:<2}{:<24} {:<11} {:<9} {:<25} {:<16} parent",
        "", "name", "kind", "state", "created", "memory"
    );
    for s in snaps {
        println!(
            "{:<2}{:<24} {:<11} {:<9} {:<25} {:<16} {}",
            if s.current { "*" } else { "" },
            s.name,
            s.kind,
            s.domain_state,
            s.created,
            s.memory_image
                .as_deref()
                .map(|h| format!("{}…", &h[..h.len().min(12)]))
                .unwrap_or_else(|| "-".into()),
            s.parent.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// `list --tree`.
pub fn tree(catalog: &DomainCatalog, domain: &str) -> anyhow::Result<()> {
    if catalog.snapshots.is_empty() {
        println!("domain {domain} has no snapshots");
        return Ok(());
    }
    println!("{domain}");
    fn walk(c: &DomainCatalog, name: Option<&str>, prefix: &str) {
        let kids = c.children(name);
        for (i, s) in kids.iter().enumerate() {
            let last = i + 1 == kids.len();
            let marker = if c.current.as_deref() == Some(&s.name) {
                "  <- current"
            } else {
                ""
            };
            println!(
                "{prefix}{}{} ({}){marker}",
                if last { "└── " } else { "├── " },
                s.name,
                s.kind.as_str()
            );
            let next = format!("{prefix}{}", if last { "    " } else { "│   " });
            walk(c, Some(&s.name), &next);
        }
    }
    walk(catalog, None, "");
    Ok(())
}

/// `info`.
pub fn info(s: &SnapshotView, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&snapshot_json(s));
    }
    println!(
        "snapshot {}{}",
        s.name,
        if s.current { " (current)" } else { "" }
    );
    println!("  kind          {}", s.kind);
    println!("  created       {} (operation {})", s.created, s.op);
    println!("  domain state  {}", s.domain_state);
    println!("  parent        {}", s.parent.as_deref().unwrap_or("-"));
    if !s.children.is_empty() {
        println!("  children      {}", s.children.join(", "));
    }
    if let Some(img) = &s.memory_image {
        println!("  memory        {} ({})", img, bytes(s.memory_bytes));
    }
    for d in &s.disks {
        println!("  {:<6}        {} in {}", d.target, d.tag, d.path);
    }
    if let Some(desc) = &s.description {
        println!("  description   {desc}");
    }
    if s.crash_consistent {
        println!("  consistency   crash-consistent only");
    }
    Ok(())
}

/// `history`.
pub fn history(ops: &[OpView], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::to_value(ops)?);
    }
    if ops.is_empty() {
        println!("no operations");
    }
    for op in ops {
        let what = if op.snapshot.is_empty() {
            op.domain.clone()
        } else {
            format!("{}/{}", op.domain, op.snapshot)
        };
        println!(
            "#{:<5} {} {:<8} {what}  by {} on {}: {}",
            op.id, op.started, op.kind, op.user, op.host, op.outcome
        );
        if let Some(r) = &op.recovery {
            println!("       recovery: {r}");
        }
        if let Some(r) = &op.reason {
            println!("       reason: {r}");
        }
        for s in &op.steps {
            let mut line = format!(
                "       {:<28} {:<11} {:>6} ms",
                s.name,
                s.outcome,
                s.duration_ms
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "-".into())
            );
            if let Some(read) = s.bytes_read {
                line.push_str(&format!("  {} read", bytes(read)));
            }
            if let Some(new) = s.bytes_new {
                line.push_str(&format!(", {} new", bytes(new)));
            }
            if let Some(e) = &s.error {
                line.push_str(&format!("  error: {e}"));
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// `recover`.
pub fn recovered(report: &[Recovered], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::to_value(report)?);
    }
    if report.is_empty() {
        println!("nothing to recover");
    }
    for r in report {
        let what = if r.snapshot.is_empty() {
            r.domain.clone()
        } else {
            format!("{}/{}", r.domain, r.snapshot)
        };
        if r.decision.is_empty() {
            println!("operation {} ({} {what}): {}", r.op, r.kind, r.result);
        } else {
            println!(
                "operation {} ({} {what}): rolled {} — {}; {}",
                r.op, r.kind, r.decision, r.reason, r.result
            );
        }
    }
    Ok(())
}

/// `verify`.
pub fn verified(report: &VerifyReport, json: bool) -> anyhow::Result<()> {
    if json {
        let mut v = serde_json::to_value(report)?;
        v["ok"] = json!(report.is_clean());
        return print_json(&v);
    }
    for note in &report.notes {
        println!("disk: {note}");
    }
    if report.is_clean() {
        println!("verify: journal, catalog, disk snapshot tables and memory images agree");
        return Ok(());
    }
    for (what, list) in [
        ("identity", &report.identity),
        ("journal", &report.journal),
        ("disks", &report.disks),
        ("memory", &report.memory),
        ("files", &report.files),
    ] {
        for p in list {
            println!("{what}: {p}");
        }
    }
    Ok(())
}

/// `recover --adopt`.
pub fn adopted(r: &AdoptReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::to_value(r)?);
    }
    println!(
        "adopted: a new journal for state {}, operation ids from {}",
        r.state, r.first_op
    );
    if let Some(old) = &r.replaced {
        println!("  the journal it replaces was moved to {}", old.display());
    }
    for d in &r.domains {
        println!(
            "  domain {}: {} snapshot(s) (operation {}){}{}",
            d.domain,
            d.snapshots.len(),
            d.op,
            if d.snapshots.is_empty() { "" } else { ": " },
            d.snapshots.join(", ")
        );
    }
    for p in &r.problems {
        println!("  not rebuilt: {p}");
    }
    Ok(())
}

/// `gc`.
pub fn gc(r: &GcReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&json!({
            "chunks_removed": r.chunks_removed,
            "bytes_freed": r.bytes_freed,
            "packs_removed": r.packs_removed,
            "packs_rewritten": r.packs_rewritten,
            "manifests_removed": r.manifests_removed,
            "unknown": r.unknown,
        }));
    }
    println!(
        "gc: {} chunks removed, {} freed, {} packs removed, {} rewritten, {} manifests removed",
        r.chunks_removed,
        bytes(r.bytes_freed),
        r.packs_removed,
        r.packs_rewritten,
        r.manifests_removed
    );
    for u in &r.unknown {
        println!("  kept, not known to the journal: {u}");
    }
    Ok(())
}
