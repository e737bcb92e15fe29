//! The engine thread: owns the model, the paged cache and the scheduler; requests arrive over a
//! bounded channel and their events leave over per-request channels. Dropping a request's
//! stream aborts it and frees its pages.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::Tensor;
use moeserve_core::{error::Context, Result};
use moeserve_model::{ForwardBatch, LatentKv, ModelGroup, SeqChunk};
use tokio::sync::mpsc;

use crate::constraint::{Constraint, GrammarCompiler};
use crate::detok::StreamDecoder;
use crate::kv::{BlockTable, CachePart, PagePool, PagedSeq};
use crate::metrics::Metrics;
use crate::request::{Event, FinishReason, Request, SubmitError, Usage};
use crate::sampling::Sampler;
use crate::scheduler::{Plan, Scheduler, SchedulerConfig, Seq};
use crate::spec::{DraftPicker, DraftSeq, Drafter, MtpDrafter, SpecState};
use crate::stop::StopMatcher;
use crate::tokenizer::Tokenizer;

mod emit;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV page.
    pub page_size: usize,
    /// Bytes of latent KV cache to allocate.
    pub kv_cache_bytes: usize,
    /// Tokens computed per step across all sequences (chunked prefill shares it with decode).
    pub max_batch_tokens: usize,
    pub max_running: usize,
    /// Waiting sequences beyond this are rejected as overloaded.
    pub max_waiting: usize,
    pub prefix_caching: bool,
    pub max_n: usize,
    pub max_logprobs: usize,
    /// Speculative decoding: tokens the MTP head drafts per step (0 = off). Up to 3 keeps the
    /// K + 1-row verify chunks on the absorbed (decode) attention path; larger K verify on the
    /// naive path, which equals it up to float rounding.
    pub num_draft_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            page_size: 16,
            kv_cache_bytes: 1 << 30,
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            prefix_caching: true,
            max_n: 16,
            max_logprobs: 20,
            num_draft_tokens: 0,
        }
    }
}

enum Command {
    Submit { id: u64, req: Arc<Request>, events: mpsc::Sender<Event>, constraints: Vec<Constraint> },
    Abort(u64),
    Shutdown,
}

/// Limits the handle checks before a request is queued.
#[derive(Debug, Clone)]
struct Limits {
    vocab: usize,
    max_positions: usize,
    capacity_tokens: usize,
    eos: Vec<u32>,
    has_tokenizer: bool,
}

/// Built on the first structured-output request (the token trie takes a moment).
struct Grammars {
    tokenizer: Option<Arc<Tokenizer>>,
    vocab: usize,
    eos: Vec<u32>,
    compiler: std::sync::OnceLock<std::result::Result<Arc<GrammarCompiler>, String>>,
}

impl Grammars {
    fn compiler(&self) -> std::result::Result<Arc<GrammarCompiler>, String> {
        self.compiler
            .get_or_init(|| {
                let tok = self.tokenizer.as_ref().ok_or("response_format needs a model with a tokenizer")?;
                let think = tok.token_id("<think>").zip(tok.token_id("</think>"));
                GrammarCompiler::new(tok.json_bytes(), &self.eos, self.vocab, think).map(Arc::new).map_err(|e| e.to_string())
            })
            .clone()
    }
}

pub struct EngineHandle {
    tx: SyncSender<Command>,
    metrics: Arc<Mutex<Metrics>>,
    queued: Arc<AtomicUsize>,
    next_id: AtomicU64,
    cfg: EngineConfig,
    limits: Limits,
    grammars: Grammars,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Events of one request; dropping it aborts the request.
pub struct RequestStream {
    pub id: u64,
    rx: mpsc::Receiver<Event>,
    tx: SyncSender<Command>,
}

impl RequestStream {
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// For synchronous callers (CLI, tests); must not be called inside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        // the engine also notices the closed channel on its next send
        let _ = self.tx.try_send(Command::Abort(self.id));
    }
}

