//! MTP speculative decoding: the draft seam (`Drafter`), the MTP drafter, lossless verification
//! and acceptance statistics.
//!
//! Each step the draft head proposes K tokens after a sequence's pending token; the main model
//! runs the pending token and the K drafts in one forward (K + 1 rows) and `verify` keeps the
//! longest accepted prefix plus one token from the target (the correction at the first rejection,
//! or a bonus token when all K are accepted). Greedy targets accept a draft iff it is the argmax;
//! sampled targets use standard speculative (rejection) sampling against the *processed* target
//! distribution, so outputs are distributed exactly as without speculation.
//!
//! The MTP row of position i takes token t_{i+1} and the main model's post-norm hidden h_i and
//! predicts t_{i+2}, so its cache trails the committed tokens only until the next token is known:
//! the drafter first writes the rows of the newly committed positions (with the main hidden of
//! this step's forward), and the last of them yields draft 1. Drafts 2..K reuse the single MTP
//! layer recursively with its own normed output as the next h (as SGLang does); those rows are
//! scratch and rolled back, so the draft cache only ever holds committed positions.

use std::collections::HashMap;

use candle_core::Tensor;
use moeserve_core::{error::Context, Error, Result};
use moeserve_model::{ForwardBatch, LatentKv, ModelGroup, SeqChunk};

use crate::sampling::{Dist, Sampler};

/// Per-sequence draft state kept between steps.
#[derive(Debug, Default)]
pub struct SpecState {
    /// This sequence speculates (off for grammar-constrained and logprobs requests, which simply
    /// decode one token per step: their per-token masks and raw-logit reports would need to be
    /// replayed along the draft run).
    pub on: bool,
    /// Drafts waiting to be verified after the pending token, and the distribution each was drawn from.
    pub drafts: Vec<u32>,
    pub q: Vec<Dist>,
    pub stats: SpecStats,
}

impl SpecState {
    /// Keep only the first `k` drafts (the step's token budget may not fit them all).
    pub fn truncate(&mut self, k: usize) {
        self.drafts.truncate(k);
        self.q.truncate(k);
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }
}

/// Acceptance statistics (per request and engine-wide).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecStats {
    /// Verification steps (a pending token plus at least one draft in one forward).
    pub steps: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    /// Per draft position j (0-based): verification steps that proposed / accepted a j-th draft.
    pub proposed_at: Vec<u64>,
    pub accepted_at: Vec<u64>,
}

impl SpecStats {
    /// One verification step of `drafted` drafts of which the first `accepted` were accepted.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        if self.proposed_at.len() < drafted {
            self.proposed_at.resize(drafted, 0);
            self.accepted_at.resize(drafted, 0);
        }
        self.steps += 1;
        self.draft_tokens += drafted as u64;
        self.accepted_tokens += accepted as u64;
        for j in 0..drafted {
            self.proposed_at[j] += 1;
            self.accepted_at[j] += u64::from(j < accepted);
        }
    }

    pub fn merge(&mut self, o: &SpecStats) {
        let n = self.proposed_at.len().max(o.proposed_at.len());
        self.proposed_at.resize(n, 0);
        self.accepted_at.resize(n, 0);
        for j in 0..o.proposed_at.len() {
            self.proposed_at[j] += o.proposed_at[j];
            self.accepted_at[j] += o.accepted_at[j];
        }
        self.steps += o.steps;
        self.draft_tokens += o.draft_tokens;
        self.accepted_tokens += o.accepted_tokens;
    }

    /// Tokens produced per verification step (accepted drafts + the target's own token).
    pub fn mean_accepted_length(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            (self.accepted_tokens + self.steps) as f64 / self.steps as f64
        }
    }

    pub fn acceptance_rate(&self) -> f64 {
        if self.draft_tokens == 0 {
            0.0
        } else {
            self.accepted_tokens as f64 / self.draft_tokens as f64
        }
    }

    /// Accepted / proposed at each draft position (position j counts as proposed whenever a step
    /// drafted more than j tokens, so later positions include the chance of an earlier rejection).
    pub fn acceptance_rate_per_position(&self) -> Vec<f64> {
        self.proposed_at.iter().zip(&self.accepted_at).map(|(&p, &a)| if p == 0 { 0.0 } else { a as f64 / p as f64 }).collect()
    }
}

/// Picks draft tokens with the sequence's own sampling parameters and generator, recording the
/// draft distribution q of each (the verifier needs it).
pub struct DraftPicker<'a> {
    pub sampler: &'a mut Sampler,
    pub prompt: &'a [u32],
    pub output: &'a [u32],
    pub drafts: Vec<u32>,
    pub q: Vec<Dist>,
}

