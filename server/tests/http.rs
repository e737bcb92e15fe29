//! `moeserve serve` end to end over raw HTTP: the real binary on a free port.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Server;
use serde_json::{json, Value};

/// The built-in tiny model with a small KV budget plus `extra` flags.
async fn start(extra: &[&str]) -> Server {
    let mut args = vec!["--kv-cache-memory", "64MiB"];
    args.extend_from_slice(extra);
    common::start(&args).await
}

async fn post(s: &Server, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new().post(format!("{}{path}", s.base)).json(&body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn assert_error(status: u16, body: &Value, want: u16, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert!(body["error"]["type"].is_string(), "{what}: {body}");
}

fn chat_body(max_tokens: usize) -> Value {
    json!({"model": "moeserve-builtin-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens, "seed": 3})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_models_and_usage() {
    let s = start(&[]).await;
    let page = reqwest::get(format!("{}/", s.base)).await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.text().await.unwrap().contains("/v1/chat/completions"));
    let models: Value = reqwest::get(format!("{}/v1/models", s.base)).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "moeserve-builtin-tiny");

    let (st, v) = post(&s, "/v1/chat/completions", chat_body(6), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 6);
    assert_eq!(u["total_tokens"].as_u64(), Some(u["prompt_tokens"].as_u64().unwrap() + 6));
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64() && u["completion_tokens_details"]["reasoning_tokens"].is_u64());

    // the same seed gives the same text; logprobs come back per token
    let mut b = chat_body(6);
    b["logprobs"] = json!(true);
    b["top_logprobs"] = json!(2);
    let (_, again) = post(&s, "/v1/chat/completions", b, None).await;
    assert_eq!(again["choices"][0]["message"]["content"], v["choices"][0]["message"]["content"]);
    let lp = again["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len(), 6);
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);

    let (st, c) = post(&s, "/v1/completions", json!({"prompt": "The", "max_tokens": 3, "n": 2, "temperature": 1.0}), None).await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["choices"].as_array().unwrap().len(), 2);
    assert_eq!(c["usage"]["completion_tokens"], 6);

    let (st, t) = post(&s, "/tokenize", json!({"prompt": "Hello, world!"}), None).await;
    assert_eq!((st, t["tokens"].clone()), (200, json!([19923, 14, 2058, 3])));
    let (_, d) = post(&s, "/detokenize", json!({"tokens": [19923, 14, 2058, 3]}), None).await;
    assert_eq!(d["prompt"], "Hello, world!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chat_sends_chunks_usage_and_done() {
    let s = start(&[]).await;
    let mut b = chat_body(5);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let text = common::post_stream_text(&s, "/v1/chat/completions", &b).await;
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks = common::sse_json(&text);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    // the streamed text equals the non-streamed text for the same seed
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let (_, v) = post(&s, "/v1/chat/completions", chat_body(5), None).await;
    assert_eq!(v["choices"][0]["message"]["content"], streamed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_openai_json_and_the_server_keeps_serving() {
    let s = start(&["--api-key", "sk-test", "--max-body-bytes", "4096"]).await;
    let key = Some("sk-test");
    let (st, v) = post(&s, "/v1/chat/completions", chat_body(2), None).await;
    assert_error(st, &v, 401, "missing key");
    let (st, v) = post(&s, "/v1/chat/completions", chat_body(2), Some("sk-wrong")).await;
    assert_error(st, &v, 401, "wrong key");

    let raw = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth("sk-test")
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    assert_error(400, &raw.json().await.unwrap(), 400, "malformed JSON");

    let mut wrong_type = chat_body(2);
    wrong_type["temperature"] = json!("hot");
    let (st, v) = post(&s, "/v1/chat/completions", wrong_type, key).await;
    assert_error(st, &v, 400, "wrong type");

    let mut unknown = chat_body(2);
    unknown["model"] = json!("gpt-4");
    let (st, v) = post(&s, "/v1/chat/completions", unknown, key).await;
    assert_error(st, &v, 404, "unknown model");
    assert_eq!(v["error"]["code"], "model_not_found");

    let (st, v) = post(&s, "/v1/chat/completions", chat_body(100_000), key).await;
    assert_error(st, &v, 400, "context overflow");
    assert_eq!(v["error"]["code"], "context_length_exceeded");

    let big = json!({"messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let (st, v) = post(&s, "/v1/chat/completions", big, key).await;
    assert_error(st, &v, 413, "body too large");

    let (st, v) = post(&s, "/v1/chat/completions", json!({"messages": [{"role": "wizard", "content": "hi"}]}), key).await;
    assert_error(st, &v, 400, "bad role");
    let (st, v) = post(&s, "/v1/chat/completions", json!({"messages": []}), key).await;
    assert_error(st, &v, 400, "no messages");
    let mut sampling = chat_body(2);
    sampling["top_p"] = json!(0);
    let (st, v) = post(&s, "/v1/chat/completions", sampling, key).await;
    assert_error(st, &v, 400, "top_p 0");

    let (st, v) = post(&s, "/v1/chat/completions", chat_body(2), key).await;
    assert_eq!(st, 200, "still serving: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_aborts_and_frees_pages() {
    let s = start(&[]).await;
    let mut b = chat_body(3000);
    b["stream"] = json!(true);
    b["ignore_eos"] = json!(true);
    let mut resp = reqwest::Client::new().post(format!("{}/v1/chat/completions", s.base)).json(&b).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.chunk().await.unwrap().expect("a first chunk");
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' '))
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    // metrics are published after each engine step: wait to see the request running
    let mut running = 0.0;
    for _ in 0..200 {
        let m = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
        running = metric(&m, "moeserve_requests_running");
        if running == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(running, 1.0);
    drop(resp);
    for _ in 0..400 {
        let m = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
        if metric(&m, "moeserve_requests_running") == 0.0 && metric(&m, "moeserve_kv_pages_used") == 0.0 {
            assert_eq!(metric(&m, "moeserve_requests_aborted_total"), 1.0);
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("generation was not cancelled after the client went away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after_and_count_per_key() {
    let s = start(&["--api-key", "k1", "--api-key", "k2", "--rate-limit-rpm", "2"]).await;
    for _ in 0..2 {
        let (st, v) = post(&s, "/v1/chat/completions", chat_body(2), Some("k1")).await;
        assert_eq!(st, 200, "{v}");
    }
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth("k1")
        .json(&chat_body(2))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    // the other key is unaffected; Anthropic-style errors on /v1/messages
    let (st, _) = post(&s, "/v1/chat/completions", chat_body(2), Some("k2")).await;
    assert_eq!(st, 200);
    let (st, v) =
        post(&s, "/v1/messages", json!({"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}), Some("k1")).await;
    assert_eq!((st, v["type"].as_str()), (429, Some("error")), "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let m = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
    assert!(m.contains("moeserve_key_requests_total{key=\"key-0\"} 2"), "{m}");
    assert!(m.contains("moeserve_key_rate_limited_total{key=\"key-0\"} 2"), "{m}");
    assert!(m.contains("moeserve_key_completion_tokens_total{key=\"key-1\"} 2"), "{m}");
    assert!(!m.contains("k1") && !m.contains("k2"), "keys themselves never appear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_are_rendered_into_the_prompt_and_validated() {
    let s = start(&[]).await;
    let tool = json!({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let (_, plain) = post(&s, "/v1/chat/completions", chat_body(1), None).await;
    let mut with_tools = chat_body(1);
    with_tools["tools"] = json!([tool]);
    let (st, v) = post(&s, "/v1/chat/completions", with_tools.clone(), None).await;
    assert_eq!(st, 200, "{v}");
    assert!(
        v["usage"]["prompt_tokens"].as_u64() > plain["usage"]["prompt_tokens"].as_u64(),
        "the tools preamble is in the prompt"
    );
    // tool_choice none leaves the prompt alone; a named unknown function is a 400
    with_tools["tool_choice"] = json!("none");
    let (_, none) = post(&s, "/v1/chat/completions", with_tools.clone(), None).await;
    assert_eq!(none["usage"]["prompt_tokens"], plain["usage"]["prompt_tokens"]);
    with_tools["tool_choice"] = json!({"type": "function", "function": {"name": "nope"}});
    let (st, v) = post(&s, "/v1/chat/completions", with_tools, None).await;
    assert_error(st, &v, 400, "unknown named tool");
    // a round trip: the assistant's call (arguments as an object) and the tool's answer render
    let history = json!({"max_tokens": 2, "tools": [tool], "messages": [
        {"role": "user", "content": "Weather in Hangzhou?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Hangzhou"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21}"}]});
    let (st, v) = post(&s, "/v1/chat/completions", history, None).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_with_tools_and_tool_results() {
    let s = start(&[]).await;
    let tool = json!({"name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}});
    let msg = |extra: Value| {
        let mut b = json!({"max_tokens": 2, "messages": [{"role": "user", "content": "Weather in Hangzhou?"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (st, plain) = post(&s, "/v1/messages", msg(json!({})), None).await;
    assert_eq!(st, 200, "{plain}");
    assert_eq!(plain["type"], "message");
    assert_eq!(plain["stop_reason"], "max_tokens");
    let (st, v) = post(&s, "/v1/messages", msg(json!({"tools": [tool], "tool_choice": {"type": "any"}})), None).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["usage"]["input_tokens"].as_u64() > plain["usage"]["input_tokens"].as_u64());
    let round_trip = json!({"max_tokens": 2, "tools": [tool], "messages": [
        {"role": "user", "content": "Weather in Hangzhou?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Hangzhou"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"}]}]});
    let (st, v) = post(&s, "/v1/messages", round_trip, None).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = post(&s, "/v1/messages", msg(json!({"tool_choice": {"type": "sometimes"}, "tools": [tool]})), None).await;
    assert_eq!((st, v["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{v}");
    let (st, v) = post(&s, "/v1/messages", json!({"messages": []}), None).await;
    assert_eq!((st, v["type"].as_str()), (400, Some("error")), "missing max_tokens: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let mut s = start(&[]).await;
    let mut b = chat_body(40);
    b["stream"] = json!(true);
    b["ignore_eos"] = json!(true);
    let mut resp = reqwest::Client::new().post(format!("{}/v1/chat/completions", s.base)).json(&b).send().await.unwrap();
    let mut body = String::from_utf8(resp.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    while let Some(c) = resp.chunk().await.unwrap() {
        body.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(body.trim_end().ends_with("data: [DONE]"), "the in-flight stream completes: {body}");
    assert!(body.contains("\"finish_reason\":\"length\""));
    for _ in 0..200 {
        if let Some(status) = s.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not exit after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_output_is_constrained() {
    let s = start(&[]).await;
    let schema = json!({"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"}}, "required": ["age", "ok"], "additionalProperties": false});
    let mut valid = 0;
    for prompt in ["Give me a record", "JSON please", "Hello"] {
        let body = json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}});
        let (st, v) = post(&s, "/v1/chat/completions", body, None).await;
        assert_eq!(st, 200, "{v}");
        let msg = &v["choices"][0]["message"];
        let content = msg["content"].as_str().unwrap_or("");
        if v["choices"][0]["finish_reason"] == "stop" {
            // the random model may think first (unconstrained); the answer itself must validate
            let parsed: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?} is not JSON: {e}"));
            let age = parsed["age"].as_i64().expect("integer age");
            assert!((0..=120).contains(&age) && parsed["ok"].is_boolean(), "{parsed}");
            assert_eq!(parsed.as_object().unwrap().len(), 2, "no additional properties: {parsed}");
            valid += 1;
        } else {
            assert!(content.is_empty() || content.starts_with('{'), "unconstrained content {content:?}");
        }
    }
    assert!(valid >= 1, "at least one prompt should answer directly in JSON");
    let bad = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}});
    let (st, v) = post(&s, "/v1/chat/completions", bad, None).await;
    assert_error(st, &v, 400, "invalid schema");
    let (st, v) = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}),
        None,
    )
    .await;
    assert_error(st, &v, 400, "unknown format");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_mtp_reports_usage_and_metrics_and_keeps_greedy_output() {
    let plain = start(&[]).await;
    let spec = start(&["--speculative", "mtp", "--num-draft-tokens", "2"]).await;
    let mut b = chat_body(8);
    b["temperature"] = json!(0);
    b["stop"] = json!(["zzzz-never"]);
    let (_, want) = post(&plain, "/v1/chat/completions", b.clone(), None).await;
    let (st, got) = post(&spec, "/v1/chat/completions", b, None).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got["choices"][0]["message"]["content"], want["choices"][0]["message"]["content"]);
    assert!(want["usage"].get("speculative").is_none());
    let sp = &got["usage"]["speculative"];
    assert!(sp["verify_steps"].as_u64().unwrap() > 0, "{sp}");
    assert!(sp["mean_accepted_length"].as_f64().unwrap() >= 1.0);
    assert_eq!(sp["acceptance_rate_per_position"].as_array().unwrap().len(), 2);
    let m = reqwest::get(format!("{}/metrics", spec.base)).await.unwrap().text().await.unwrap();
    assert!(m.contains("moeserve_spec_verify_steps_total") && m.contains("moeserve_spec_acceptance_rate{position=\"2\"}"), "{m}");
}
