//! MTP speculative decoding: greedy output equals plain decoding (tiny-v3 and a synthetic
//! checkpoint, K = 1..3, batched, with prefix caching and rollback), a draft that always agrees
//! gives K + 1 tokens per step, and stops inside an accepted run end the output where they should.

mod common;
use common::assert_all_pages_free;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Tensor;
use moeserve_engine::sampling::SamplingParams;
use moeserve_engine::spec::{DraftSeq, Drafter};
use moeserve_engine::{
    generate, Engine, EngineConfig, EngineHandle, Event, FinishReason, GenerateRequest, Request, RequestStream, Tokenizer, Usage,
};
use moeserve_model::synth::{self, SynthOptions};
use moeserve_model::{DeepSeekModel, LoadOptions};

fn tiny_v3() -> DeepSeekModel {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v3");
    DeepSeekModel::load(&dir, &LoadOptions::default()).unwrap()
}

#[derive(Debug, Clone, Default)]
struct Choice {
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    usage: Usage,
}

fn collect(mut s: RequestStream) -> Choice {
    let mut c = Choice::default();
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token { token, text, .. } => {
                c.tokens.push(token);
                c.text.push_str(&text);
            }
            Event::Finished { reason, usage, text, .. } => {
                c.text.push_str(&text);
                c.finish = Some(reason);
                c.usage = usage;
            }
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    c
}

/// Deterministic prompts of different lengths (some share a prefix).
fn prompt(i: usize) -> Vec<u32> {
    let mut p: Vec<u32> = std::iter::once(0).chain((0..(5 + 7 * i)).map(|k| ((k * 37 + i * 101) % 4000 + 2) as u32)).collect();
    if i % 3 == 2 {
        p.splice(1..1, (0..12).map(|k| (k * 11 + 3) as u32));
    }
    p
}

fn greedy(p: Vec<u32>, max_tokens: usize) -> Request {
    Request { sampling: SamplingParams::greedy(), ignore_eos: true, ..Request::new(p, max_tokens) }
}

/// All requests submitted at once (continuous batching), results in order.
fn run_batch(e: &EngineHandle, reqs: &[Request]) -> Vec<Choice> {
    let streams: Vec<RequestStream> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    streams.into_iter().map(collect).collect()
}

fn plain_reference(reqs: &[Request]) -> Vec<Vec<u32>> {
    let e = Engine::start(tiny_v3(), None, EngineConfig { prefix_caching: false, ..Default::default() }).unwrap();
    reqs.iter().map(|r| collect(e.submit(r.clone()).unwrap()).tokens).collect()
}

#[test]
fn greedy_mtp_output_equals_plain_decoding_on_tiny_v3() {
    let reqs: Vec<Request> = (0..5).map(|i| greedy(prompt(i), 9 + 2 * i)).collect();
    let want = plain_reference(&reqs);
    for k in 1..=3 {
        let cfg = EngineConfig { num_draft_tokens: k, page_size: 4, ..Default::default() };
        let e = Engine::start(tiny_v3(), None, cfg).unwrap();
        // twice: the second round hits the prefix cache (pages carrying draft rows)
        for round in 0..2 {
            let got = run_batch(&e, &reqs);
            for (i, g) in got.iter().enumerate() {
                assert_eq!(g.tokens, want[i], "K={k} round {round} request {i}");
                assert_eq!(g.finish, Some(FinishReason::Length));
                let sp = g.usage.speculative.as_ref().expect("speculative usage");
                assert!(sp.steps > 0 && sp.draft_tokens >= sp.steps, "K={k}: {sp:?}");
                // prefill gives 1 token, a verification accepted + 1, a step without drafts 1
                assert!(sp.steps + sp.accepted_tokens < g.tokens.len() as u64, "K={k}: {sp:?}");
                if round == 1 {
                    assert!(g.usage.cached_prompt_tokens > 0, "round 2 request {i} reuses cached pages");
                }
            }
        }
        let m = e.metrics();
        assert_eq!(m.num_draft_tokens, k);
        assert!(m.speculative.steps > 0 && m.speculative.proposed_at.len() == k);
        assert_all_pages_free(&e);
    }
}

