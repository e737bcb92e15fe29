//! The engine: batching, chunked prefill, prefix caching and preemption give every request the
//! tokens it gets alone; sampling parameters, stops, aborts and overload behave.

mod common;
use common::assert_all_pages_free;
use std::path::PathBuf;

use moeserve_engine::sampling::SamplingParams;
use moeserve_engine::{Engine, EngineConfig, EngineHandle, Event, FinishReason, Request, RequestStream, SubmitError, Usage};
use moeserve_model::{DeepSeekModel, LoadOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn engine(cfg: EngineConfig) -> EngineHandle {
    let model = DeepSeekModel::load(&root().join("tests/fixtures/tiny-v3"), &LoadOptions::default()).unwrap();
    Engine::start(model, None, cfg).unwrap()
}

#[derive(Debug, Clone, Default)]
struct Choice {
    tokens: Vec<u32>,
    text: String,
    logprobs: Vec<Vec<(u32, f32)>>,
    finish: Option<FinishReason>,
    usage: Usage,
}

fn collect(mut s: RequestStream, n: usize) -> Vec<Choice> {
    let mut out = vec![Choice::default(); n];
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token { index, token, text, logprob } => {
                out[index].tokens.push(token);
                out[index].text.push_str(&text);
                if let Some(lp) = logprob {
                    out[index].logprobs.push(lp.top);
                }
            }
            Event::Finished { index, reason, text, usage, .. } => {
                out[index].text.push_str(&text);
                out[index].finish = Some(reason);
                out[index].usage = usage;
            }
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    out
}

/// Deterministic prompts of different lengths.
fn prompt(i: usize) -> Vec<u32> {
    std::iter::once(0).chain((0..(5 + 7 * i)).map(|k| ((k * 37 + i * 101) % 4000 + 2) as u32)).collect()
}

fn greedy_req(p: Vec<u32>, max_tokens: usize) -> Request {
    Request { sampling: SamplingParams::greedy(), logprobs: Some(5), ignore_eos: true, ..Request::new(p, max_tokens) }
}

fn alone(e: &EngineHandle, req: Request) -> Choice {
    collect(e.submit(req).unwrap(), 1).remove(0)
}

fn assert_same(a: &Choice, b: &Choice, what: &str) {
    assert_eq!(a.tokens, b.tokens, "{what}: tokens");
    for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
        for ((ti, lx), (tj, ly)) in x.iter().zip(y) {
            assert!((lx - ly).abs() < 1e-4, "{what}: logprob {ti}/{tj} {lx} vs {ly}");
        }
    }
}

#[test]
fn concurrent_requests_match_running_alone() {
    let e = engine(EngineConfig { prefix_caching: false, ..Default::default() });
    let reqs: Vec<Request> = (0..8).map(|i| greedy_req(prompt(i), 6 + i)).collect();
    let solo: Vec<Choice> = reqs.iter().map(|r| alone(&e, r.clone())).collect();
    let streams: Vec<RequestStream> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    for (i, s) in streams.into_iter().enumerate() {
        let got = collect(s, 1).remove(0);
        assert_same(&got, &solo[i], &format!("request {i}"));
        assert_eq!(got.finish, Some(FinishReason::Length));
        assert_eq!(got.usage.completion_tokens, 6 + i);
    }
    assert!(e.metrics().steps > 0);
    assert_all_pages_free(&e);
}

/// The batched paged engine (its sequences' attention in one pass over the page pool, a
/// prefill chunk beside decodes on its own) gives `generate`'s greedy tokens on a contiguous
/// cache (each sequence's attention a call of its own).
#[test]
fn batched_paged_attention_matches_the_contiguous_cache() {
    let dir = root().join("tests/fixtures/tiny-v3");
    let model =
        std::sync::Arc::new(moeserve_model::ModelGroup::from(DeepSeekModel::load(&dir, &LoadOptions::default()).unwrap()));
    let e = engine(EngineConfig { prefix_caching: false, max_batch_tokens: 24, ..Default::default() });
    let reqs: Vec<Request> = (0..6).map(|i| greedy_req(prompt(i), 7)).collect();
    let streams: Vec<RequestStream> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    for (i, (s, r)) in streams.into_iter().zip(&reqs).enumerate() {
        let req = moeserve_engine::GenerateRequest {
            prompt: r.prompt.clone(),
            max_tokens: 7,
            sampling: SamplingParams::greedy(),
            stop_tokens: vec![],
            num_draft_tokens: 0,
        };
        let mut want = Vec::new();
        moeserve_engine::generate(&model, &req, |t| {
            want.push(t);
            Ok(())
        })
        .unwrap();
        assert_eq!(collect(s, 1).remove(0).tokens, want, "request {i}");
    }
    assert_all_pages_free(&e);
}

