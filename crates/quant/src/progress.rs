//! Load progress: an indicatif bar on a terminal, plain log lines otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

pub struct LoadProgress {
    total_bytes: u64,
    shards: usize,
    state: Mutex<State>,
}

struct State {
    done: u64,
    bar: Option<ProgressBar>,
    last_decile: u64,
    finished: bool,
}

impl LoadProgress {
    pub fn new(total_bytes: u64, shards: usize) -> Self {
        // tiny checkpoints (tests, the built-in model) load silently
        let quiet = total_bytes < (64 << 20) || std::env::var_os("MOESERVE_QUIET").is_some();
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total_bytes);
            b.set_style(
                ProgressStyle::with_template("loading {msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_message(format!("{shards} shard(s)"));
            b
        });
        let last_decile = if quiet { u64::MAX } else { 0 };
        LoadProgress { total_bytes, shards, state: Mutex::new(State { done: 0, bar, last_decile, finished: false }) }
    }

    pub fn add(&self, bytes: u64, shard_name: &str) {
        let Ok(mut s) = self.state.lock() else { return };
        s.done += bytes;
        let done = s.done;
        if let Some(b) = &s.bar {
            b.set_position(done);
            return;
        }
        let decile = done * 10 / self.total_bytes.max(1);
        if s.last_decile != u64::MAX && decile > s.last_decile {
            s.last_decile = decile;
            eprintln!(
                "loading: {:.1}/{:.1} GB ({}%) of {} shard(s), at {shard_name}",
                done as f64 / 1e9,
                self.total_bytes as f64 / 1e9,
                decile * 10,
                self.shards
            );
        }
    }

    pub fn finish(&self) {
        let Ok(mut s) = self.state.lock() else { return };
        if s.finished {
            return;
        }
        s.finished = true;
        if let Some(b) = s.bar.take() {
            b.finish_and_clear();
        } else if s.last_decile != u64::MAX {
            eprintln!(
                "loading: done, read {:.2} GB of {:.2} GB in {} shard(s)",
                s.done as f64 / 1e9,
                self.total_bytes as f64 / 1e9,
                self.shards
            );
        }
    }
}
