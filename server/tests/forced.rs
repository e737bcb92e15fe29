//! A tiny model whose greedy output is forced, served over HTTP: every attention and MLP output
//! projection is zeroed (each layer adds nothing), so the next token depends only on the current
//! token's embedding; embeddings and lm_head rows are then set to chain a chosen token sequence.
//! This drives the R1 reasoning split and the tool-call parser end to end with real model output.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::Server;
use moeserve_engine::Tokenizer;
use serde_json::{json, Value};

const ASSISTANT: u32 = 128804;
const EOS: u32 = 1;

/// Synthesize the tiny preset into `dir`, then make greedy decoding follow `chain` (each token's
/// successor is the next element).
fn forced_model(dir: &Path, chain: &[u32]) {
    let out = Command::new(env!("CARGO_BIN_EXE_moeserve"))
        .args(["synth", "--preset", "tiny", "--out", dir.to_str().unwrap(), "--shard-mb", "1024"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut seen = std::collections::HashSet::new();
    assert!(chain.iter().all(|t| seen.insert(*t)), "chain tokens must be distinct: {chain:?}");
    let hidden = 64;
    assert!(chain.len() <= hidden);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        for (name, t) in tensors.iter_mut() {
            if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                *t = t.zeros_like().unwrap();
            }
            let is_embed = name == "model.embed_tokens.weight";
            if is_embed || name == "lm_head.weight" {
                let mut rows: Vec<Vec<f32>> = t.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
                for (i, w) in chain.windows(2).enumerate() {
                    let mut basis = vec![0f32; hidden];
                    basis[i] = if is_embed { 1.0 } else { 10.0 };
                    // embedding of w[0] is direction i; lm_head row of w[1] points along it
                    rows[if is_embed { w[0] } else { w[1] } as usize] = basis;
                }
                let flat: Vec<f32> = rows.into_iter().flatten().collect();
                *t = Tensor::from_vec(flat, t.dims(), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
            }
        }
        candle_core::safetensors::save(&tensors, &path).unwrap();
    }
}

async fn serve(dir: &Path) -> Server {
    common::start(&["--kv-cache-memory", "32MiB", "--model", dir.to_str().unwrap()]).await
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3")).unwrap()
}

async fn chat(s: &Server, body: Value) -> Value {
    common::post_json(s, "/v1/chat/completions", &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_emitted_reasoning_is_split_from_content() {
    let tok = tokenizer();
    let mut chain = vec![ASSISTANT, tok.token_id("<think>").unwrap()];
    chain.extend(tok.encode("Hmm, greeting.").unwrap());
    chain.push(tok.token_id("</think>").unwrap());
    chain.extend(tok.encode("Hello there!").unwrap());
    chain.push(EOS);
    let dir = tempfile::tempdir().unwrap();
    forced_model(dir.path(), &chain);
    let s = serve(dir.path()).await;
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "temperature": 0});
    let v = chat(&s, body.clone()).await;
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "Hmm, greeting.", "{v}");
    assert_eq!(m["content"], "Hello there!", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let generated = chain.len() - 1;
    assert_eq!(v["usage"]["completion_tokens"], generated);
    assert!(v["usage"]["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap() >= 4, "{v}");

    // streamed: reasoning deltas first, then content deltas, same text
    let mut stream = body;
    stream["stream"] = json!(true);
    let text = common::post_stream_text(&s, "/v1/chat/completions", &stream).await;
    let (mut reasoning, mut content) = (String::new(), String::new());
    for c in common::sse_json(&text) {
        let d = &c["choices"][0]["delta"];
        if let Some(r) = d["reasoning_content"].as_str() {
            assert!(content.is_empty(), "reasoning after content");
            reasoning += r;
        }
        content += d["content"].as_str().unwrap_or("");
    }
    assert_eq!((reasoning.as_str(), content.as_str()), ("Hmm, greeting.", "Hello there!"));

    // Anthropic: a thinking block then a text block
    let a: Value = common::post_json(
        &s,
        "/v1/messages",
        &json!({"max_tokens": 40, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(a["content"][0], json!({"type": "thinking", "thinking": "Hmm, greeting.", "signature": ""}), "{a}");
    assert_eq!(a["content"][1]["text"], "Hello there!");
    assert_eq!(a["stop_reason"], "end_turn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_emitted_tool_calls_become_tool_calls() {
    let tok = tokenizer();
    let id = |t: &str| tok.token_id(t).unwrap();
    let mut chain = vec![ASSISTANT, id("<｜tool▁calls▁begin｜>"), id("<｜tool▁call▁begin｜>")];
    chain.extend(tok.encode("function").unwrap());
    chain.push(id("<｜tool▁sep｜>"));
    // a bigram chain cannot repeat a token, so the fences use different tokens ("```" and
    // " ```") and whitespace ("\n", "\n\n") than the canonical format: the parser allows that
    for piece in ["get_weather", "\n", "```", "json", "\n\n", "{\"city\": \"Hangzhou\"}", " ```"] {
        chain.extend(tok.encode(piece).unwrap());
    }
    chain.extend([id("<｜tool▁call▁end｜>"), id("<｜tool▁calls▁end｜>"), EOS]);
    let dir = tempfile::tempdir().unwrap();
    forced_model(dir.path(), &chain);
    let s = serve(dir.path()).await;
    let tool = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}});
    let body =
        json!({"messages": [{"role": "user", "content": "Weather?"}], "tools": [tool], "max_tokens": 60, "temperature": 0});
    let v = chat(&s, body.clone()).await;
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    let call = &c["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Hangzhou"}));
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert!(c["message"]["content"].is_null());

    let mut stream = body;
    stream["stream"] = json!(true);
    let text = common::post_stream_text(&s, "/v1/chat/completions", &stream).await;
    let chunks = common::sse_json(&text);
    let calls: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"].get("tool_calls")).flat_map(|v| v.as_array().unwrap()).collect();
    assert!(calls.len() > 2, "arguments stream in several deltas: {text}");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert!(calls[1..].iter().all(|c| c.get("id").is_none() && c["index"] == 0));
    let streamed_args: String = calls.iter().filter_map(|c| c["function"]["arguments"].as_str()).collect();
    assert_eq!(serde_json::from_str::<Value>(&streamed_args).unwrap(), json!({"city": "Hangzhou"}), "{streamed_args:?}");
    let last = chunks.iter().rev().find(|c| !c["choices"][0]["finish_reason"].is_null()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
    assert!(chunks.iter().all(|c| c["choices"][0]["delta"]["content"].as_str().is_none_or(|t| !t.contains("tool"))));

    let a: Value = common::post_json(
        &s,
        "/v1/messages",
        &json!({"max_tokens": 60, "temperature": 0, "messages": [{"role": "user", "content": "Weather?"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}),
    )
    .await;
    assert_eq!(a["stop_reason"], "tool_use", "{a}");
    let block = a["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").unwrap();
    assert_eq!((block["name"].clone(), block["input"].clone()), (json!("get_weather"), json!({"city": "Hangzhou"})));
}