impl EngineHandle {
    pub fn submit(&self, req: Request) -> std::result::Result<RequestStream, SubmitError> {
        self.validate(&req)?;
        let n = req.n;
        let constraints = match &req.response_format {
            None => Vec::new(),
            Some(f) => {
                let compiler = self.grammars.compiler().map_err(SubmitError::Invalid)?;
                (0..n)
                    .map(|_| compiler.compile(f).map_err(|e| SubmitError::Invalid(e.to_string())))
                    .collect::<std::result::Result<_, _>>()?
            }
        };
        if self.queued.load(Ordering::SeqCst) + n > self.cfg.max_waiting {
            self.metrics.lock().map(|mut m| m.requests_rejected += 1).ok();
            return Err(SubmitError::Overloaded(format!("{} requests waiting", self.queued.load(Ordering::SeqCst))));
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        // every choice sends at most max_tokens tokens plus one finish event
        let (etx, erx) = mpsc::channel(n * (req.max_tokens + 1) + 1);
        self.queued.fetch_add(n, Ordering::SeqCst);
        match self.tx.try_send(Command::Submit { id, req: Arc::new(req), events: etx, constraints }) {
            Ok(()) => Ok(RequestStream { id, rx: erx, tx: self.tx.clone() }),
            Err(e) => {
                self.queued.fetch_sub(n, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Overloaded("engine command queue full".into()),
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    fn validate(&self, r: &Request) -> std::result::Result<(), SubmitError> {
        let l = &self.limits;
        let bad = |m: String| Err(SubmitError::Invalid(m));
        if r.prompt.is_empty() {
            return bad("prompt is empty".into());
        }
        if let Some(t) = r.prompt.iter().find(|&&t| t as usize >= l.vocab) {
            return bad(format!("token id {t} out of range (vocab size {})", l.vocab));
        }
        if r.max_tokens == 0 {
            return bad("max_tokens must be >= 1".into());
        }
        if r.n == 0 || r.n > self.cfg.max_n {
            return bad(format!("n must be in 1..={}", self.cfg.max_n));
        }
        let total = r.prompt.len() + r.max_tokens;
        if total > l.max_positions {
            return bad(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the model's context of {} tokens",
                r.prompt.len(),
                r.max_tokens,
                l.max_positions
            ));
        }
        if total > l.capacity_tokens {
            return bad(format!("prompt + max_tokens ({total}) exceeds the KV cache capacity of {} tokens", l.capacity_tokens));
        }
        r.sampling.validate().map_err(SubmitError::Invalid)?;
        if r.logprobs.is_some_and(|k| k > self.cfg.max_logprobs) {
            return bad(format!("top_logprobs must be <= {}", self.cfg.max_logprobs));
        }
        if !r.stop.is_empty() && !l.has_tokenizer {
            return bad("stop strings need a model with a tokenizer".into());
        }
        if r.stop.len() > 16 || r.stop.iter().any(|s| s.len() > 256) {
            return bad("at most 16 stop strings of at most 256 bytes".into());
        }
        if r.sampling.logit_bias.len() > 1024 || r.sampling.logit_bias.iter().any(|(t, _)| *t as usize >= l.vocab) {
            return bad("logit_bias: at most 1024 entries with token ids inside the vocabulary".into());
        }
        Ok(())
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The model's EOS ids (what `ignore_eos` turns off).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.limits.eos
    }

    /// Abort everything and join the engine thread.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Ok(mut t) = self.thread.lock() {
            if let Some(h) = t.take() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub struct Engine {
    model: ModelGroup,
    tokenizer: Option<Arc<Tokenizer>>,
    sched: Scheduler,
    rx: Receiver<Command>,
    metrics: Arc<Mutex<Metrics>>,
    queued: Arc<AtomicUsize>,
    /// Speculative decoding (with `num_draft` drafts per step), when on.
    drafter: Option<Box<dyn Drafter>>,
    num_draft: usize,
}

/// How a sequence ends in this step: (running index, reason, held-back text, stop string).
type Done = (usize, FinishReason, String, Option<String>);

/// The forward pass of one step.
struct StepOut {
    /// Post-norm hidden of every row `[n, hidden]` (the draft head's input).
    hidden: Tensor,
    /// Per plan entry: (first row of its chunk, the chunk's start position).
    chunks: Vec<(usize, usize)>,
    /// f32 logits `[rows, vocab]` of the rows to sample (none when no sequence samples).
    logits: Option<Tensor>,
    /// (running index, its rows of `logits`: the last token, then each draft).
    rows: Vec<(usize, Range<usize>)>,
}

impl Engine {
    /// Start the engine thread; the model and tokenizer move into it. With
    /// `cfg.num_draft_tokens > 0` the model's MTP layer drafts (speculative decoding). The model
    /// is one `DeepSeekModel` or a tensor/expert-parallel `ModelGroup`.
    pub fn start(model: impl Into<ModelGroup>, tokenizer: Option<Arc<Tokenizer>>, cfg: EngineConfig) -> Result<EngineHandle> {
        let model = model.into();
        let drafter: Option<Box<dyn Drafter>> = match cfg.num_draft_tokens {
            0 => None,
            _ if model.lead().mtp().is_none() => return Err(moeserve_core::Error::Input(
                "speculative decoding needs a checkpoint with an MTP layer (num_nextn_predict_layers >= 1), loaded with load_mtp"
                    .into(),
            )),
            _ => Some(Box::new(MtpDrafter)),
        };
        Self::start_with_drafter(model, tokenizer, cfg, drafter)
    }

    /// Like `start`, with any draft source (`None`, or `cfg.num_draft_tokens == 0`: no speculation).
    pub fn start_with_drafter(
        model: impl Into<ModelGroup>,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: EngineConfig,
        drafter: Option<Box<dyn Drafter>>,
    ) -> Result<EngineHandle> {
        let model = model.into();
        let lead = model.lead();
        let drafter = drafter.filter(|_| cfg.num_draft_tokens > 0);
        // the MTP layer (when loaded) gets its own layer in the same pages
        let mut layout = lead.kv_layout();
        layout.num_layers += usize::from(lead.mtp().is_some());
        // never more than every running sequence at full context could use
        let useful = (cfg.max_running * lead.cfg.max_position_embeddings).div_ceil(cfg.page_size.max(1));
        let pages = PagePool::pages_for_budget(layout, cfg.page_size, lead.dtype(), cfg.kv_cache_bytes).min(useful);
        if pages == 0 {
            return Err(moeserve_core::Error::Cache(format!(
                "kv cache budget of {} bytes holds no page of {} tokens",
                cfg.kv_cache_bytes, cfg.page_size
            )));
        }
        let pool = PagePool::new(layout, cfg.page_size, pages, lead.dtype(), lead.device())?;
        let grammars = Grammars {
            tokenizer: tokenizer.clone(),
            vocab: lead.cfg.vocab_size,
            eos: lead.cfg.eos_token_ids.clone(),
            compiler: std::sync::OnceLock::new(),
        };
        let limits = Limits {
            vocab: lead.cfg.vocab_size,
            max_positions: lead.cfg.max_position_embeddings,
            capacity_tokens: pages * cfg.page_size,
            eos: lead.cfg.eos_token_ids.clone(),
            has_tokenizer: tokenizer.is_some(),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.max_waiting.max(1) * 2);
        let metrics = Arc::new(Mutex::new(Metrics {
            kv_pages_total: pages,
            kv_pages_free: pages,
            num_draft_tokens: if drafter.is_some() { cfg.num_draft_tokens } else { 0 },
            ..Default::default()
        }));
        let queued = Arc::new(AtomicUsize::new(0));
        let sched_cfg = SchedulerConfig {
            max_batch_tokens: cfg.max_batch_tokens.max(1),
            max_running: cfg.max_running.max(1),
            prefix_caching: cfg.prefix_caching,
            draft_rows: drafter.is_some(),
        };
        let mut engine = Engine {
            model,
            tokenizer,
            sched: Scheduler::new(sched_cfg, pool),
            rx,
            metrics: metrics.clone(),
            queued: queued.clone(),
            num_draft: cfg.num_draft_tokens,
            drafter,
        };
        let thread = std::thread::Builder::new()
            .name("moeserve-engine".into())
            .spawn(move || engine.run())
            .map_err(|e| moeserve_core::Error::Input(format!("spawning the engine thread: {e}")))?;
        Ok(EngineHandle {
            tx,
            metrics,
            queued,
            next_id: AtomicU64::new(1),
            cfg,
            limits,
            grammars,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn run(&mut self) {
        loop {
            // block when idle, otherwise take whatever has arrived
            let first = if self.sched.is_idle() {
                match self.rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                None
            };
            let mut cmds: VecDeque<Command> = first.into_iter().collect();
            loop {
                match self.rx.try_recv() {
                    Ok(c) => cmds.push_back(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if cmds.is_empty() && self.sched.is_idle() {
                            return;
                        }
                        break;
                    }
                }
            }
            for c in cmds {
                match c {
                    Command::Submit { id, req, events, constraints } => self.admit(id, req, events, constraints),
                    Command::Abort(id) => self.abort(|s| s.req_id == id),
                    Command::Shutdown => {
                        self.abort(|_| true);
                        return;
                    }
                }
            }
            self.abort(|s| s.events.is_closed());
            let plan = self.sched.schedule();
            if plan.is_empty() {
                self.update_metrics();
                continue;
            }
            self.step(&plan);
            self.update_metrics();
        }
    }

    fn admit(&mut self, id: u64, req: Arc<Request>, events: mpsc::Sender<Event>, constraints: Vec<Constraint>) {
        let mut constraints = constraints.into_iter();
        let mut stop_ids = req.stop_token_ids.clone();
        if !req.ignore_eos {
            stop_ids.extend(&self.model.lead().cfg.eos_token_ids);
        }
        let stop_ids = Arc::new(stop_ids);
        let now = Instant::now();
        for index in 0..req.n {
            let mut sampling = req.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(index as u64));
            self.sched.waiting.push_back(Seq {
                req_id: id,
                index,
                req: req.clone(),
                output: Vec::new(),
                sampler: Sampler::new(sampling),
                table: BlockTable::default(),
                cached_prompt_tokens: 0,
                detok: StreamDecoder::new(),
                stop: StopMatcher::new(req.stop.clone()),
                stop_ids: stop_ids.clone(),
                events: events.clone(),
                arrival: now,
                last_token: None,
                queued: true,
                constraint: constraints.next(),
                // grammar-constrained and logprobs requests decode without drafts
                spec: SpecState {
                    on: self.drafter.is_some() && req.logprobs.is_none() && req.response_format.is_none(),
                    ..Default::default()
                },
            });
        }
        if let Ok(mut m) = self.metrics.lock() {
            m.prompt_tokens += req.prompt.len() as u64;
        }
    }

    /// Finish every sequence matching `pred` with reason Abort.
    fn abort(&mut self, pred: impl Fn(&Seq) -> bool) {
        let mut aborted = 0;
        let waiting = std::mem::take(&mut self.sched.waiting);
        for mut s in waiting {
            if pred(&s) {
                s.table.release(&mut self.sched.pool);
                unqueue(&self.queued, &mut s);
                finish(s, FinishReason::Abort, String::new(), None);
                aborted += 1;
            } else {
                self.sched.waiting.push_back(s);
            }
        }
        let mut i = 0;
        while i < self.sched.running.len() {
            if pred(&self.sched.running[i]) {
                let s = self.sched.remove_running(i);
                finish(s, FinishReason::Abort, String::new(), None);
                aborted += 1;
            } else {
                i += 1;
            }
        }
        if aborted > 0 {
            if let Ok(mut m) = self.metrics.lock() {
                m.requests_aborted += aborted;
            }
        }
    }

    fn step(&mut self, plan: &Plan) {
        let started = Instant::now();
        for &(i, _) in plan {
            unqueue(&self.queued, &mut self.sched.running[i]);
        }
        match self.forward(plan).and_then(|out| self.sample(&out).map(|done| (out, done))) {
            Ok((out, mut done)) => {
                let mut failed = Vec::new();
                if let Err(e) = self.draft(plan, &out, &done) {
                    // a half-written draft cache is not trusted: fail the sequences still running
                    failed = plan.iter().map(|p| p.0).filter(|i| !done.iter().any(|d| d.0 == *i)).collect();
                    for &i in &failed {
                        let _ = self.sched.running[i].events.try_send(Event::Error(format!("drafting failed: {e}")));
                    }
                }
                for &(i, _) in plan {
                    self.sched.register_full_pages(i);
                }
                let finished = done.len() as u64;
                done.extend(failed.into_iter().map(|i| (i, FinishReason::Abort, String::new(), None)));
                done.sort_by_key(|d| std::cmp::Reverse(d.0));
                for (i, reason, text, stop) in done {
                    let s = self.sched.remove_running(i);
                    finish(s, reason, text, stop);
                }
                if finished > 0 {
                    if let Ok(mut m) = self.metrics.lock() {
                        m.requests_finished += finished;
                    }
                }
            }
            Err(e) => {
                // fail the sequences of this step; others keep running
                let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let s = self.sched.remove_running(i);
                    let _ = s.events.try_send(Event::Error(format!("forward failed: {e}")));
                }
            }
        }
        if let Ok(mut m) = self.metrics.lock() {
            m.steps += 1;
            m.busy_seconds += started.elapsed().as_secs_f64();
        }
    }

    /// Run the model over the plan (each sequence's next tokens, then its pending drafts); returns
    /// the hidden states and the f32 logits of the rows that need sampling, in plan order.
    fn forward(&mut self, plan: &Plan) -> Result<StepOut> {
        let mut batch = ForwardBatch::default();
        let mut sample_rows: Vec<(usize, usize, usize)> = Vec::new();
        let mut chunks = Vec::with_capacity(plan.len());
        for &(i, n) in plan {
            let s = &self.sched.running[i];
            let start = s.table.len;
            let real = n.min(s.total_len() - start);
            chunks.push((batch.tokens.len(), start));
            batch.tokens.extend(s.tokens(start..start + real));
            // the scheduler trimmed the drafts to the step's budget
            let drafts = &s.spec.drafts[..(n - real).min(s.spec.drafts.len())];
            batch.tokens.extend(drafts);
            batch.chunks.push(SeqChunk { start_pos: start, len: real + drafts.len() });
            if start + real == s.total_len() {
                sample_rows.push((i, batch.tokens.len() - drafts.len() - 1, drafts.len() + 1));
            }
        }
        let pool = &self.sched.pool;
        let mut planned = plan.iter().map(|p| p.0).peekable();
        let mut views: Vec<PagedSeq> = Vec::with_capacity(plan.len());
        for (i, s) in self.sched.running.iter_mut().enumerate() {
            if planned.peek() == Some(&i) {
                planned.next();
                views.push(PagedSeq { pool, table: &mut s.table, part: CachePart::Main });
            }
        }
        let mut kv: Vec<&mut dyn LatentKv> = views.iter_mut().map(|v| v as &mut dyn LatentKv).collect();
        let model = &self.model;
        // `bench --ab`: the steps that only decode alternate between the versions under evaluation
        let variant = if batch.chunks.iter().all(|c| c.len == 1) { moeserve_core::ab::begin_next_step() } else { None };
        let started = Instant::now();
        // the forward and the logits in one step on the kernels' pool
        let (hidden, logits) = model.step(|| -> Result<(Tensor, Option<Tensor>)> {
            let hidden = model.forward(&batch, &mut kv)?;
            if sample_rows.is_empty() {
                return Ok((hidden, None));
            }
            let idx: Vec<u32> = sample_rows.iter().flat_map(|r| (r.1..r.1 + r.2).map(|x| x as u32)).collect();
            let idx = Tensor::from_vec(idx.clone(), idx.len(), hidden.device()).ctx(|| "sample rows".into())?;
            let rows = hidden.index_select(&idx, 0).ctx(|| "sample rows".into())?;
            let logits = model.logits(&rows)?;
            Ok((hidden, Some(logits)))
        })?;
        if let Some(b) = variant {
            moeserve_core::ab::end_step(b, started.elapsed());
        }
        drop(kv);
        drop(views);
        let mut first = 0;
        let rows = sample_rows
            .into_iter()
            .map(|(i, _, n)| {
                first += n;
                (i, first - n..first)
            })
            .collect();
        Ok(StepOut { hidden, chunks, logits, rows })
    }

    /// Catch the draft head's cache up with this step's committed rows and draft the next step's
    /// tokens. Every planned sequence's draft rows are written (even those that do not speculate)
    /// so that prefix-cached pages always carry them.
    fn draft(&mut self, plan: &Plan, out: &StepOut, done: &[Done]) -> Result<()> {
        let Some(drafter) = self.drafter.as_mut() else { return Ok(()) };
        let mtp_layer = self.model.lead().cfg.num_hidden_layers;
        let pool = &mut self.sched.pool;
        // (running index, hidden row, drafts): pages for the next verification are reserved now,
        // since the recursive draft rows need them already; drafts shrink to what fits
        let mut jobs: Vec<(usize, usize, usize)> = Vec::new();
        for (&(i, _), &(off, chunk_start)) in plan.iter().zip(&out.chunks) {
            if done.iter().any(|d| d.0 == i) {
                continue;
            }
            let s = &mut self.sched.running[i];
            let (start, len) = (s.table.mtp_len, s.table.len);
            // the draft cache is committed up to where this step's chunk began
            if start != chunk_start || start > len {
                return Err(moeserve_core::Error::Cache(format!(
                    "draft cache holds {start} rows but the step's chunk starts at {chunk_start}"
                )));
            }
            let mut k = 0;
            if s.spec.on && s.remaining() == 1 {
                k = self.num_draft.min(s.req.max_tokens.saturating_sub(s.output.len() + 1));
                let fits = s.table.reserve(pool, len + 1 + k);
                if !fits {
                    k = (s.table.capacity(pool.page_size()).saturating_sub(len + 1)).min(k);
                }
                s.table.truncate(pool, len + 1 + k);
            }
            jobs.push((i, off, k));
        }
        let pool = &self.sched.pool;
        let mut views: Vec<PagedSeq> = Vec::with_capacity(jobs.len());
        let mut pickers: Vec<(usize, Vec<u32>, DraftPicker)> = Vec::with_capacity(jobs.len());
        let mut next = jobs.iter().peekable();
        for (i, s) in self.sched.running.iter_mut().enumerate() {
            let Some(&&(_, off, _)) = next.peek().filter(|j| j.0 == i) else { continue };
            next.next();
            let Seq { table, sampler, req, output, .. } = s;
            let (start, len) = (table.mtp_len, table.len);
            // row i of the draft head takes token t_{i+1}
            let p = &req.prompt;
            let next_tokens: Vec<u32> =
                (start + 1..len + 1).map(|t| if t < p.len() { p[t] } else { output[t - p.len()] }).collect();
            pickers.push((off, next_tokens, DraftPicker::new(sampler, p, output)));
            views.push(PagedSeq { pool, table, part: CachePart::Mtp(mtp_layer) });
        }
        let mut seqs: Vec<DraftSeq> = views
            .iter_mut()
            .zip(pickers)
            .zip(&jobs)
            .map(|((kv, (hidden_row, next_tokens, picker)), &(_, _, k))| DraftSeq {
                start: kv.seq_len(),
                kv,
                next_tokens,
                hidden_row,
                k,
                picker,
            })
            .collect();
        drafter.draft(&self.model, &out.hidden, &mut seqs)?;
        let drafted: Vec<(Vec<u32>, Vec<crate::sampling::Dist>)> =
            seqs.into_iter().map(|d| (d.picker.drafts, d.picker.q)).collect();
        drop(views);
        for (&(i, _, k), (mut drafts, mut q)) in jobs.iter().zip(drafted) {
            let s = &mut self.sched.running[i];
            s.table.mtp_len = s.table.len;
            drafts.truncate(k);
            q.truncate(k);
            s.spec.drafts = drafts;
            s.spec.q = q;
        }
        Ok(())
    }

    fn update_metrics(&self) {
        let st = self.sched.pool.stats();
        if let Ok(mut m) = self.metrics.lock() {
            m.waiting = self.sched.waiting.len();
            m.running = self.sched.running.len();
            m.kv_pages_total = st.total_pages;
            m.kv_pages_free = st.free_pages;
            m.kv_pages_cached = st.cached_pages;
            m.kv_pages_used = st.used_pages;
            m.preemptions = self.sched.preemptions;
            m.prefix_query_tokens = self.sched.prefix_query_tokens;
            m.prefix_hit_tokens = self.sched.prefix_hit_tokens;
        }
    }
}

/// A sequence stops counting against `max_waiting` once it first runs (or ends).
fn unqueue(queued: &AtomicUsize, s: &mut Seq) {
    if std::mem::take(&mut s.queued) {
        queued.fetch_sub(1, Ordering::SeqCst);
    }
}

fn finish(s: Seq, reason: FinishReason, text: String, stop: Option<String>) {
    let usage = Usage {
        prompt_tokens: s.req.prompt.len(),
        completion_tokens: s.output.len(),
        cached_prompt_tokens: s.cached_prompt_tokens,
        speculative: s.spec.on.then(|| s.spec.stats.clone()),
    };
    let _ = s.events.try_send(Event::Finished { index: s.index, reason, text, usage, stop });
}
