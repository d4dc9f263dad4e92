//! Progress on a terminal: a bar for memory save and restore, notes on stderr. Nothing when
//! stderr is not a terminal or the output is JSON.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

use engine::Observer;

/// The observer for this run.
pub fn observer(json: bool) -> Box<dyn Observer> {
    let interactive = std::io::stderr().is_terminal() && !json;
    Box::new(Terminal {
        interactive,
        bar: Mutex::new(None),
    })
}

struct Terminal {
    interactive: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Observer for Terminal {
    fn step(&self, _op: u64, step: &str, begun: bool) {
        if !self.interactive {
            return;
        }
        let Ok(mut bar) = self.bar.lock() else { return };
        if let Some(b) = bar.take() {
            b.finish_and_clear();
        }
        if begun && (step == "save-memory" || step == "restore-memory") {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:>15} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(step.to_string());
            *bar = Some(b);
        }
    }

    fn bytes(&self, done: u64, total: u64) {
        if let Ok(bar) = self.bar.lock() {
            if let Some(b) = bar.as_ref() {
                b.set_length(total.max(done));
                b.set_position(done);
            }
        }
    }

    fn note(&self, message: &str) {
        if self.interactive {
            eprintln!("domsnap: {message}");
        }
    }
}