/// A bf16 model on a paged bf16 cache (pages of 16: the CPU's bf16 decode kernel reads the pool
/// in place where the CPU has AVX-512 BF16): MTP output equals plain decoding of the same model
/// on a contiguous cache (`generate`), batched, K = 1 and 2.
#[test]
fn greedy_mtp_output_equals_plain_decoding_in_bf16() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v3");
    let load = || DeepSeekModel::load(&dir, &LoadOptions { dtype: candle_core::DType::BF16, ..Default::default() }).unwrap();
    let reqs: Vec<Request> = (0..4).map(|i| greedy(prompt(i), 12)).collect();
    let plain = Engine::start(load(), None, EngineConfig { prefix_caching: false, page_size: 16, ..Default::default() }).unwrap();
    let want = run_batch(&plain, &reqs);
    let model = load();
    for (i, r) in reqs.iter().enumerate() {
        // the paged engine's tokens are the contiguous cache's greedy tokens
        let mut cache = model.new_cache();
        let mut tokens = Vec::new();
        let mut batch_tokens = r.prompt.clone();
        let mut pos = 0;
        for _ in 0..12 {
            let h = model.forward(&moeserve_model::ForwardBatch::single(&batch_tokens, pos), &mut [&mut cache]).unwrap();
            let logits = model.logits(&h).unwrap().to_dtype(candle_core::DType::F32).unwrap();
            let last: Vec<f32> = logits.get(logits.dims()[0] - 1).unwrap().to_vec1().unwrap();
            let next = moeserve_model::router::top_indices(&last, 1)[0] as u32;
            tokens.push(next);
            pos += batch_tokens.len();
            batch_tokens = vec![next];
        }
        assert_eq!(want[i].tokens, tokens, "request {i}: paged engine vs contiguous cache");
    }
    for k in 1..=2 {
        let cfg = EngineConfig { num_draft_tokens: k, page_size: 16, ..Default::default() };
        let e = Engine::start(load(), None, cfg).unwrap();
        let got = run_batch(&e, &reqs);
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.tokens, want[i].tokens, "K={k} request {i}");
            assert!(g.usage.speculative.as_ref().is_some_and(|sp| sp.steps > 0), "K={k}: speculative steps ran");
        }
        assert_all_pages_free(&e);
    }
}

#[test]
fn chunked_prefill_and_small_budgets_keep_mtp_output_exact() {
    let reqs: Vec<Request> = (0..4).map(|i| greedy(prompt(i + 2), 8)).collect();
    let want = plain_reference(&reqs);
    // 5 tokens per step: prompts are chunked and drafts get trimmed to the budget
    let cfg = EngineConfig { num_draft_tokens: 3, page_size: 4, max_batch_tokens: 5, ..Default::default() };
    let e = Engine::start(tiny_v3(), None, cfg).unwrap();
    let got = run_batch(&e, &reqs);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.tokens, want[i], "request {i}");
    }
    assert_all_pages_free(&e);
}

#[test]
fn preemption_and_prefix_hits_under_a_tiny_page_budget_keep_mtp_output_exact() {
    let reqs: Vec<Request> = (0..6).map(|i| greedy(prompt(i % 4), 8)).collect();
    let want = plain_reference(&reqs);
    // 4-token pages of 3 main + 1 MTP layers × (32 + 8) f32 values: 14 pages for ~35-token requests
    let page_bytes = 4 * 4 * (32 + 8) * 4;
    let cfg = EngineConfig { num_draft_tokens: 2, page_size: 4, kv_cache_bytes: 14 * page_bytes, ..Default::default() };
    let e = Engine::start(tiny_v3(), None, cfg).unwrap();
    for (i, g) in run_batch(&e, &reqs).iter().enumerate() {
        assert_eq!(g.tokens, want[i], "request {i}");
    }
    let m = e.metrics();
    assert!(m.preemptions > 0, "the budget should force preemption");
    assert!(m.speculative.steps > 0);
    assert_all_pages_free(&e);
}

/// Drafts from known reference continuations: exact for `agree(prompt index, output len, j)`,
/// else a wrong token. It writes no draft rows (nothing reads them).
struct Oracle {
    refs: HashMap<Vec<u32>, (usize, Vec<u32>)>,
    agree: fn(usize, usize, usize) -> bool,
    vocab: u32,
}

