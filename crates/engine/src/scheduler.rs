//! Continuous batching: which sequences run this step and how many tokens each.
//!
//! Each step has a token budget. Running sequences go first (oldest first; decode needs one
//! token, a partially prefilled prompt gets the next chunk), then waiting sequences are admitted
//! in arrival order, reusing cached prefix pages. When pages run out, the newest running
//! sequence is preempted: its pages are freed and it is recomputed (prompt + output so far) later.
//! The plan is plain data; the engine turns it into a forward batch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::detok::StreamDecoder;
use crate::kv::{page_hash, BlockTable, PagePool};
use crate::request::{Event, Request};
use crate::sampling::Sampler;
use crate::spec::SpecState;
use crate::stop::StopMatcher;

/// One choice of one request.
pub struct Seq {
    pub req_id: u64,
    pub index: usize,
    pub req: Arc<Request>,
    pub output: Vec<u32>,
    pub sampler: Sampler,
    pub table: BlockTable,
    pub cached_prompt_tokens: usize,
    pub detok: StreamDecoder,
    pub stop: StopMatcher,
    pub stop_ids: Arc<Vec<u32>>,
    pub events: mpsc::Sender<Event>,
    pub arrival: Instant,
    pub last_token: Option<Instant>,
    /// Still counted as waiting by the handle (never scheduled yet).
    pub queued: bool,
    /// Structured-output constraint, if the request asked for one.
    pub constraint: Option<crate::constraint::Constraint>,
    /// Speculative decoding: pending drafts and acceptance statistics.
    pub spec: SpecState,
}

impl Seq {
    pub fn total_len(&self) -> usize {
        self.req.prompt.len() + self.output.len()
    }

    /// Tokens still to run through the model.
    pub fn remaining(&self) -> usize {
        self.total_len() - self.table.len
    }

    /// Tokens to compute this step: the remaining ones plus the drafts to verify after them
    /// (drafts exist only while exactly the last sampled token is pending).
    pub fn wanted(&self) -> usize {
        self.remaining() + self.spec.drafts.len()
    }

    /// Tokens `range` of prompt ++ output.
    pub fn tokens(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        let p = &self.req.prompt;
        range.map(|i| if i < p.len() { p[i] } else { self.output[i - p.len()] }).collect()
    }
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_batch_tokens: usize,
    pub max_running: usize,
    pub prefix_caching: bool,
    /// A draft head keeps rows in the same pages: a page enters the prefix cache only once its
    /// draft rows are written too.
    pub draft_rows: bool,
}

/// (index into `running`, tokens to compute), in increasing index order.
pub type Plan = Vec<(usize, usize)>;

pub struct Scheduler {
    pub cfg: SchedulerConfig,
    pub pool: PagePool,
    pub waiting: VecDeque<Seq>,
    pub running: Vec<Seq>,
    pub preemptions: u64,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, pool: PagePool) -> Self {
        Scheduler {
            cfg,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Pages to add so `table` covers `len` tokens.
    fn pages_needed(&self, table: &BlockTable, len: usize) -> usize {
        len.div_ceil(self.pool.page_size()).saturating_sub(table.pages.len())
    }

    fn grow(pool: &mut PagePool, table: &mut BlockTable, pages: usize) {
        for _ in 0..pages {
            if let Some(p) = pool.allocate() {
                table.pages.push(p);
            }
        }
    }

    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        seq.table.release(&mut self.pool);
        seq.spec.clear();
        self.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Reuse cached full pages of the sequence's tokens (never the page holding its last token,
    /// which must be computed to produce logits).
    fn lookup_prefix(&mut self, seq: &mut Seq) {
        let ps = self.pool.page_size();
        let total = seq.total_len();
        self.prefix_query_tokens += total as u64;
        if !self.cfg.prefix_caching {
            return;
        }
        let mut h = 0u64;
        for p in 0..(total - 1) / ps {
            h = page_hash(h, &seq.tokens(p * ps..(p + 1) * ps));
            match self.pool.lookup(h) {
                Some(page) => {
                    seq.table.pages.push(page);
                    seq.table.hashed_pages += 1;
                    seq.table.last_hash = h;
                }
                None => break,
            }
        }
        seq.table.len = seq.table.pages.len() * ps;
        // cached pages carry their draft rows; the last one was computed with the next token of
        // the sequence that filled it, which only perturbs drafts, never outputs
        seq.table.mtp_len = seq.table.len;
        seq.cached_prompt_tokens = seq.table.len.min(seq.req.prompt.len());
        self.prefix_hit_tokens += seq.table.len as u64;
    }

    pub fn schedule(&mut self) -> Plan {
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan = Plan::new();
        let mut i = 0;
        'running: while i < self.running.len() && budget > 0 {
            let n = self.running[i].wanted().min(budget);
            let target = self.running[i].table.len + n;
            loop {
                let need = self.pages_needed(&self.running[i].table, target);
                if need <= self.pool.available() {
                    Self::grow(&mut self.pool, &mut self.running[i].table, need);
                    break;
                }
                // free pages by preempting the newest sequence (possibly this one)
                let victim = self.running.len() - 1;
                self.preempt(victim);
                if victim == i {
                    break 'running;
                }
            }
            let s = &mut self.running[i];
            let drafts = n.saturating_sub(s.remaining());
            s.spec.truncate(drafts);
            plan.push((i, n));
            budget -= n;
            i += 1;
        }
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            if seq.table.pages.is_empty() {
                self.lookup_prefix(&mut seq);
            }
            let n = seq.remaining().min(budget);
            let need = self.pages_needed(&seq.table, seq.table.len + n);
            if need > self.pool.available() {
                seq.table.release(&mut self.pool);
                self.waiting.push_front(seq);
                break;
            }
            Self::grow(&mut self.pool, &mut seq.table, need);
            self.running.push(seq);
            plan.push((self.running.len() - 1, n));
            budget -= n;
        }
        plan
    }

    /// Register the full pages of a sequence in the prefix cache.
    pub fn register_full_pages(&mut self, i: usize) {
        if !self.cfg.prefix_caching {
            return;
        }
        let ps = self.pool.page_size();
        let seq = &mut self.running[i];
        let written = if self.cfg.draft_rows { seq.table.len.min(seq.table.mtp_len) } else { seq.table.len };
        while (seq.table.hashed_pages + 1) * ps <= written {
            let p = seq.table.hashed_pages;
            let h = page_hash(seq.table.last_hash, &seq.tokens(p * ps..(p + 1) * ps));
            self.pool.register(seq.table.pages[p], h);
            seq.table.hashed_pages += 1;
            seq.table.last_hash = h;
        }
    }

    /// Remove a running sequence and free its pages.
    pub fn remove_running(&mut self, i: usize) -> Seq {
        let mut seq = self.running.remove(i);
        seq.table.release(&mut self.pool);
        seq
    }
}
