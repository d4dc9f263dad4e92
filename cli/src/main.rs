//! `domsnap`: crash-safe snapshots of Xen domains.
//!
//! Exit codes, from the kind of the error ([`engine::ErrorKind`]), never from its text:
//! - 0 success;
//! - 1 the operation failed (the message says what was rolled back or what the next
//!   command finishes);
//! - 2 bad input or a request that cannot be carried out as asked (nothing was changed);
//! - 3 another domsnap operation holds the domain (nothing was changed);
//! - 4 `verify` found problems;
//! - 5 the domain has an unfinished operation that needs `domsnap recover` (nothing was
//!   changed), or `recover` left one unfinished;
//! - 6 stored state is damaged or does not add up (journal, memory store, images);
//! - 7 the journal does not belong with the state directory's stores (missing, another
//!   state directory's, an older copy put back): nothing was changed; `domsnap recover
//!   --adopt` is the way out.

mod args;
mod demo;
mod output;
mod progress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use args::{Cli, Command, DomainCommand, HostKind};
use engine::{
    Access, CreateRequest, DeleteRequest, DiskCheck, DomainAction, Engine, ErrorKind,
    HistoryFilter, RecoverMode, RevertRequest,
};
use journal::DomainState;
use xen::sim::SimHost;
use xen::{DomainSpec, Host};

/// Exit status when the operation failed.
const EXIT_FAILURE: u8 = 1;
/// Exit status for bad input.
const EXIT_USAGE: u8 = 2;
/// Exit status when another operation holds the domain.
const EXIT_BUSY: u8 = 3;
/// Exit status when `verify` finds problems.
const EXIT_PROBLEMS: u8 = 4;
/// Exit status when a domain has an operation only `domsnap recover` may continue.
const EXIT_NEEDS_RECOVERY: u8 = 5;
/// Exit status when stored state is damaged.
const EXIT_CORRUPTION: u8 = 6;
/// Exit status when the journal does not belong with the stores beside it.
const EXIT_IDENTITY: u8 = 7;

/// An error that was caused by the request, not by a failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// `verify` found problems (already printed).
#[derive(Debug, thiserror::Error)]
#[error("verify found problems")]
struct Problems;

/// `recover` left operations open (already printed).
#[derive(Debug, thiserror::Error)]
#[error("{0} operation(s) could not be recovered; see above")]
struct Unrecovered(usize);

fn main() -> ExitCode {
    // Guest memory, disks, configurations and the journal are private, whatever the umask
    // domsnap was started with; simulated guests inherit it.
    // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    let mut raw = std::env::args_os();
    let _exe = raw.next();
    let first = raw.next();
    if first.as_deref() == Some(std::ffi::OsStr::new(xen::sim::GUEST_ARG)) {
        xen::sim::guest_main_from_args(raw);
    }
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let kind = error_kind(&err);
            let code = exit_code(&err, kind);
            if code != EXIT_PROBLEMS {
                if json {
                    let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
                    let value = serde_json::json!({
                        "error": chain.join(": "),
                        "kind": kind.map(ErrorKind::as_str),
                        "exit_code": code,
                    });
                    eprintln!("{value}");
                } else {
                    eprintln!("domsnap: error: {err}");
                    for cause in err.chain().skip(1) {
                        eprintln!("  caused by: {cause}");
                    }
                    // A failed step's own message says what became of its operation.
                    let step_failed = matches!(
                        err.downcast_ref::<engine::Error>(),
                        Some(engine::Error::StepFailed { .. })
                    );
                    if kind.is_some_and(ErrorKind::changed_nothing) && !step_failed {
                        eprintln!("  nothing was changed");
                    }
                }
            }
            ExitCode::from(code)
        }
    }
}

/// The kind of a command's error; None for `verify`'s and `recover`'s own reports.
fn error_kind(err: &anyhow::Error) -> Option<ErrorKind> {
    if err.downcast_ref::<Problems>().is_some() || err.downcast_ref::<Unrecovered>().is_some() {
        return None;
    }
    if err.downcast_ref::<Usage>().is_some() {
        return Some(ErrorKind::User);
    }
    if let Some(e) = err.downcast_ref::<engine::Error>() {
        return Some(e.kind());
    }
    if let Some(e) = err.downcast_ref::<xen::Error>() {
        return Some(engine::host_kind(e));
    }
    Some(ErrorKind::Failure)
}

fn exit_code(err: &anyhow::Error, kind: Option<ErrorKind>) -> u8 {
    if err.downcast_ref::<Problems>().is_some() {
        return EXIT_PROBLEMS;
    }
    if err.downcast_ref::<Unrecovered>().is_some() {
        return EXIT_NEEDS_RECOVERY;
    }
    match kind {
        Some(ErrorKind::User) => EXIT_USAGE,
        Some(ErrorKind::Busy) => EXIT_BUSY,
        Some(ErrorKind::NeedsRecovery) => EXIT_NEEDS_RECOVERY,
        Some(ErrorKind::Corruption) => EXIT_CORRUPTION,
        Some(ErrorKind::Identity) => EXIT_IDENTITY,
        Some(ErrorKind::Failure) | None => EXIT_FAILURE,
    }
}

