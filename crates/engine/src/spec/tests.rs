use super::*;
use crate::sampling::SamplingParams;

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams { temperature: 0.8, top_p: 1.0, seed: Some(seed), ..Default::default() }
}

/// Pearson chi-square of `counts` against `probs` (bins with p = 0 must be empty).
fn chi_square(counts: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            if p == 0.0 {
                assert_eq!(c, 0, "a token outside the target's support was emitted");
                0.0
            } else {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            }
        })
        .sum()
}

fn dense(d: &Dist, vocab: usize) -> Vec<f64> {
    let mut v = vec![0.0; vocab];
    for (t, p) in d.probs() {
        v[t as usize] = p as f64;
    }
    v
}

const TARGET: [f32; 6] = [1.0, 2.5, 0.3, 2.0, -1.0, 0.8];
const DRAFT: [f32; 6] = [2.0, 0.5, 1.5, 2.2, 1.0, -3.0];
const TRIALS: u64 = 40_000;

/// One speculative step per seed: draft x ~ q, verify against p; the emitted token must follow p.
fn spec_counts(target: &SamplingParams, draft_logits: &[f32], greedy_draft: bool) -> (Vec<u64>, Vec<f64>, f64) {
    let mut counts = vec![0u64; TARGET.len()];
    let mut accepted = 0;
    let mut probs = Vec::new();
    for seed in 0..TRIALS {
        let mut s = Sampler::new(SamplingParams { seed: Some(seed), ..target.clone() });
        let mut picker = DraftPicker::new(&mut s, &[], &[]);
        if greedy_draft {
            picker.force(crate::sampling::argmax(draft_logits));
        } else {
            picker.pick(draft_logits);
        }
        let (x, q) = (picker.drafts[0], picker.q[0].clone());
        let p = s.distribution(&TARGET, &[], &[]);
        probs = dense(&p, TARGET.len());
        let t = match verify_draft(&p, &q, x, &mut s) {
            Verdict::Accept => {
                accepted += 1;
                x
            }
            Verdict::Reject(t) => t,
        };
        counts[t as usize] += 1;
    }
    (counts, probs, accepted as f64 / TRIALS as f64)
}

// chi-square 0.999 quantile with 5 degrees of freedom is 20.5
const CHI2_5_999: f64 = 20.5;

#[test]
fn rejection_sampling_preserves_the_target_distribution() {
    let (counts, p, rate) = spec_counts(&sampled(0), &DRAFT, false);
    let chi = chi_square(&counts, &p);
    assert!(chi < CHI2_5_999, "chi-square {chi:.1} for {counts:?} vs {p:?}");
    let tv: f64 = counts.iter().zip(&p).map(|(&c, &p)| (c as f64 / TRIALS as f64 - p).abs()).sum::<f64>() / 2.0;
    assert!(tv < 0.015, "total variation {tv}");
    assert!(rate > 0.2 && rate < 0.95, "acceptance rate {rate}");
    // the check has power: the draft distribution itself fails it
    let mut s = Sampler::new(sampled(1));
    let q = s.distribution(&DRAFT, &[], &[]);
    let mut raw = vec![0u64; TARGET.len()];
    for _ in 0..TRIALS {
        raw[s.draw(&q) as usize] += 1;
    }
    assert!(chi_square(&raw, &p) > 100.0 * CHI2_5_999);
}

#[test]
fn point_mass_drafts_and_truncated_targets_stay_exact() {
    // greedy (point-mass) drafts against a sampled target: accept with p(x), else p without x
    let (counts, p, rate) = spec_counts(&sampled(0), &DRAFT, true);
    assert!(chi_square(&counts, &p) < CHI2_5_999, "{counts:?} vs {p:?}");
    assert!((rate - p[3]).abs() < 0.02, "acceptance {rate} should be p(argmax q) = {}", p[3]);
    // a top-k / top-p target has zero mass where the draft may land: those drafts never survive
    let truncated = SamplingParams { top_k: 3, top_p: 0.9, ..sampled(0) };
    let (counts, p, _) = spec_counts(&truncated, &DRAFT, false);
    assert!(p.iter().filter(|&&x| x == 0.0).count() >= 3);
    let dof_ok = chi_square(&counts, &p);
    assert!(dof_ok < 16.3, "chi-square {dof_ok} (2 dof, 0.9997 quantile 16.3) for {counts:?} vs {p:?}");
}

#[test]
fn greedy_verification_is_exact_match() {
    let mut s = Sampler::new(SamplingParams::greedy());
    let rows = vec![vec![0.0, 5.0, 1.0], vec![3.0, 0.0, 1.0], vec![0.0, 0.0, 9.0]];
    let q = vec![Dist::Point(1), Dist::Point(0)];
    assert_eq!(verify(&mut s, &rows, &[1, 0], &q, &[], &[]), Verified { tokens: vec![1, 0, 2], accepted: 2 });
    assert_eq!(verify(&mut s, &rows, &[1, 2], &q, &[], &[]), Verified { tokens: vec![1, 0], accepted: 1 });
    assert_eq!(verify(&mut s, &rows, &[2, 0], &q, &[], &[]), Verified { tokens: vec![1], accepted: 0 });
    // penalties see the accepted drafts: token 0 repeated is penalized at the second position
    let mut s = Sampler::new(SamplingParams { frequency_penalty: 2.0, ..SamplingParams::greedy() });
    let rows = vec![vec![5.0, 4.0], vec![5.0, 4.0]];
    assert_eq!(verify(&mut s, &rows, &[0], &[Dist::Point(0)], &[], &[]).tokens, vec![0, 1]);
}

#[test]
fn multi_draft_runs_start_with_a_target_distributed_token() {
    // three drafts from the draft distribution; the first emitted token must still follow p
    let mut counts = vec![0u64; TARGET.len()];
    let mut p = Vec::new();
    for seed in 0..TRIALS {
        let mut s = Sampler::new(sampled(seed));
        let mut picker = DraftPicker::new(&mut s, &[], &[]);
        for _ in 0..3 {
            picker.pick(&DRAFT);
        }
        let (d, q) = (picker.drafts.clone(), picker.q.clone());
        p = dense(&s.distribution(&TARGET, &[], &[]), TARGET.len());
        let v = verify(&mut s, &vec![TARGET.to_vec(); 4], &d, &q, &[], &[]);
        assert_eq!(v.tokens.len(), v.accepted + 1);
        counts[v.tokens[0] as usize] += 1;
    }
    assert!(chi_square(&counts, &p) < CHI2_5_999, "{counts:?} vs {p:?}");
}

#[test]
fn stats_report_rates_per_position() {
    let mut st = SpecStats::default();
    st.record(2, 2);
    st.record(2, 0);
    st.record(1, 1);
    assert_eq!((st.steps, st.draft_tokens, st.accepted_tokens), (3, 5, 3));
    assert_eq!(st.acceptance_rate_per_position(), vec![2.0 / 3.0, 0.5]);
    assert!((st.mean_accepted_length() - 2.0).abs() < 1e-9);
    let mut all = SpecStats::default();
    all.merge(&st);
    all.merge(&st);
    assert_eq!(all.proposed_at, vec![6, 4]);
}
