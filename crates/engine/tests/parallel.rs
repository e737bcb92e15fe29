//! The batching engine on tensor/expert-parallel CPU ranks: greedy tokens equal to one rank on a
//! synthetic checkpoint, with concurrent requests (continuous batching, paged latent cache,
//! prefix hits) and with MTP speculative decoding.

mod common;
use common::assert_all_pages_free;

use moeserve_engine::sampling::SamplingParams;
use moeserve_engine::{Engine, EngineConfig, EngineHandle, Event, Request};
use moeserve_model::synth::{self, SynthOptions};
use moeserve_model::{LoadOptions, ModelGroup};

fn run_all(e: &EngineHandle, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    // all submitted before any is read, so they share steps
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            let req = Request { sampling: SamplingParams::greedy(), ignore_eos: true, ..Request::new(p.clone(), max_tokens) };
            e.submit(req).unwrap()
        })
        .collect();
    streams
        .into_iter()
        .map(|mut s| {
            let mut out = Vec::new();
            while let Some(ev) = s.blocking_next() {
                match ev {
                    Event::Token { token, .. } => out.push(token),
                    Event::Error(err) => panic!("engine error: {err}"),
                    _ => {}
                }
            }
            out
        })
        .collect()
}

#[test]
fn parallel_ranks_give_the_single_rank_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth::preset("tiny").unwrap();
    synth::write_checkpoint(&cfg, dir.path(), &SynthOptions { seed: 23, ..Default::default() }).unwrap();
    // the third prompt shares the first one's prefix (a prefix-cache hit)
    let mut prompts: Vec<Vec<u32>> =
        (0..3).map(|i| (0..(9 + 13 * i)).map(|k| ((k * 131 + i * 7) % 100_000 + 2) as u32).collect()).collect();
    prompts[2] = [prompts[0].clone(), prompts[0].clone()].concat();
    let engine = |tp, ep, k| {
        let model = ModelGroup::load(dir.path(), &LoadOptions::default(), tp, ep).unwrap();
        let cfg = EngineConfig { num_draft_tokens: k, page_size: 4, ..Default::default() };
        Engine::start(model, None, cfg).unwrap()
    };
    let single = engine(1, 1, 0);
    let want = run_all(&single, &prompts, 10);
    assert!(want.iter().all(|t| t.len() == 10));
    for (tp, ep, k) in [(2, 2, 0), (1, 4, 0), (4, 1, 2), (2, 1, 1)] {
        let e = engine(tp, ep, k);
        let got = run_all(&e, &prompts, 10);
        assert_eq!(got, want, "tp {tp} ep {ep} draft tokens {k}");
        // and again, now with the prefixes cached
        assert_eq!(run_all(&e, &prompts, 10), want, "tp {tp} ep {ep} draft tokens {k}, cached prefixes");
        assert_all_pages_free(&e);
    }
}