/// The state directory: `--state`, else `$DOMSNAP_STATE`, else a per-user data directory.
fn state_dir(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = arg.or_else(|| std::env::var_os("DOMSNAP_STATE").map(PathBuf::from)) {
        return Ok(dir);
    }
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if is_root {
        return Ok(PathBuf::from("/var/lib/domsnap"));
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(data).join("domsnap"));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| Usage("no state directory: give --state DIR or set DOMSNAP_STATE".into()))?;
    Ok(PathBuf::from(home).join(".local/share/domsnap"))
}

/// The host the command drives; `access` [`Access::Read`] opens it without creating
/// anything.
pub(crate) fn open_host(
    kind: HostKind,
    state: &Path,
    access: Access,
) -> anyhow::Result<Box<dyn Host>> {
    match (kind, access) {
        (HostKind::Sim, Access::Write) => Ok(Box::new(
            SimHost::open(state).map_err(engine::Error::from)?,
        )),
        (HostKind::Sim, Access::Read) => Ok(Box::new(
            SimHost::open_read_only(state).map_err(engine::Error::from)?,
        )),
        #[cfg(feature = "xen")]
        (HostKind::Xen, _) => Ok(Box::new(
            xen::xenhost::XenHost::open(state).map_err(engine::Error::from)?,
        )),
        #[cfg(not(feature = "xen"))]
        (HostKind::Xen, _) => Err(Usage(
            "this domsnap was built without Xen support: rebuild with `cargo build --release --features xen` on a dom0"
                .into(),
        )
        .into()),
    }
}

fn open_engine(
    cli_host: HostKind,
    state: &Path,
    access: Access,
    domain: Option<&str>,
    wait: u64,
    json: bool,
) -> anyhow::Result<Engine> {
    let host = open_host(cli_host, state, access)?;
    let observer = progress::observer(json);
    Ok(Engine::open(
        state,
        host,
        access,
        domain,
        Duration::from_secs(wait),
        observer,
    )?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    if let Command::Demo(args) = &cli.command {
        return demo::run(cli.state.clone(), args.keep, json);
    }
    let state = state_dir(cli.state)?;
    let open = |access, domain: Option<&str>| {
        open_engine(cli.host, &state, access, domain, cli.wait, json)
    };
    match cli.command {
        Command::Domain(DomainCommand::List) => {
            let engine = open(Access::Read, None)?;
            output::domains(&engine.host().domains()?, json)
        }
        Command::Domain(DomainCommand::Info { name }) => {
            let engine = open(Access::Read, None)?;
            let info = engine.host().domain(&name)?;
            output::domain(&info, engine.unfinished(&name)?.as_ref(), json)
        }
        Command::Domain(cmd) => {
            let (name, action) = domain_action(cmd)?;
            let mut engine = open(Access::Write, Some(&name))?;
            match engine.domain_command(&name, &action)? {
                Some(info) => output::domain(&info, None, json),
                None => output::undefined(&name, json),
            }
        }
        Command::Create(a) => {
            let name = match a.name {
                Some(n) => n,
                None => default_snapshot_name(),
            };
            let mut engine = open(Access::Write, Some(&a.domain))?;
            let meta = engine.create(&CreateRequest {
                domain: a.domain.clone(),
                name,
                disk_only: a.disk_only,
                crash_consistent: a.crash_consistent,
                external: a.external,
                description: a.description,
            })?;
            let view = engine.info(&a.domain, &meta.name)?;
            output::created(
                &view,
                &engine.history(&HistoryFilter {
                    op: Some(meta.op),
                    ..HistoryFilter::default()
                })?,
                json,
            )
        }
        Command::Revert(a) => {
            let state_arg = match (a.running, a.paused) {
                (true, _) => Some(DomainState::Running),
                (_, true) => Some(DomainState::Paused),
                _ => None,
            };
            let mut engine = open(Access::Write, Some(&a.domain))?;
            engine.revert(&RevertRequest {
                domain: a.domain.clone(),
                name: a.name.clone(),
                state: state_arg,
            })?;
            let info = engine.host().domain(&a.domain)?;
            output::reverted(&a.domain, &a.name, &info, json)
        }
        Command::Delete(a) => {
            let mut engine = open(Access::Write, Some(&a.domain))?;
            let names = engine.delete(&DeleteRequest {
                domain: a.domain.clone(),
                name: a.name.clone(),
                children: a.children,
            })?;
            output::deleted(&a.domain, &names, json)
        }
        Command::List(a) => {
            let engine = open(Access::Read, None)?;
            let list = engine.list(&a.domain)?;
            if let Some(open) = engine.unfinished(&a.domain)? {
                output::warn_unfinished(&a.domain, &open);
            }
            if a.tree && !json {
                output::tree(&engine.catalog(&a.domain)?, &a.domain)
            } else {
                output::list(&a.domain, &list, json)
            }
        }
        Command::Info(a) => {
            let engine = open(Access::Read, None)?;
            output::info(&engine.info(&a.domain, &a.name)?, json)
        }
        Command::History(a) => {
            let since = a.since.as_deref().map(parse_since).transpose()?;
            let engine = open(Access::Read, None)?;
            let ops = engine.history(&HistoryFilter {
                domain: a.domain,
                op: a.op,
                since,
            })?;
            output::history(&ops, json)
        }
        Command::Recover(a) if a.adopt => {
            let host = open_host(cli.host, &state, Access::Write)?;
            let (_engine, report) = Engine::adopt(
                &state,
                host,
                Duration::from_secs(cli.wait),
                progress::observer(json),
            )?;
            output::adopted(&report, json)
        }
        Command::Recover(a) => {
            // Opening for writing runs the automatic recovery; this one also retries what
            // needs recovery, and reports.
            let mut engine = open(Access::Write, None)?;
            let requested = engine.recover(RecoverMode::Requested { force: a.force })?;
            // What opening recovered counts too (else a `recover` right after a crash would
            // say "nothing to recover" about what it has just rolled back); an operation
            // retried now is reported as it ended now.
            let mut report: Vec<_> = engine
                .take_recovered_at_open()
                .into_iter()
                .filter(|r| !requested.iter().any(|q| q.op == r.op))
                .collect();
            report.extend(requested);
            output::recovered(&report, json)?;
            match report.iter().filter(|r| r.open).count() {
                0 => Ok(()),
                n => Err(Unrecovered(n).into()),
            }
        }
        Command::Verify(a) => {
            let access = if a.rebuild || a.repair {
                Access::Write
            } else {
                Access::Read
            };
            let mut engine = open(access, None)?;
            if a.rebuild {
                engine.rebuild_catalog()?;
            }
            let mode = match (a.disks, a.repair) {
                (_, true) => DiskCheck::Repair,
                (true, false) => DiskCheck::Check,
                _ => DiskCheck::Tables,
            };
            let (problems, notes) = engine.check_disks(a.domain.as_deref(), mode)?;
            let mut report = engine.verify(a.domain.as_deref(), a.deep)?;
            report.disks.extend(problems);
            report.notes = notes;
            output::verified(&report, json)?;
            if report.is_clean() {
                Ok(())
            } else {
                Err(Problems.into())
            }
        }
        Command::Gc => {
            let mut engine = open(Access::Write, None)?;
            let report = engine.gc()?;
            output::gc(&report, json)
        }
        Command::Demo(_) => unreachable!("handled above"),
    }
}

fn default_snapshot_name() -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    format!("snap-{}", now.replace(':', "").trim_end_matches('Z'))
}