impl Drafter for Oracle {
    fn draft(&mut self, _: &moeserve_model::ModelGroup, _: &Tensor, seqs: &mut [DraftSeq]) -> moeserve_core::Result<()> {
        for s in seqs.iter_mut() {
            let (idx, r) = &self.refs[s.picker.prompt];
            let at = s.picker.output.len();
            for j in 0..s.k {
                let right = r.get(at + j).copied().unwrap_or(0);
                let t = if (self.agree)(*idx, at, j) { right } else { (right + 1) % self.vocab };
                s.picker.force(t);
            }
        }
        Ok(())
    }
}

fn oracle_engine(reqs: &[Request], want: &[Vec<u32>], k: usize, agree: fn(usize, usize, usize) -> bool) -> EngineHandle {
    let refs = reqs.iter().zip(want).enumerate().map(|(i, (r, w))| (r.prompt.clone(), (i, w.clone()))).collect();
    let model = tiny_v3();
    let vocab = model.cfg.vocab_size as u32;
    let cfg = EngineConfig { num_draft_tokens: k, page_size: 4, ..Default::default() };
    Engine::start_with_drafter(model, None, cfg, Some(Box::new(Oracle { refs, agree, vocab }))).unwrap()
}

#[test]
fn a_draft_that_always_agrees_yields_k_plus_one_tokens_per_step() {
    let n = 13;
    let reqs = vec![greedy(prompt(1), n)];
    let want = plain_reference(&reqs);
    for k in [1, 2, 3] {
        let e = oracle_engine(&reqs, &want, k, |_, _, _| true);
        let got = collect(e.submit(reqs[0].clone()).unwrap());
        assert_eq!(got.tokens, want[0], "K={k}");
        let sp = got.usage.speculative.unwrap();
        // prefill yields 1 token, then every step K + 1 (the last one only what max_tokens leaves)
        let steps = (n - 1).div_ceil(k + 1);
        assert_eq!(sp.steps as usize, steps, "K={k}: {sp:?}");
        assert_eq!(sp.accepted_tokens, sp.draft_tokens, "every draft accepted");
        let full = (n - 1) / (k + 1);
        assert!(sp.proposed_at[..k].iter().all(|&p| p as usize >= full));
        assert!(sp.acceptance_rate_per_position().iter().all(|&r| r == 1.0));
        if (n - 1) % (k + 1) == 0 {
            assert!((sp.mean_accepted_length() - (k + 1) as f64).abs() < 1e-9, "{sp:?}");
        }
        // engine steps: one prefill step plus one per verification (counted once the step
        // ends, which the page check waits for)
        assert_all_pages_free(&e);
        assert_eq!(e.metrics().steps as usize, 1 + steps, "K={k}");
    }
}

#[test]
fn rejected_and_partially_accepted_drafts_roll_back_in_one_batch() {
    let reqs: Vec<Request> = (0..5).map(|i| greedy(prompt(i), 12)).collect();
    let want = plain_reference(&reqs);
    // never right: every draft is rejected
    let e = oracle_engine(&reqs, &want, 3, |_, _, _| false);
    for (i, g) in run_batch(&e, &reqs).iter().enumerate() {
        assert_eq!(g.tokens, want[i], "request {i}");
        assert_eq!(g.usage.speculative.as_ref().unwrap().accepted_tokens, 0);
    }
    assert_all_pages_free(&e);
    // different accepted lengths for different sequences in the same step
    let e = oracle_engine(&reqs, &want, 3, |i, at, j| (i * 31 + at * 17 + j * 7) % 11 < 7);
    let got = run_batch(&e, &reqs);
    let mut lengths = std::collections::HashSet::new();
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.tokens, want[i], "request {i}");
        let sp = g.usage.speculative.as_ref().unwrap();
        assert!(sp.accepted_tokens > 0 && sp.accepted_tokens < sp.draft_tokens, "{sp:?}");
        lengths.insert(sp.accepted_tokens);
    }
    assert!(lengths.len() > 1, "sequences accepted different amounts");
    assert_all_pages_free(&e);
}

