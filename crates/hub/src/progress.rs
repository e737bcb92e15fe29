//! Download progress: a bar per file plus an overall bar on a terminal; plain log lines otherwise
//! (the convention of `moeserve_quant::progress`).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};

/// Files at least this large log every 10% in plain mode.
const PLAIN_DECILES_FROM: u64 = 64 << 20;

pub struct Progress {
    repo: String,
    files: usize,
    total: u64,
    quiet: bool,
    multi: Option<(MultiProgress, ProgressBar)>,
    done: Mutex<u64>,
    started: Instant,
}

impl Progress {
    pub fn new(repo: &str, files: usize, total: u64, quiet: bool) -> Self {
        let multi = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let m = MultiProgress::new();
            let overall = m.add(ProgressBar::new(total));
            overall.set_style(style("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})"));
            overall.set_message(format!("{repo}: {files} file(s)"));
            (m, overall)
        });
        if multi.is_none() && !quiet && files > 0 {
            eprintln!("hub: downloading {repo}: {files} file(s), {}", HumanBytes(total));
        }
        Progress { repo: repo.into(), files, total, quiet, multi, done: Mutex::new(0), started: Instant::now() }
    }

    pub fn file(&self, name: &str, size: u64) -> FileProgress<'_> {
        let bar = self.multi.as_ref().map(|(m, overall)| {
            let b = m.insert_before(overall, ProgressBar::new(size));
            b.set_style(style("  {msg:40!} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})"));
            b.set_message(name.to_string());
            b
        });
        if bar.is_none() && !self.quiet && size >= PLAIN_DECILES_FROM {
            eprintln!("hub: {}: {name} ({})", self.repo, HumanBytes(size));
        }
        FileProgress { parent: self, bar, name: name.into(), size, pos: 0, decile: 0 }
    }

    fn advance(&self, delta: i64) {
        let Ok(mut done) = self.done.lock() else { return };
        *done = done.saturating_add_signed(delta);
        if let Some((_, overall)) = &self.multi {
            overall.set_position(*done);
        }
    }

    pub fn finish(&self) {
        if let Some((m, overall)) = &self.multi {
            overall.finish_and_clear();
            let _ = m.clear();
        }
        if !self.quiet && self.files > 0 {
            let secs = self.started.elapsed().as_secs_f64();
            eprintln!("hub: downloaded {}: {} file(s), {} in {secs:.1}s", self.repo, self.files, HumanBytes(self.total));
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

pub struct FileProgress<'a> {
    parent: &'a Progress,
    bar: Option<ProgressBar>,
    name: String,
    size: u64,
    pos: u64,
    decile: u64,
}

impl FileProgress<'_> {
    /// Bytes of this file on disk so far (moves back to 0 when a transfer restarts from scratch).
    pub fn set(&mut self, pos: u64) {
        let delta = pos as i64 - self.pos as i64;
        self.pos = pos;
        self.parent.advance(delta);
        if let Some(b) = &self.bar {
            b.set_position(pos);
            return;
        }
        if self.parent.quiet || self.size < PLAIN_DECILES_FROM {
            return;
        }
        let decile = pos * 10 / self.size.max(1);
        if decile > self.decile && decile < 10 {
            self.decile = decile;
            eprintln!("hub: {}: {} {}%", self.parent.repo, self.name, decile * 10);
        }
    }

    pub fn note(&self, msg: &str) {
        if self.parent.quiet {
            return;
        }
        match &self.parent.multi {
            Some((m, _)) => {
                let _ = m.println(format!("{}: {msg}", self.name));
            }
            None => eprintln!("hub: {}: {}: {msg}", self.parent.repo, self.name),
        }
    }
}

impl Drop for FileProgress<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