/// The same in bf16 on pages of 16, where a batched step's sequences attend over the bf16 pool
/// in one parallel loop (the CPU's bf16 decode kernel, where it runs; the f32 reading elsewhere).
#[test]
fn concurrent_requests_match_running_alone_in_bf16() {
    let dir = root().join("tests/fixtures/tiny-v3");
    let model = DeepSeekModel::load(&dir, &LoadOptions { dtype: candle_core::DType::BF16, ..Default::default() }).unwrap();
    let e = Engine::start(model, None, EngineConfig { prefix_caching: false, page_size: 16, ..Default::default() }).unwrap();
    let reqs: Vec<Request> = (0..4).map(|i| greedy_req(prompt(i), 5 + i)).collect();
    let solo: Vec<Choice> = reqs.iter().map(|r| alone(&e, r.clone())).collect();
    let streams: Vec<RequestStream> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    for (i, s) in streams.into_iter().enumerate() {
        let got = collect(s, 1).remove(0);
        assert_eq!(got.tokens, solo[i].tokens, "request {i}: tokens");
        for (x, y) in got.logprobs.iter().zip(&solo[i].logprobs) {
            for ((ti, lx), (tj, ly)) in x.iter().zip(y) {
                assert!((lx - ly).abs() < 0.05, "request {i}: logprob {ti}/{tj} {lx} vs {ly}");
            }
        }
    }
    assert_all_pages_free(&e);
}

#[test]
fn chunked_prefill_equals_unchunked() {
    let big = engine(EngineConfig::default());
    let small = engine(EngineConfig { max_batch_tokens: 7, ..Default::default() });
    for i in [3, 6] {
        let r = greedy_req(prompt(i), 5);
        assert_same(&alone(&small, r.clone()), &alone(&big, r), "chunked");
    }
}

#[test]
fn prefix_cache_hit_gives_the_same_output_and_reports_cached_tokens() {
    let e = engine(EngineConfig { page_size: 4, ..Default::default() });
    let p = prompt(5); // 41 tokens
    let first = alone(&e, greedy_req(p.clone(), 6));
    assert_eq!(first.usage.cached_prompt_tokens, 0);
    let second = alone(&e, greedy_req(p.clone(), 6));
    assert_same(&second, &first, "prefix hit");
    assert_eq!(second.usage.cached_prompt_tokens, 40, "10 full pages of the 41-token prompt");
    // a shared prefix with a different tail reuses the common full pages only
    let mut q = p[..20].to_vec();
    q.extend([7, 8, 9]);
    let third = alone(&e, greedy_req(q.clone(), 4));
    assert_eq!(third.usage.cached_prompt_tokens, 20);
    let fresh = engine(EngineConfig { prefix_caching: false, ..Default::default() });
    assert_same(&third, &alone(&fresh, greedy_req(q, 4)), "partial prefix hit");
    assert!(e.metrics().prefix_hit_rate() > 0.0);
    assert_all_pages_free(&e);
}

#[test]
fn preemption_under_a_tiny_page_budget_completes_every_request() {
    let reference = engine(EngineConfig::default());
    // 4-token pages, 12 pages: 48 token slots for 6 requests of ~30-50 tokens each
    let layout_bytes = 3 * (32 + 8) * 4; // layers × row × f32
    let e =
        engine(EngineConfig { page_size: 4, kv_cache_bytes: 12 * 4 * layout_bytes, prefix_caching: false, ..Default::default() });
    let reqs: Vec<Request> = (0..6).map(|i| greedy_req(prompt(i % 4), 8)).collect();
    let solo: Vec<Choice> = reqs.iter().map(|r| alone(&reference, r.clone())).collect();
    let streams: Vec<RequestStream> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    for (i, s) in streams.into_iter().enumerate() {
        assert_same(&collect(s, 1)[0], &solo[i], &format!("preempted request {i}"));
    }
    assert!(e.metrics().preemptions > 0, "the budget should force preemption");
    assert_all_pages_free(&e);
}

#[test]
fn seeded_sampling_is_independent_of_the_batch() {
    let e = engine(EngineConfig::default());
    let sampled = |seed| Request {
        sampling: SamplingParams { temperature: 1.0, top_p: 0.9, seed: Some(seed), ..Default::default() },
        ignore_eos: true,
        ..Request::new(prompt(2), 12)
    };
    let solo = alone(&e, sampled(11));
    let others: Vec<RequestStream> = (0..5).map(|i| e.submit(greedy_req(prompt(i), 10)).unwrap()).collect();
    let batched = collect(e.submit(sampled(11)).unwrap(), 1).remove(0);
    drop(others);
    assert_eq!(batched.tokens, solo.tokens);
    assert_ne!(alone(&e, sampled(12)).tokens, solo.tokens, "another seed samples differently");
}