#[test]
fn stops_and_max_tokens_inside_an_accepted_run_end_the_output_there() {
    let base = greedy(prompt(2), 16);
    let want = plain_reference(std::slice::from_ref(&base)).remove(0);
    let e = oracle_engine(std::slice::from_ref(&base), std::slice::from_ref(&want), 3, |_, _, _| true);
    // a stop token in the middle of a K + 1 run (the token at index 6 is accepted together with 5..8)
    let stop = want[6];
    let first = want.iter().position(|&t| t == stop).unwrap();
    let r = Request { stop_token_ids: vec![stop], ..base.clone() };
    let got = collect(e.submit(r).unwrap());
    assert_eq!(got.tokens, want[..=first], "output ends at the stop token");
    assert_eq!(got.finish, Some(FinishReason::Stop));
    assert_eq!(got.usage.completion_tokens, first + 1);
    // max_tokens inside a run
    for max in [2, 3, 6, 7] {
        let got = collect(e.submit(Request { max_tokens: max, ..base.clone() }).unwrap());
        assert_eq!(got.tokens, want[..max], "max_tokens {max}");
        assert_eq!(got.finish, Some(FinishReason::Length));
    }
    assert_all_pages_free(&e);
}

#[test]
fn a_stop_string_inside_an_accepted_run_truncates_the_text() {
    // the tiny preset with the real tokenizer, so stop strings apply
    let dir = tempfile::tempdir().unwrap();
    synth::write_checkpoint(&synth::preset("tiny").unwrap(), dir.path(), &SynthOptions::default()).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(root.join("models/deepseek-v3").join(f), dir.path().join(f)).unwrap();
    }
    let load = || DeepSeekModel::load(dir.path(), &LoadOptions::default()).unwrap();
    let tok = Arc::new(Tokenizer::from_dir(dir.path()).unwrap());
    let plain = Engine::start(load(), Some(tok.clone()), EngineConfig::default()).unwrap();
    let base = greedy(tok.encode("The quick brown fox").unwrap(), 16);
    let full = collect(plain.submit(base.clone()).unwrap());
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    let (a, b) = (chars[chars.len() / 2].0, chars.get(chars.len() / 2 + 2).map_or(full.text.len(), |c| c.0));
    let stop = full.text[a..b].to_string();
    let cut = full.text.find(&stop).unwrap();
    let refs = HashMap::from([(base.prompt.clone(), (0, full.tokens.clone()))]);
    let oracle = Oracle { refs, agree: |_, _, _| true, vocab: tok.vocab_size() as u32 };
    let cfg = EngineConfig { num_draft_tokens: 3, ..Default::default() };
    let e = Engine::start_with_drafter(load(), Some(tok), cfg, Some(Box::new(oracle))).unwrap();
    let got = collect(e.submit(Request { stop: vec![stop.clone()], ..base }).unwrap());
    assert_eq!(got.text, full.text[..cut], "stop string {stop:?}");
    assert_eq!(got.finish, Some(FinishReason::Stop));
    assert!(full.tokens.starts_with(&got.tokens) && got.tokens.len() < full.tokens.len());
    assert!(got.usage.speculative.unwrap().accepted_tokens > 0);
}

#[test]
fn sampled_and_fallback_requests_with_mtp() {
    let e = Engine::start(tiny_v3(), None, EngineConfig { num_draft_tokens: 2, ..Default::default() }).unwrap();
    let sampled = Request {
        sampling: SamplingParams { temperature: 0.8, top_p: 0.9, repetition_penalty: 1.1, seed: Some(3), ..Default::default() },
        ignore_eos: true,
        n: 2,
        ..Request::new(prompt(3), 10)
    };
    let mut s = e.submit(sampled.clone()).unwrap();
    let mut counts = [0usize; 2];
    let mut usage = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token { index, token, .. } => {
                assert!((token as usize) < 4096);
                counts[index] += 1;
            }
            Event::Finished { usage: u, .. } => usage.push(u),
            Event::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!(counts, [10, 10]);
    assert!(usage.iter().all(|u| u.speculative.as_ref().is_some_and(|sp| sp.steps > 0)));
    // logprobs requests decode without drafts (and say so: no speculative usage)
    let lp = collect(e.submit(Request { logprobs: Some(2), ..greedy(prompt(1), 5) }).unwrap());
    assert_eq!(lp.tokens.len(), 5);
    assert!(lp.usage.speculative.is_none());
    assert_all_pages_free(&e);
    // a checkpoint without an MTP layer cannot speculate
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v2");
    let v2 = DeepSeekModel::load(&dir, &LoadOptions::default()).unwrap();
    assert!(Engine::start(v2, None, EngineConfig { num_draft_tokens: 1, ..Default::default() }).is_err());
}

