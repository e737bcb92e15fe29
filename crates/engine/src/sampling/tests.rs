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