impl<'a> DraftPicker<'a> {
    pub fn new(sampler: &'a mut Sampler, prompt: &'a [u32], output: &'a [u32]) -> Self {
        DraftPicker { sampler, prompt, output, drafts: Vec::new(), q: Vec::new() }
    }

    /// Draft the next token from one row of draft logits: the processed distribution (same
    /// temperature, top-p, penalties over the history including earlier drafts) is q; greedy
    /// requests take its argmax, sampled ones draw from it.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        let dist = if self.drafts.is_empty() || !self.sampler.params().uses_penalties() {
            self.sampler.distribution(logits, self.prompt, self.output)
        } else {
            let hist: Vec<u32> = self.output.iter().chain(&self.drafts).copied().collect();
            self.sampler.distribution(logits, self.prompt, &hist)
        };
        let t = self.sampler.draw(&dist);
        self.drafts.push(t);
        self.q.push(dist);
        t
    }

    /// A draft with a point-mass q (drafters that do not sample).
    pub fn force(&mut self, token: u32) {
        self.drafts.push(token);
        self.q.push(Dist::Point(token));
    }
}

/// One sequence's draft work in a step.
pub struct DraftSeq<'a> {
    /// The draft head's cache of this sequence; holds exactly `start` committed rows.
    pub kv: &'a mut dyn LatentKv,
    pub start: usize,
    /// Tokens t_{i+1} of the newly committed positions i = start..start + len.
    pub next_tokens: Vec<u32>,
    /// Row in the step's hidden tensor of position `start` (the new rows are consecutive).
    pub hidden_row: usize,
    /// Drafts to propose after catching up (0: only catch up).
    pub k: usize,
    pub picker: DraftPicker<'a>,
}

/// The draft seam: catch the draft cache up with the newly committed rows and propose up to `k`
/// tokens per sequence through its picker. On return every cache holds exactly its committed rows
/// (`start + next_tokens.len()`); the caller guarantees capacity for `k - 1` rows beyond.
pub trait Drafter: Send {
    /// `hidden: [n, hidden]` is the main model's post-norm hidden of this step's forward.
    fn draft(&mut self, model: &ModelGroup, hidden: &Tensor, seqs: &mut [DraftSeq]) -> Result<()>;
}

/// Drafts with the checkpoint's MTP layer.
#[derive(Debug, Default)]
pub struct MtpDrafter;

impl Drafter for MtpDrafter {
    fn draft(&mut self, model: &ModelGroup, hidden: &Tensor, seqs: &mut [DraftSeq]) -> Result<()> {
        let mtp =
            model.lead().mtp().ok_or_else(|| Error::Input("speculative decoding needs the checkpoint's MTP layer".into()))?;
        let mut live: Vec<&mut DraftSeq> = seqs.iter_mut().filter(|s| !s.next_tokens.is_empty()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let dev = model.lead().device();
        // catch up: every sequence's new rows in one MTP forward
        let mut batch = ForwardBatch::default();
        let mut rows: Vec<u32> = Vec::new();
        let mut last_row = Vec::with_capacity(live.len());
        for s in live.iter() {
            let n = s.next_tokens.len();
            batch.tokens.extend(&s.next_tokens);
            batch.chunks.push(SeqChunk { start_pos: s.start, len: n });
            rows.extend((s.hidden_row..s.hidden_row + n).map(|r| r as u32));
            last_row.push(rows.len() as u32 - 1);
        }
        let idx = Tensor::from_vec(rows, batch.tokens.len(), dev).ctx(|| "mtp hidden rows".into())?;
        let h = hidden.index_select(&idx, 0).ctx(|| "mtp hidden rows".into())?; // [n, hidden]
        let y = {
            let mut kv: Vec<&mut dyn LatentKv> = live.iter_mut().map(|s| &mut *s.kv as &mut dyn LatentKv).collect();
            model.mtp_forward(&batch, &h, &mut kv)?
        };
        // draft 1 from the last new row of each drafting sequence
        let mut cur: Vec<usize> = (0..live.len()).filter(|&j| live[j].k > 0).collect();
        if !cur.is_empty() {
            let pick: Vec<u32> = cur.iter().map(|&j| last_row[j]).collect();
            let idx = Tensor::from_vec(pick, cur.len(), dev).ctx(|| "mtp last rows".into())?;
            let mut g = mtp.norm(&y.index_select(&idx, 0).ctx(|| "mtp last rows".into())?)?; // [m, hidden]
            let mut step = 1;
            loop {
                let logits: Vec<Vec<f32>> = model.mtp_head_logits(&g)?.to_vec2().ctx(|| "mtp logits".into())?;
                for (&j, row) in cur.iter().zip(&logits) {
                    live[j].picker.pick(row);
                }
                // drafts step+1..: the last draft at the next position, h = the head-normed output
                let keep: Vec<usize> = (0..cur.len()).filter(|&a| live[cur[a]].k > step).collect();
                if keep.is_empty() {
                    break;
                }
                let mut batch = ForwardBatch::default();
                for &a in &keep {
                    let s = &live[cur[a]];
                    batch.tokens.push(*s.picker.drafts.last().ok_or_else(|| Error::Input("no draft to extend".into()))?);
                    batch.chunks.push(SeqChunk { start_pos: s.kv.seq_len(), len: 1 });
                }
                let idx = Tensor::from_vec(keep.iter().map(|&a| a as u32).collect::<Vec<_>>(), keep.len(), dev)
                    .ctx(|| "mtp draft rows".into())?;
                let h = g.index_select(&idx, 0).ctx(|| "mtp draft rows".into())?;
                cur = keep.iter().map(|&a| cur[a]).collect();
                let y = {
                    let sel: Vec<usize> = cur.clone();
                    let mut kv: Vec<&mut dyn LatentKv> = live
                        .iter_mut()
                        .enumerate()
                        .filter(|(j, _)| sel.contains(j))
                        .map(|(_, s)| &mut *s.kv as &mut dyn LatentKv)
                        .collect();
                    model.mtp_forward(&batch, &h, &mut kv)?
                };
                g = mtp.norm(&y)?;
                step += 1;
            }
        }
        // the recursive rows were scratch: keep committed positions only
        for s in live.iter_mut() {
            s.kv.set_seq_len(s.start + s.next_tokens.len())?;
        }
        Ok(())
    }
}

/// Verdict on one draft token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Rejected; the target's replacement token.
    Reject(u32),
}

