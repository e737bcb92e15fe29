//! The engine step's last stage: each sequence's logits sampled (or its drafts verified) and
//! the new tokens streamed out, with the stop, grammar and length checks that end a sequence.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use moeserve_core::{error::Context, Result};

use super::{Done, Engine, StepOut};
use crate::request::{Event, FinishReason};
use crate::sampling::{logprobs, TokenLogprob};
use crate::scheduler::Seq;
use crate::spec;
use crate::stop::StopOutcome;
use crate::tokenizer::Tokenizer;

impl Engine {
    /// [`Engine::sample_and_emit`] over the step's logits, read in place.
    pub(super) fn sample(&mut self, out: &StepOut) -> Result<Vec<Done>> {
        let Some(logits) = &out.logits else { return Ok(Vec::new()) };
        let (_, vocab) = logits.dims2().ctx(|| "logits".into())?;
        moeserve_model::with_f32(logits, |all| self.sample_and_emit(&out.rows, all, vocab)).ctx(|| "logits".into())
    }

    /// Sample (or verify drafts) and stream the new tokens of each sequence's `rows` of the f32
    /// `logits` (`[.., vocab]`); returns the sequences that end.
    fn sample_and_emit(&mut self, seq_rows: &[(usize, Range<usize>)], logits: &[f32], vocab: usize) -> Vec<Done> {
        let now = Instant::now();
        let mut done: Vec<Done> = Vec::new();
        for (i, range) in seq_rows {
            let i = *i;
            let rows: Vec<&[f32]> = range.clone().map(|r| &logits[r * vocab..(r + 1) * vocab]).collect();
            let s = &mut self.sched.running[i];
            let tokens: Vec<(u32, Option<TokenLogprob>)> = if rows.len() == 1 {
                // (a constrained sequence masks a copy: its log-probabilities stay the model's)
                let logits = match s.constraint.as_mut() {
                    None => std::borrow::Cow::Borrowed(rows[0]),
                    Some(c) => {
                        let mut masked = rows[0].to_vec();
                        if let Err(e) = c.apply(&mut masked) {
                            let _ = s.events.try_send(Event::Error(e.to_string()));
                            done.push((i, FinishReason::Abort, String::new(), None));
                            continue;
                        }
                        std::borrow::Cow::Owned(masked)
                    }
                };
                let token = s.sampler.sample_with_history(&logits, &s.req.prompt, &s.output);
                vec![(token, s.req.logprobs.map(|k| logprobs(rows[0], token, k)))]
            } else {
                let drafts = std::mem::take(&mut s.spec.drafts);
                let q = std::mem::take(&mut s.spec.q);
                let v = spec::verify(&mut s.sampler, &rows, &drafts, &q, &s.req.prompt, &s.output);
                // the rejected drafts' rows are rolled back (their pages are freed when drafting)
                s.table.len -= drafts.len() - v.accepted;
                s.spec.stats.record(drafts.len(), v.accepted);
                if let Ok(mut m) = self.metrics.lock() {
                    m.speculative.record(drafts.len(), v.accepted);
                }
                v.tokens.into_iter().map(|t| (t, None)).collect()
            };
            // tokens after a stop or max_tokens inside an accepted run are dropped
            for (token, lp) in tokens {
                if let Some(d) = self.emit(i, token, lp, now) {
                    done.push(d);
                    break;
                }
            }
        }
        done
    }

    /// Append one token to running sequence `i` and stream it; returns its end if this token ends it.
    fn emit(&mut self, i: usize, token: u32, lp: Option<TokenLogprob>, now: Instant) -> Option<Done> {
        let s = &mut self.sched.running[i];
        let grammar_done = match s.constraint.as_mut() {
            Some(c) => c.consume(token).is_ok() && c.is_finished(),
            None => false,
        };
        s.output.push(token);
        if let Ok(mut m) = self.metrics.lock() {
            m.generated_tokens += 1;
            match s.last_token {
                None => m.time_to_first_token.observe(now - s.arrival),
                Some(t) => m.inter_token_latency.observe(now - t),
            }
        }
        s.last_token = Some(now);
        let is_stop_token = s.stop_ids.contains(&token);
        let mut stopped_by: Option<String> = None;
        let text = match (&self.tokenizer, is_stop_token) {
            (Some(tok), false) => match s.detok.push(tok, token) {
                Ok(Some(delta)) => match s.stop.push(&delta) {
                    StopOutcome::Continue(t) => t,
                    StopOutcome::Stopped { text, stop } => {
                        stopped_by = Some(stop);
                        text
                    }
                },
                Ok(None) => String::new(),
                Err(e) => {
                    let _ = s.events.try_send(Event::Error(e.to_string()));
                    String::new()
                }
            },
            _ => String::new(),
        };
        let _ = s.events.try_send(Event::Token { index: s.index, token, text, logprob: lp });
        if stopped_by.is_some() || is_stop_token || grammar_done {
            let tail = if grammar_done && !is_stop_token { held_text(&self.tokenizer, s).0 } else { String::new() };
            Some((i, FinishReason::Stop, tail, stopped_by))
        } else if s.output.len() >= s.req.max_tokens {
            let (tail, stop) = held_text(&self.tokenizer, s);
            let reason = if stop.is_some() { FinishReason::Stop } else { FinishReason::Length };
            Some((i, reason, tail, stop))
        } else {
            None
        }
    }
}

/// Release what is still held back at the end (partial characters, stop-string prefixes); a stop
/// string completed by that text is honoured.
fn held_text(tokenizer: &Option<Arc<Tokenizer>>, s: &mut Seq) -> (String, Option<String>) {
    let mut tail = String::new();
    if let Some(tok) = tokenizer {
        if let Ok(Some(rest)) = s.detok.flush(tok) {
            tail.push_str(&rest);
        }
    }
    match s.stop.push(&tail) {
        StopOutcome::Continue(t) => (t + &s.stop.flush(), None),
        StopOutcome::Stopped { text, stop } => (text, Some(stop)),
    }
}
