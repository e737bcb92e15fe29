//! Tensor and expert parallelism on in-process CPU ranks: every layout gives the single-rank
//! logits (float32, 1e-4), MTP included, and each rank holds only its share of the weights.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use moeserve_model::{ForwardBatch, LatentKv, LoadOptions, ModelGroup, Mtp};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn load(name: &str, tp: usize, ep: usize) -> ModelGroup {
    ModelGroup::load(&fixture(name), &LoadOptions { dtype: DType::F32, ..Default::default() }, tp, ep).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

/// Logits of a 9-token prefill, two decode steps, and the MTP draft logits of the prefill rows.
fn run(g: &ModelGroup) -> Vec<Vec<f32>> {
    let prompt: Vec<u32> = vec![5, 900, 17, 4000, 33, 1021, 7, 2048, 99];
    let lead = g.lead();
    let mut cache = lead.new_cache();
    let mut mtp_cache = Mtp::new_cache(lead);
    let hidden = g.forward(&ForwardBatch::single(&prompt, 0), &mut [&mut cache]).unwrap();
    let mut out = rows(&g.logits(&hidden).unwrap());
    // MTP rows 0..8 take tokens 1..9 with the main hidden of rows 0..8
    let h = hidden.narrow(0, 0, 8).unwrap();
    let y = g.mtp_forward(&ForwardBatch::single(&prompt[1..], 0), &h, &mut [&mut mtp_cache]).unwrap();
    let normed = lead.mtp().unwrap().norm(&y).unwrap();
    out.extend(rows(&g.mtp_head_logits(&normed).unwrap()));
    for (step, token) in [(9usize, 11u32), (10, 3000)] {
        let hidden = g.forward(&ForwardBatch::single(&[token], step), &mut [&mut cache]).unwrap();
        out.extend(rows(&g.logits(&hidden).unwrap()));
    }
    assert_eq!(cache.seq_len(), 11);
    assert_eq!(mtp_cache.seq_len(), 8);
    out
}

fn assert_close(want: &[Vec<f32>], got: &[Vec<f32>], what: &str) {
    assert_eq!(want.len(), got.len(), "{what}");
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let scale = w.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let err = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(scale > 0.0 && err <= 1e-4 * scale, "{what}: row {i}: max error {err} (scale {scale})");
    }
}

#[test]
fn every_layout_gives_the_single_rank_logits() {
    for fixture in ["tiny-v3", "tiny-v3-fp8"] {
        let want = run(&load(fixture, 1, 1));
        for (tp, ep) in [(2, 1), (4, 1), (1, 2), (1, 4), (2, 2), (4, 2), (4, 4)] {
            if fixture.contains("fp8") && ![(4, 1), (1, 4), (4, 2)].contains(&(tp, ep)) {
                continue;
            }
            let g = load(fixture, tp, ep);
            assert_eq!(g.world_size(), tp.max(ep));
            assert_close(&want, &run(&g), &format!("{fixture} tp {tp} ep {ep}"));
        }
    }
}

#[test]
fn each_rank_holds_only_its_share() {
    let single = load("tiny-v3", 1, 1);
    let report = |m: &moeserve_model::DeepSeekModel, class: &str| -> usize {
        m.load_report().entries.iter().filter(|((c, _), _)| *c == class).map(|(_, (_, b))| b).sum()
    };
    let full = single.lead();
    // expert parallel: whole experts, so exactly a quarter of the expert bytes per rank
    let ep = load("tiny-v3", 1, 4);
    for (r, m) in ep.ranks().iter().enumerate() {
        assert_eq!(report(m, "experts") * 4, report(full, "experts"), "rank {r}");
        assert_eq!(report(m, "attn"), report(full, "attn"), "rank {r}: attention replicated at tp 1");
    }
    // tensor parallel: a quarter of the vocab rows of lm_head (and of the MTP head) per rank,
    // and well under half of the whole model each (these tiny rows pad to 32 columns)
    let tp = load("tiny-v3", 4, 1);
    for (r, m) in tp.ranks().iter().enumerate() {
        assert_eq!(report(m, "lm_head") * 4, report(full, "lm_head"), "rank {r}");
        assert!(m.weight_bytes() * 5 < full.weight_bytes() * 2, "rank {r}: {} of {}", m.weight_bytes(), full.weight_bytes());
    }
}

#[test]
fn unsupported_layouts_are_clear_errors() {
    let opts = LoadOptions { dtype: DType::F32, ..Default::default() };
    let err = ModelGroup::load(&fixture("tiny-v3"), &opts, 3, 1).unwrap_err().to_string();
    assert!(err.contains("num_attention_heads (4) is not divisible by the parallel size 3"), "{err}");
    let err = ModelGroup::load(&fixture("tiny-v3"), &opts, 2, 4).unwrap_err().to_string();
    assert!(err.contains("tp must be 1 or that size"), "{err}");
}

/// A rank that fails mid-step makes the others' collectives fail instead of hang; the call
/// returns that rank's error and the group works again afterwards.
#[test]
fn a_failing_rank_aborts_the_step_not_the_group() {
    let g = load("tiny-v3", 2, 2);
    let lead = g.lead();
    let mut cache = lead.new_cache();
    let hidden = g.forward(&ForwardBatch::single(&[1, 2, 3], 0), &mut [&mut cache]).unwrap();
    let err = g
        .spmd(&mut [], |m, _| {
            if m.parallel().rank() == 1 {
                return Err(moeserve_core::Error::Input("rank 1 ran out of memory".into()));
            }
            m.logits(&hidden)
        })
        .unwrap_err();
    assert!(err.to_string().contains("rank 1 ran out of memory"), "{err}");
    let again = rows(&g.logits(&hidden).unwrap());
    let single = load("tiny-v3", 1, 1);
    let mut c1 = single.lead().new_cache();
    let h1 = single.forward(&ForwardBatch::single(&[1, 2, 3], 0), &mut [&mut c1]).unwrap();
    assert_close(&rows(&single.logits(&h1).unwrap()), &again, "after an aborted step");
}
