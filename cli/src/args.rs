//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Crash-safe snapshots of Xen domains: memory and every disk at one instant.
#[derive(Debug, Parser)]
#[command(name = "domsnap", version, about, max_term_width = 100)]
pub struct Cli {
    /// State directory (journal, memory images, simulated domains).
    /// Default: $DOMSNAP_STATE, else /var/lib/domsnap for root, else ~/.local/share/domsnap.
    #[arg(long, global = true, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Which host to drive.
    #[arg(long, global = true, value_enum, default_value_t = HostKind::Sim)]
    pub host: HostKind,
    /// Machine-readable output (JSON on stdout).
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for another domsnap operation to release the journal.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 600)]
    pub wait: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Host implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HostKind {
    /// The simulated Xen host kept in the state directory.
    Sim,
    /// This machine's Xen (dom0; needs a build with `--features xen`).
    Xen,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage domains (define, shutdown, undefine and workloads: the simulated host only).
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Take a snapshot: a checkpoint (memory + every disk) or, with --disk-only, disks only.
    Create(CreateArgs),
    /// Bring a snapshot back: memory and every disk as at its instant.
    Revert(RevertArgs),
    /// Delete a snapshot; its children move to its parent.
    Delete(DeleteArgs),
    /// List a domain's snapshots.
    List(ListArgs),
    /// Show one snapshot.
    Info(InfoArgs),
    /// Show what domsnap did: operations, steps, durations, outcomes.
    History(HistoryArgs),
    /// Finish or undo interrupted operations now, those that need recovery too (every
    /// command that writes does the rest first).
    Recover(RecoverArgs),
    /// Check the journal, the catalog against every disk, and the memory image store.
    Verify(VerifyArgs),
    /// Remove memory chunks no snapshot needs any more.
    Gc,
    /// Run a demonstration on a simulated host in a fresh state directory.
    Demo(DemoArgs),
}

/// `domain …` commands.
#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Define a simulated domain: a memory file and qcow2 disks xvda, xvdb, …
    Define {
        /// Domain name.
        name: String,
        /// Memory size (e.g. 64M, 1G).
        #[arg(long, value_name = "SIZE")]
        memory: String,
        /// A disk of this virtual size (repeat for more disks).
        #[arg(long = "disk", value_name = "SIZE")]
        disks: Vec<String>,
        /// What the vCPU does: counter (default) or idle.
        #[arg(long)]
        workload: Option<String>,
    },
    /// Start a domain.
    Start {
        /// Domain name.
        name: String,
        /// Set the workload first.
        #[arg(long)]
        workload: Option<String>,
        /// Start paused.
        #[arg(long)]
        paused: bool,
    },
    /// Pause a running domain.
    Pause {
        /// Domain name.
        name: String,
    },
    /// Let a paused domain run.
    Unpause {
        /// Domain name.
        name: String,
    },
    /// Stop a domain gracefully (disks flushed).
    Shutdown {
        /// Domain name.
        name: String,
    },
    /// Stop a domain at once.
    Destroy {
        /// Domain name.
        name: String,
    },
    /// Remove a shut-off domain and its files (refused while it has snapshots).
    Undefine {
        /// Domain name.
        name: String,
        /// Delete the domain's snapshots with it.
        #[arg(long)]
        snapshots: bool,
    },
    /// List domains.
    List,
    /// Show a domain.
    Info {
        /// Domain name.
        name: String,
    },
}

/// `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Domain name.
    pub domain: String,
    /// Snapshot name (default: snap-<UTC time>).
    pub name: Option<String>,
    /// Disks only, no memory.
    #[arg(long)]
    pub disk_only: bool,
    /// External snapshots (qcow2 overlays) instead of internal ones.
    #[arg(long)]
    pub external: bool,
    /// Accept a disk-only snapshot of a running domain, which is only crash-consistent.
    #[arg(long)]
    pub crash_consistent: bool,
    /// Free text kept with the snapshot.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
}

/// `revert`.
#[derive(Debug, Args)]
pub struct RevertArgs {
    /// Domain name.
    pub domain: String,
    /// Snapshot name.
    pub name: String,
    /// End running.
    #[arg(long, conflicts_with = "paused")]
    pub running: bool,
    /// End paused.
    #[arg(long)]
    pub paused: bool,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Domain name.
    pub domain: String,
    /// Snapshot name.
    pub name: String,
    /// Delete its whole subtree.
    #[arg(long)]
    pub children: bool,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Domain name.
    pub domain: String,
    /// Show the snapshot tree.
    #[arg(long)]
    pub tree: bool,
}

/// `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Domain name.
    pub domain: String,
    /// Snapshot name.
    pub name: String,
}

/// `history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Only this domain.
    pub domain: Option<String>,
    /// Only this operation.
    #[arg(long, value_name = "ID")]
    pub op: Option<u64>,
    /// Only operations since TIME: RFC 3339 (2026-11-26T06:00:00Z) or an age (2h, 30m).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
}

/// `recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The journal is lost or does not belong here (exit 7): build a new one from what is on
    /// disk (the disks' snapshot tags), with operation ids above every one seen. The old
    /// journal, if any, is moved aside, never deleted.
    #[arg(long, conflicts_with = "force")]
    pub adopt: bool,
    /// Finish an operation even on a domain that was started after its interruption
    /// (a revert then replaces that boot).
    #[arg(long)]
    pub force: bool,
}

/// `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this domain's disks.
    pub domain: Option<String>,
    /// Also read and hash every memory chunk.
    #[arg(long)]
    pub deep: bool,
    /// Rebuild the catalog from the journal's events first.
    #[arg(long)]
    pub rebuild: bool,
    /// Also check every qcow2 image of shut-off domains (refcounts against references).
    #[arg(long)]
    pub disks: bool,
    /// With --disks: free leaked clusters (nothing else is changed).
    #[arg(long, requires = "disks")]
    pub repair: bool,
}

/// `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's state directory afterwards.
    #[arg(long)]
    pub keep: bool,
}