/// Standard speculative sampling at one position: `x` was drawn from the draft distribution `q`,
/// `p` is the processed target distribution. Accept with probability min(1, p(x)/q(x)); on
/// rejection draw from normalize(max(0, p − q)). Marginally the result is distributed as `p`.
/// A point-mass target (greedy) accepts iff `x` is its token, using no randomness.
pub fn verify_draft(p: &Dist, q: &Dist, x: u32, sampler: &mut Sampler) -> Verdict {
    match p {
        Dist::Point(t) if *t == x => Verdict::Accept,
        Dist::Point(t) => Verdict::Reject(*t),
        Dist::Weights(_) => {
            let (px, qx) = (p.prob(x), q.prob(x));
            let u = sampler.uniform();
            if qx > 0.0 && u * qx < px {
                return Verdict::Accept;
            }
            let qp: HashMap<u32, f32> = q.probs().into_iter().collect();
            let residual: Vec<(u32, f32)> = p
                .probs()
                .into_iter()
                .map(|(t, pt)| (t, (pt - qp.get(&t).copied().unwrap_or(0.0)).max(0.0)))
                .filter(|r| r.1 > 0.0)
                .collect();
            // an empty residual only happens through rounding (p == q): fall back to p itself
            let fallback = if residual.is_empty() { p.clone() } else { Dist::Weights(residual) };
            Verdict::Reject(sampler.draw(&fallback))
        }
    }
}

/// Result of verifying a run of drafts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Accepted drafts, then the correction (at the first rejection) or the bonus token.
    pub tokens: Vec<u32>,
    pub accepted: usize,
}

/// Verify `drafts` (drawn from `q`) against the target logits `rows` (`drafts.len() + 1` rows:
/// row j predicts the token after the pending token and drafts 1..j).
pub fn verify(
    sampler: &mut Sampler,
    rows: &[impl AsRef<[f32]>],
    drafts: &[u32],
    q: &[Dist],
    prompt: &[u32],
    output: &[u32],
) -> Verified {
    debug_assert_eq!(rows.len(), drafts.len() + 1);
    // the history only matters to penalties; skip copying it otherwise
    let penalties = sampler.params().uses_penalties();
    let mut hist: Vec<u32> = if penalties { output.to_vec() } else { Vec::new() };
    let mut tokens = Vec::with_capacity(rows.len());
    for (j, (&x, qj)) in drafts.iter().zip(q).enumerate() {
        let p = sampler.distribution(rows[j].as_ref(), prompt, &hist);
        match verify_draft(&p, qj, x, sampler) {
            Verdict::Accept => {
                tokens.push(x);
                if penalties {
                    hist.push(x);
                }
            }
            Verdict::Reject(t) => {
                tokens.push(t);
                return Verified { tokens, accepted: j };
            }
        }
    }
    let p = sampler.distribution(rows[drafts.len()].as_ref(), prompt, &hist);
    tokens.push(sampler.draw(&p));
    Verified { accepted: drafts.len(), tokens }
}

#[cfg(test)]
mod tests;
