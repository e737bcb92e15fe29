//! The `moeserve` binary end to end: generate, logits, synth, and clean errors on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn moeserve(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeserve")).env("MOESERVE_CACHE", cache).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn failure(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "stdout: {}", String::from_utf8_lossy(&out.stdout));
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn builtin_model_generates_text_and_ids() {
    let cache = tempfile::tempdir().unwrap();
    let out = moeserve(cache.path(), &["generate", "--prompt", "Hello", "--max-tokens", "6", "--seed", "3"]);
    let text = ok(&out);
    assert!(!text.trim().is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("output is noise"));

    let args = ["generate", "--input-ids", "0,100,200", "--max-tokens", "5", "--output", "ids", "--temperature", "0"];
    let ids: Vec<u32> = serde_json::from_str(ok(&moeserve(cache.path(), &args)).trim()).unwrap();
    assert_eq!(ids.len(), 5);
    // greedy is deterministic, and the built-in model is the same every time
    let again: Vec<u32> = serde_json::from_str(ok(&moeserve(cache.path(), &args)).trim()).unwrap();
    assert_eq!(ids, again);
    let chat = ok(&moeserve(cache.path(), &["generate", "--chat", "--prompt", "Hi", "--max-tokens", "4", "--dtype", "bf16"]));
    assert!(!chat.is_empty());
    // speculative decoding gives the same greedy ids and reports acceptance
    let mut spec = args.to_vec();
    spec.extend(["--speculative", "mtp", "--num-draft-tokens", "3"]);
    let out = moeserve(cache.path(), &spec);
    assert_eq!(serde_json::from_str::<Vec<u32>>(ok(&out).trim()).unwrap(), ids);
    assert!(String::from_utf8_lossy(&out.stderr).contains("mean accepted length"));
    // tensor and expert parallel ranks give the same greedy ids, with and without drafts
    for extra in [&["--tp", "2", "--ep", "2"][..], &["--expert-parallel-size", "4", "--speculative", "mtp"][..]] {
        let mut par = args.to_vec();
        par.extend(extra);
        let out = moeserve(cache.path(), &par);
        assert_eq!(serde_json::from_str::<Vec<u32>>(ok(&out).trim()).unwrap(), ids, "{extra:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("rank 1: loaded weights"));
    }
    let e = failure(&moeserve(cache.path(), &["generate", "--input-ids", "0", "--tp", "3"]));
    assert!(e.contains("num_attention_heads (4) is not divisible by the parallel size 3"), "{e}");
    let bad = moeserve(cache.path(), &["generate", "--input-ids", "0", "--speculative", "mtp", "--num-draft-tokens", "0"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("num-draft-tokens"));
}

#[test]
fn logits_command_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let refs =
        candle_core::safetensors::load(root().join("tests/fixtures/tiny-v3/reference.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let ids: Vec<i64> = refs["case0.input_ids"].to_vec1().unwrap();
    let ids_arg = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let out = dir.path().join("logits.safetensors");
    let model = root().join("tests/fixtures/tiny-v3");
    ok(&moeserve(
        dir.path(),
        &["logits", "--model", model.to_str().unwrap(), "--input-ids", &ids_arg, "--out", out.to_str().unwrap()],
    ));
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let t = ids.len();
    assert_eq!(got["logits"].dims(), [t, 4096]);
    assert_eq!(got["mtp_logits"].dims(), [t - 1, 4096]);
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> f32 {
        let a: Vec<f32> = a.to_vec1().unwrap();
        let b: Vec<f32> = b.to_vec1().unwrap();
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    };
    assert!(diff(&got["logits"].get(t - 1).unwrap(), &refs["case0.logits_last"]) < 1e-3);
    assert!(diff(&got["mtp_logits"].get(t - 2).unwrap(), &refs["case0.mtp_logits_last"]) < 1e-3);
}

#[test]
fn synth_writes_a_loadable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("tiny-fp8");
    ok(&moeserve(dir.path(), &["synth", "--preset", "tiny", "--out", ckpt.to_str().unwrap(), "--fp8", "--shard-mb", "8"]));
    for f in ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    {
        assert!(ckpt.join(f).exists(), "{f}");
    }
    let text = ok(&moeserve(dir.path(), &["generate", "--model", ckpt.to_str().unwrap(), "--prompt", "x", "--max-tokens", "3"]));
    assert!(!text.is_empty());
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let v2 = root().join("tests/fixtures/tiny-v2");
    let v2 = v2.to_str().unwrap();
    let e = failure(&moeserve(dir.path(), &["generate", "--model", "/no/such/dir", "--input-ids", "0"]));
    assert!(e.contains("/no/such/dir"), "{e}");
    let e = failure(&moeserve(dir.path(), &["generate", "--model", v2, "--input-ids", "0,x"]));
    assert!(e.contains("`x`"), "{e}");
    let e = failure(&moeserve(
        dir.path(),
        &["generate", "--model", v2, "--input-ids", "0,99999", "--max-tokens", "4", "--output", "ids"],
    ));
    assert!(e.contains("99999"), "{e}");
    let e = failure(&moeserve(dir.path(), &["generate", "--model", v2, "--prompt", "hello"]));
    assert!(e.contains("tokenizer"), "{e}");
    let e = failure(&moeserve(
        dir.path(),
        &["generate", "--model", v2, "--input-ids", "0", "--top-p", "0", "--max-tokens", "4", "--output", "ids"],
    ));
    assert!(e.contains("top_p"), "{e}");
    let e = failure(&moeserve(dir.path(), &["synth", "--preset", "nope", "--out", dir.path().join("x").to_str().unwrap()]));
    assert!(e.contains("nope"), "{e}");
    let e = failure(&moeserve(
        dir.path(),
        &["generate", "--model", v2, "--input-ids", "0", "--max-tokens", "500", "--output", "ids"],
    ));
    assert!(e.contains("exceeds"), "{e}");
}

#[test]
fn plan_prints_the_layout_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&moeserve(dir.path(), &["plan", "--model", "deepseek-r1-0528", "--gpus", "8xH200"]));
    for want in ["684.49 B", "91,991 tensors", "70,272 B/token", "replicated on every rank", "seqs@131072", "best"] {
        assert!(out.contains(want), "{want}:\n{out}");
    }
    // one row per candidate layout: TP×EP = 8 and TP = 8 with EP over the same ranks
    let rows: Vec<&str> = out.lines().filter(|l| l.trim_end().ends_with("yes") || l.contains(" yes ")).collect();
    assert!(rows.len() >= 4, "{out}");
    let out = ok(&moeserve(
        dir.path(),
        &["plan", "--model", "deepseek-ai/DeepSeek-R1-0528", "--gpus", "16xH100", "--tp", "16", "--ep", "16"],
    ));
    assert!(out.contains("2 nodes of 8") && out.contains("chosen") && out.contains("TP spans nodes"), "{out}");
    // a checkpoint directory: config plus the exact bytes of its safetensors headers
    let fixture = root().join("tests/fixtures/tiny-v3-fp8");
    let out = ok(&moeserve(
        dir.path(),
        &["plan", "--model", fixture.to_str().unwrap(), "--gpus", "cpu", "--ram", "4GiB", "--context", "128"],
    ));
    assert!(out.contains("safetensors headers") && out.contains("(matches)"), "{out}");
    let out = ok(&moeserve(dir.path(), &["plan", "--model", "deepseek-v2-lite", "--gpus", "2xA100-80G", "--quant", "q4k"]));
    assert!(out.contains("q4k"), "{out}");

    // --max-seqs: only layouts holding that many sequences at --context fit
    let out = ok(&moeserve(dir.path(), &["plan", "--model", "deepseek-r1-0528", "--gpus", "8xH200", "--max-seqs", "4"]));
    let fitting: Vec<&str> = out.lines().filter(|l| l.split_whitespace().nth(10) == Some("yes")).collect();
    assert_eq!(fitting.len(), 4, "{out}");
    assert!(fitting.iter().all(|l| l.trim_start().starts_with("8 ")), "{out}");
    // TP=4 on 8 devices needs data-parallel attention
    assert!(out.contains("TP=4 < 8 devices needs data-parallel attention"), "{out}");
    let e = failure(&moeserve(dir.path(), &["plan", "--model", "deepseek-r1-0528", "--gpus", "8xFOO"]));
    assert!(e.contains("unknown GPU `FOO`") && e.contains("H200"), "{e}");
    let e = failure(&moeserve(dir.path(), &["plan", "--model", "nope/nothing", "--gpus", "8xH200"]));
    assert!(e.contains("nope/nothing") && e.contains("deepseek-r1-0528"), "{e}");
    let e = failure(&moeserve(dir.path(), &["plan", "--model", "deepseek-v3", "--gpus", "8xH200", "--tp", "3"]));
    assert!(e.contains("TP=3"), "{e}");
}