#[test]
fn generate_with_mtp_equals_plain_generate_on_tiny_v3_and_a_synthetic_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth::preset("tiny").unwrap();
    synth::write_checkpoint(&cfg, dir.path(), &SynthOptions { seed: 11, ..Default::default() }).unwrap();
    let synth_model = DeepSeekModel::load(dir.path(), &LoadOptions::default()).unwrap();
    let group = |m: DeepSeekModel| Arc::new(moeserve_model::ModelGroup::from(m));
    let models = [("tiny-v3", group(tiny_v3())), ("synth tiny", group(synth_model))];
    for (name, model) in &models {
        for i in 0..3 {
            let req = GenerateRequest {
                prompt: prompt(i),
                max_tokens: 12,
                sampling: SamplingParams::greedy(),
                stop_tokens: vec![],
                num_draft_tokens: 0,
            };
            let mut plain = Vec::new();
            let st = generate(model, &req, |t| {
                plain.push(t);
                Ok(())
            })
            .unwrap();
            assert!(st.speculative.is_none());
            for k in 1..=3 {
                let mut got = Vec::new();
                let st = generate(model, &GenerateRequest { num_draft_tokens: k, ..req.clone() }, |t| {
                    got.push(t);
                    Ok(())
                })
                .unwrap();
                assert_eq!(got, plain, "{name} prompt {i} K={k}");
                let sp = st.speculative.unwrap();
                // steps without drafts (the last token) are decode steps but not verifications
                assert!(sp.steps as usize <= st.decode_steps && sp.steps > 0);
                assert_eq!(st.decode_steps + sp.accepted_tokens as usize + 1, 12, "{name} K={k}");
            }
        }
    }
}

#[test]
fn mtp_drafter_draft_distribution_matches_the_reference_mtp_logits() {
    use moeserve_engine::spec::{DraftPicker, MtpDrafter};
    use moeserve_engine::Sampler;
    use moeserve_model::{ForwardBatch, LatentKv, Mtp};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v3");
    let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &candle_core::Device::Cpu).unwrap();
    let group = moeserve_model::ModelGroup::from(tiny_v3());
    let model = group.lead();
    for case in ["case0", "case1", "case2"] {
        let ids: Vec<u32> = reference[&format!("{case}.input_ids")].to_dtype(candle_core::DType::U32).unwrap().to_vec1().unwrap();
        let want: Vec<f32> = reference[&format!("{case}.mtp_logits_last")].to_vec1().unwrap();
        // prompt t_0..t_{T-2}; the draft head's rows take t_1..t_{T-1}, the last one is the reference row
        let t = ids.len();
        let mut cache = model.new_cache();
        let hidden = model.forward(&ForwardBatch::single(&ids[..t - 1], 0), &mut [&mut cache]).unwrap();
        let mut draft_cache = Mtp::new_cache(model);
        let mut sampler = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, seed: Some(1), ..Default::default() });
        let picker = DraftPicker::new(&mut sampler, &ids[..t - 1], &[]);
        let mut seqs = [DraftSeq { kv: &mut draft_cache, start: 0, next_tokens: ids[1..].to_vec(), hidden_row: 0, k: 2, picker }];
        MtpDrafter.draft(&group, &hidden, &mut seqs).unwrap();
        let [s] = seqs;
        assert_eq!(s.picker.drafts.len(), 2, "K = 2 drafts recursively");
        // q of draft 1 is softmax of the reference MTP logits (temperature 1, no truncation)
        let m = want.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = want.iter().map(|x| (x - m).exp()).sum();
        let worst =
            s.picker.q[0].probs().iter().map(|&(tok, p)| (p - (want[tok as usize] - m).exp() / z).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{case}: draft distribution differs from the reference by {worst}");
        assert_eq!(draft_cache.seq_len(), t - 1, "the recursive rows were rolled back");
    }
}
