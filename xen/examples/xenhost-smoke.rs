//! Drives [`XenHost`] by hand on a Xen dom0, one `Host` call per run:
//!
//! ```text
//! xenhost-smoke STATE_DIR domains
//! xenhost-smoke STATE_DIR info|pause|unpause|destroy DOMAIN
//! xenhost-smoke STATE_DIR start DOMAIN [paused]
//! xenhost-smoke STATE_DIR save DOMAIN FILE [FAIL_AFTER_BYTES]
//! xenhost-smoke STATE_DIR restore DOMAIN FILE
//! xenhost-smoke STATE_DIR snaps DOMAIN TARGET
//! xenhost-smoke STATE_DIR snap|delsnap|apply DOMAIN TARGET TAG
//! xenhost-smoke STATE_DIR contract DOMAIN [CHECK...]   # Host contract checks; DOMAIN shut off
//! xenhost-smoke STATE_DIR qmp DOMID COMMAND [ARGUMENTS_JSON]   # one QMP command, its answer
//! ```

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use xen::xenhost::XenHost;
use xen::Host;

/// A sink that fails after `limit` bytes, to try a save whose consumer breaks down.
struct FailAfter<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for FailAfter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left < buf.len() as u64 {
            return Err(io::Error::other("sink gave up (test)"));
        }
        self.left -= buf.len() as u64;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One check of the Host contract.
type Check = fn(&dyn Host, &str);

fn run(args: &[String]) -> Result<String, Box<dyn std::error::Error>> {
    let arg = |i: usize| -> Result<&str, Box<dyn std::error::Error>> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| "missing argument (see the source)".into())
    };
    if arg(1)? == "qmp" {
        let domid: u32 = arg(2)?.parse()?;
        let arguments = match args.get(4) {
            Some(a) => Some(serde_json::from_str(a)?),
            None => None,
        };
        return Ok(xen::xenhost::qmp_command(domid, arg(3)?, arguments)?.to_string());
    }
    let host = XenHost::open(Path::new(arg(0)?))?;
    let dom = || arg(2);
    Ok(match arg(1)? {
        "domains" => serde_json::to_string(&host.domains()?)?,
        "info" => serde_json::to_string(&host.domain(dom()?)?)?,
        "pause" => format!("{:?}", host.pause(dom()?)?),
        "unpause" => format!("{:?}", host.unpause(dom()?)?),
        "destroy" => format!("{:?}", host.destroy(dom()?)?),
        "start" => format!(
            "{:?}",
            host.start(dom()?, args.get(3).is_some_and(|a| a == "paused"))?
        ),
        "save" => {
            let file = BufWriter::new(File::create(arg(3)?)?);
            let n = match args.get(4) {
                Some(limit) => host.save_memory(
                    dom()?,
                    &mut FailAfter {
                        inner: file,
                        left: limit.parse()?,
                    },
                )?,
                None => {
                    let mut file = file;
                    let n = host.save_memory(dom()?, &mut file)?;
                    file.flush()?;
                    n
                }
            };
            format!("{n} bytes")
        }
        "restore" => format!(
            "{:?}",
            host.restore_memory(dom()?, &mut BufReader::new(File::open(arg(3)?)?))?
        ),
        "snaps" => format!("{:?}", host.disk_snapshots(dom()?, arg(3)?)?),
        "snap" => format!("{:?}", host.create_disk_snapshot(dom()?, arg(3)?, arg(4)?)?),
        "delsnap" => format!("{:?}", host.delete_disk_snapshot(dom()?, arg(3)?, arg(4)?)?),
        "apply" => format!("{:?}", host.apply_disk_snapshot(dom()?, arg(3)?, arg(4)?)?),
        "contract" => {
            use xen::contract as c;
            let checks: [(&str, Check); 8] = [
                ("lookup", c::lookup),
                ("lifecycle", c::lifecycle),
                ("start_refused_while_active", c::start_refused_while_active),
                ("save_and_restore", c::save_and_restore),
                (
                    "restore_refuses_bad_streams",
                    c::restore_refuses_bad_streams,
                ),
                ("disk_snapshots_offline", c::disk_snapshots_offline),
                ("disk_snapshots_online", c::disk_snapshots_online),
                (
                    "apply_disk_snapshot_reverts",
                    c::apply_disk_snapshot_reverts,
                ),
            ];
            let only: Vec<&str> = args.iter().skip(3).map(String::as_str).collect();
            let mut passed = Vec::new();
            for (name, check) in checks {
                if only.is_empty() || only.contains(&name) {
                    eprintln!("contract check {name}");
                    check(&host, dom()?);
                    passed.push(name);
                }
            }
            format!("passed: {passed:?}")
        }
        other => return Err(format!("unknown command {other:?}").into()),
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let start = Instant::now();
    let result = run(&args);
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(out) => {
            println!(
                "smoke {}: ok in {secs:.2}s: {out}",
                args.get(1).map_or("", |s| s.as_str())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            println!(
                "smoke {}: ERROR in {secs:.2}s: {msg}",
                args.get(1).map_or("", |s| s.as_str())
            );
            ExitCode::FAILURE
        }
    }
}
