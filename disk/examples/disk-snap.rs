//! Minimal command line over the `disk` crate, used by `benches/disk-vs-qemu-img.sh`.
//!
//! `disk-snap create|apply|delete IMAGE NAME`, `disk-snap list|check IMAGE`.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let img = Path::new(arg(2));
    let result = match arg(1) {
        "create" => disk::create_snapshot(img, arg(3)).map(|_| ()),
        "apply" => disk::apply_snapshot(img, arg(3)),
        "delete" => disk::delete_snapshot(img, arg(3)),
        "list" => disk::list_snapshots(img).map(|l| {
            for s in l {
                println!("{}\t{}\t{}", s.id, s.name, s.disk_size);
            }
        }),
        "check" => disk::check(img).map(|r| println!("{r:?}")),
        _ => {
            eprintln!("usage: disk-snap create|apply|delete IMAGE NAME | list|check IMAGE");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("disk-snap: {msg}");
            ExitCode::FAILURE
        }
    }
}