fn parse_since(s: &str) -> anyhow::Result<u64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        return Ok(ms);
    }
    match humantime::parse_duration(s) {
        Ok(age) => Ok(journal::now_millis().saturating_sub(age.as_millis() as u64)),
        Err(_) => Err(Usage(format!(
            "--since {s:?}: give an RFC 3339 time (2026-11-26T06:00:00Z) or an age (2h, 30m)"
        ))
        .into()),
    }
}

/// Parses a size: bytes, or with a K/M/G/T suffix (powers of 1024; `MiB`, `MB` and `M` alike).
pub(crate) fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        Usage(format!(
            "size {s:?}: expected a number with an optional K, M, G or T"
        ))
    })?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(Usage(format!(
                "size {s:?}: unknown unit {unit:?} (use K, M, G or T)"
            ))
            .into())
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| Usage(format!("size {s:?} is too large")).into())
}

/// The engine's form of a `domain` command that changes something, and its domain.
fn domain_action(cmd: DomainCommand) -> anyhow::Result<(String, DomainAction)> {
    Ok(match cmd {
        DomainCommand::Define {
            name,
            memory,
            disks,
            workload,
        } => {
            let spec = DomainSpec {
                memory_bytes: parse_size(&memory)?,
                disk_sizes: disks
                    .iter()
                    .map(|d| parse_size(d))
                    .collect::<anyhow::Result<Vec<u64>>>()?,
                workload,
            };
            (name, DomainAction::Define(spec))
        }
        DomainCommand::Start {
            name,
            workload,
            paused,
        } => (name, DomainAction::Start { paused, workload }),
        DomainCommand::Pause { name } => (name, DomainAction::Pause),
        DomainCommand::Unpause { name } => (name, DomainAction::Unpause),
        DomainCommand::Shutdown { name } => (name, DomainAction::Shutdown),
        DomainCommand::Destroy { name } => (name, DomainAction::Destroy),
        DomainCommand::Undefine { name, snapshots } => (name, DomainAction::Undefine { snapshots }),
        DomainCommand::List | DomainCommand::Info { .. } => {
            return Err(Usage("`domain list` and `domain info` change nothing".into()).into())
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("64X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn since_accepts_times_and_ages() {
        assert_eq!(parse_since("1970-01-01T00:00:01Z").unwrap(), 1000);
        let an_hour_ago = parse_since("1h").unwrap();
        assert!(journal::now_millis() - an_hour_ago >= 3_600_000);
        assert!(parse_since("yesterday-ish").is_err());
    }
}
