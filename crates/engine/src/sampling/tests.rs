use super::*;

fn params() -> SamplingParams {
    SamplingParams { temperature: 1.0, top_p: 1.0, seed: Some(7), ..Default::default() }
}

fn draws(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(p);
    (0..n).map(|_| s.sample(logits)).collect()
}

fn share(d: &[u32], t: u32) -> f32 {
    d.iter().filter(|&&x| x == t).count() as f32 / d.len() as f32
}

#[test]
fn greedy_and_top_k_1_take_the_argmax() {
    let logits = [0.1, 3.0, -1.0, 2.9];
    assert_eq!(Sampler::new(SamplingParams::greedy()).sample(&logits), 1);
    assert!(draws(SamplingParams { top_k: 1, ..params() }, &logits, 200).iter().all(|&t| t == 1));
}

#[test]
fn top_p_excludes_the_tail_and_seeds_reproduce() {
    // probabilities ~ 0.64, 0.24, 0.09, 0.03 at T = 1
    let logits = [3.0, 2.0, 1.0, 0.0];
    let p = SamplingParams { top_p: 0.8, ..params() };
    let d = draws(p.clone(), &logits, 2000);
    assert!(d.iter().all(|&t| t < 2), "top-p 0.8 keeps only the first two tokens");
    assert!((share(&d, 1) - 0.27).abs() < 0.04, "renormalized share of token 1 was {}", share(&d, 1));
    assert_eq!(draws(p, &logits, 2000), d);
}

#[test]
fn top_k_min_p_and_temperature() {
    let logits = [1.0, 0.9, 0.8, -10.0];
    let d = draws(SamplingParams { temperature: 5.0, top_k: 2, ..params() }, &logits, 500);
    assert!(d.iter().all(|&t| t < 2) && d.contains(&0) && d.contains(&1));
    // relative probabilities 1, 0.37, 0.14, 0.001: min_p 0.3 keeps the first two
    let d = draws(SamplingParams { min_p: 0.3, ..params() }, &[2.0, 1.0, 0.0, -5.0], 2000);
    assert!(!d.contains(&3) && !d.contains(&2) && d.contains(&1), "min_p keeps p >= 0.3 p_max");
    // low temperature sharpens
    let cold = draws(SamplingParams { temperature: 0.1, ..params() }, &[1.0, 0.5], 500);
    assert!(share(&cold, 0) > 0.98);
}

#[test]
fn logit_bias_and_penalties() {
    let logits = [2.0, 1.9, 0.0];
    let d = draws(SamplingParams { logit_bias: vec![(2, 100.0)], ..params() }, &logits, 50);
    assert!(d.iter().all(|&t| t == 2));
    // repetition penalty on token 0 (seen in the prompt) hands the argmax to token 1
    let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.5, ..SamplingParams::greedy() });
    assert_eq!(s.sample_with_history(&logits, &[0], &[]), 1);
    // frequency penalty grows with the count; presence does not
    let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.06, ..SamplingParams::greedy() });
    assert_eq!(s.sample_with_history(&logits, &[], &[0]), 0);
    assert_eq!(s.sample_with_history(&logits, &[], &[0, 0]), 1);
    let mut s = Sampler::new(SamplingParams { presence_penalty: 0.2, ..SamplingParams::greedy() });
    assert_eq!(s.sample_with_history(&logits, &[], &[0]), 1);
}

#[test]
fn validation_rejects_out_of_range_values() {
    for bad in [
        SamplingParams { temperature: -1.0, ..params() },
        SamplingParams { top_p: 0.0, ..params() },
        SamplingParams { min_p: 1.5, ..params() },
        SamplingParams { repetition_penalty: 0.0, ..params() },
        SamplingParams { presence_penalty: 3.0, ..params() },
        SamplingParams { logit_bias: vec![(0, f32::NAN)], ..params() },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn logprobs_are_normalized() {
    let lp = logprobs(&[1.0, 2.0, 3.0], 1, 2);
    let z = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
    assert!((lp.logprob - (2.0 - z)).abs() < 1e-6);
    assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
}

/// The filters on every candidate fully sorted (their plain definition).
fn kept_by_full_sort(logits: &[f32], p: &SamplingParams) -> Vec<u32> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut cand: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(i, &x)| (i as u32, ((x - m) / p.temperature).exp())).collect();
    let total = cand.iter().map(|c| c.1).sum();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1));
    apply_filters(&mut cand, p, total);
    let mut ids: Vec<u32> = cand.iter().map(|c| c.0).collect();
    ids.sort_unstable();
    ids
}

/// Sorting only the largest candidates keeps exactly the tokens a full sort keeps, over a
/// vocabulary-sized row and every filter combination (peaked and flat distributions).
#[test]
fn partial_sort_keeps_what_a_full_sort_keeps() {
    let mut seed = 5u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as f32 / (1u64 << 31) as f32
    };
    for spread in [0.5f32, 4.0, 12.0] {
        let logits: Vec<f32> = (0..20000).map(|_| rnd() * spread).collect();
        for (top_k, min_p, top_p) in [
            (0, 0.0, 1.0),
            (40, 0.0, 1.0),
            (0, 0.0, 0.9),
            (0, 0.0, 0.3),
            (0, 0.05, 1.0),
            (0, 0.5, 0.95),
            (1000, 0.0, 0.9),
            (300, 0.01, 0.5),
        ] {
            let p = SamplingParams { top_k, min_p, top_p, ..params() };
            let Dist::Weights(cand) = Sampler::new(p.clone()).distribution(&logits, &[], &[]) else { panic!("a point mass") };
            let mut got: Vec<u32> = cand.iter().map(|c| c.0).collect();
            got.sort_unstable();
            let want = kept_by_full_sort(&logits, &p);
            let diff = got.len().abs_diff(want.len());
            // top-p's cut may move by one token with the order of the f32 sums
            assert!(
                diff <= usize::from(top_p < 1.0),
                "spread {spread}, {top_k}/{min_p}/{top_p}: {} kept, want {}",
                got.len(),
                want.len()
            );
            let common = got.iter().filter(|t| want.binary_search(t).is_ok()).count();
            assert!(common + diff >= want.len().max(got.len()), "spread {spread}, {top_k}/{min_p}/{top_p}: other tokens kept");
        }
    }
}

#[test]
fn argmax_takes_the_first_largest_and_skips_nans() {
    let mut v: Vec<f32> = (0..1000).map(|i| (i % 37) as f32).collect();
    assert_eq!(argmax(&v), 36);
    v[500] = 40.0;
    v[900] = 40.0;
    v[3] = f32::NAN;
    assert_eq!(argmax(&v), 500);
    assert_eq!(argmax(&[f32::NEG_INFINITY; 5]), 0);
    assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2);
    assert_eq!(argmax(&[]), 0);
}
