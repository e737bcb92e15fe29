//! The DeepSeek-V3/R1 tokenizer and chat template against transformers' output (expected.json).

use std::path::PathBuf;

use moeserve_engine::{StreamDecoder, Tokenizer};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&root().join("models/deepseek-v3")).unwrap()
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/tokenizer/expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn encodings_and_decodings_match_transformers() {
    let tok = tokenizer();
    let exp = expected();
    let cases = exp["encode"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids(&case["ids"]), "encode {text:?}");
        assert_eq!(tok.decode(&ids(&case["ids"])).unwrap(), case["decoded"].as_str().unwrap(), "decode {text:?}");
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    let tok = tokenizer();
    let exp = expected();
    let chats = exp["chat"].as_array().unwrap();
    assert_eq!(chats.len(), 6);
    for (i, c) in chats.iter().enumerate() {
        let messages = c["messages"].as_array().unwrap();
        let rendered = tok.apply_chat_template(messages, c["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(rendered, c["rendered"].as_str().unwrap(), "chat case {i}");
        assert_eq!(tok.encode(&rendered).unwrap(), ids(&c["ids"]), "chat ids case {i}");
    }
}

#[test]
fn special_token_ids() {
    let tok = tokenizer();
    for (name, id) in expected()["special_ids"].as_object().unwrap() {
        assert_eq!(tok.token_id(name), Some(id.as_u64().unwrap() as u32), "{name}");
    }
}

#[test]
fn stream_decoder_emits_whole_characters_only() {
    let tok = tokenizer();
    let text = "Emoji 🚀🔥 and accents: café 深度求索";
    let ids = tok.encode(text).unwrap();
    let mut dec = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        if let Some(piece) = dec.push(&tok, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "partial character emitted: {piece:?}");
            out.push_str(&piece);
        }
    }
    if let Some(rest) = dec.flush(&tok).unwrap() {
        out.push_str(&rest);
    }
    assert_eq!(out, text);
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let e = Tokenizer::from_dir(&root().join("tests/fixtures/tiny-v2")).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}