#[test]
fn n_choices_stop_tokens_and_top_k_1() {
    let e = engine(EngineConfig::default());
    let greedy = alone(&e, greedy_req(prompt(1), 8));
    // top_k = 1 at temperature 1 equals greedy
    let k1 =
        Request { sampling: SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() }, ..greedy_req(prompt(1), 8) };
    assert_eq!(alone(&e, k1).tokens, greedy.tokens);
    // a stop token ends the choice right after it is emitted
    let stop = Request { stop_token_ids: vec![greedy.tokens[2]], ..greedy_req(prompt(1), 8) };
    let stopped = alone(&e, stop);
    assert_eq!(stopped.tokens, greedy.tokens[..3].to_vec());
    assert_eq!(stopped.finish, Some(FinishReason::Stop));
    // n = 3 seeded choices, each complete
    let n3 = Request {
        n: 3,
        sampling: SamplingParams { temperature: 1.5, seed: Some(5), ..Default::default() },
        ignore_eos: true,
        ..Request::new(prompt(1), 6)
    };
    let choices = collect(e.submit(n3).unwrap(), 3);
    assert!(choices.iter().all(|c| c.tokens.len() == 6 && c.finish == Some(FinishReason::Length)));
    assert!(choices[0].tokens != choices[1].tokens || choices[1].tokens != choices[2].tokens);
}

#[test]
fn dropping_a_stream_aborts_and_frees_pages() {
    let e = engine(EngineConfig::default());
    let mut s = e.submit(greedy_req(prompt(4), 80)).unwrap();
    assert!(matches!(s.blocking_next(), Some(Event::Token { .. })));
    drop(s);
    assert_all_pages_free(&e);
    for _ in 0..200 {
        if e.metrics().requests_aborted == 1 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("abort not counted: {:?}", e.metrics());
}

#[test]
fn invalid_and_overloaded_requests_are_rejected() {
    let e = engine(EngineConfig { max_waiting: 2, ..Default::default() });
    let bad = [
        Request::new(vec![], 4),
        Request::new(vec![0, 99_999], 4),
        Request::new(vec![0], 0),
        Request::new(vec![0], 1000),
        Request { n: 0, ..Request::new(vec![0], 4) },
        Request { stop: vec!["x".into()], ..Request::new(vec![0], 4) },
        Request { sampling: SamplingParams { top_p: 2.0, ..Default::default() }, ..Request::new(vec![0], 4) },
    ];
    for r in bad {
        assert!(matches!(e.submit(r.clone()), Err(SubmitError::Invalid(_))), "{r:?}");
    }
    let overloaded = Request { n: 3, ..Request::new(vec![0, 1], 4) };
    assert!(matches!(e.submit(overloaded), Err(SubmitError::Overloaded(_))));
}

/// The built-in tiny preset with the real tokenizer, so text and stop strings can be tested.
fn engine_with_tokenizer() -> (EngineHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = moeserve_model::synth::preset("tiny").unwrap();
    moeserve_model::synth::write_checkpoint(&cfg, dir.path(), &Default::default()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(root().join("models/deepseek-v3").join(f), dir.path().join(f)).unwrap();
    }
    let model = DeepSeekModel::load(dir.path(), &LoadOptions::default()).unwrap();
    let tok = moeserve_engine::Tokenizer::from_dir(dir.path()).unwrap();
    (Engine::start(model, Some(std::sync::Arc::new(tok)), EngineConfig::default()).unwrap(), dir)
}

#[test]
fn streamed_text_and_stop_strings() {
    let (e, dir) = engine_with_tokenizer();
    let tok = moeserve_engine::Tokenizer::from_dir(dir.path()).unwrap();
    let p = tok.encode("The quick brown fox").unwrap();
    let full = alone(&e, Request { sampling: SamplingParams::greedy(), ignore_eos: true, ..Request::new(p.clone(), 16) });
    assert_eq!(full.text, tok.decode(&full.tokens).unwrap(), "streamed deltas concatenate to the decoded text");
    // a stop string from the middle of that text truncates before its first occurrence
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    let (a, b) = (chars[chars.len() / 2].0, chars.get(chars.len() / 2 + 2).map_or(full.text.len(), |c| c.0));
    let stop = full.text[a..b].to_string();
    let cut = full.text.find(&stop).unwrap();
    let req = Request { sampling: SamplingParams::greedy(), ignore_eos: true, stop: vec![stop.clone()], ..Request::new(p, 16) };
    let stopped = alone(&e, req);
    assert_eq!(stopped.text, full.text[..cut], "stop string {stop:?}");
    assert_eq!(stopped.finish, Some(FinishReason::Stop));
    assert!(stopped.tokens.len() <= full.tokens.len());
}
