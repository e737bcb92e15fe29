//! The DeepSeek-V3/R1 tokenizer (`tokenizer.json`) plus `tokenizer_config.json` (special tokens,
//! chat template).

use std::path::Path;

use moeserve_core::{Error, Result};
use serde_json::Value;

use crate::chat::ChatTemplate;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// tokenizer.json as loaded (the grammar compiler builds its token trie from it)
    json: Vec<u8>,
    chat: Option<ChatTemplate>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab {}, chat template: {})", self.inner.get_vocab_size(true), self.chat.is_some())
    }
}

/// `"<tok>"` or `{"content": "<tok>", ...}` as found in tokenizer_config.json.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// `tokenizer.json` and (optional) `tokenizer_config.json` in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(Error::Tokenizer(format!("{} not found (this model has no tokenizer; pass token ids)", tj.display())));
        }
        let json = std::fs::read(&tj).map_err(|source| Error::Io { path: tj.clone(), source })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() {
            Some(std::fs::read(&cfg_path).map_err(|source| Error::Io { path: cfg_path.clone(), source })?)
        } else {
            None
        };
        Self::from_bytes(&json, cfg.as_deref())
    }

    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config: Option<&[u8]>) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| Error::Tokenizer(format!("tokenizer.json: {e}")))?;
        let cfg: Value = match tokenizer_config {
            Some(b) => serde_json::from_slice(b).map_err(|e| Error::Tokenizer(format!("tokenizer_config.json: {e}")))?,
            None => Value::Null,
        };
        let chat = match cfg.get("chat_template").and_then(Value::as_str) {
            Some(t) => Some(ChatTemplate::new(t)?),
            None => None,
        };
        Ok(Tokenizer {
            inner,
            json: tokenizer_json.to_vec(),
            chat,
            bos_token: token_text(cfg.get("bos_token")),
            eos_token: token_text(cfg.get("eos_token")),
        })
    }

    /// Encode plain text without adding BOS (special-token strings in the text are matched).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    pub fn json_bytes(&self) -> &[u8] {
        &self.json
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// Render `messages` (OpenAI-style JSON objects) with the model's chat template.
    pub fn apply_chat_template(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        let chat = self.chat.as_ref().ok_or_else(|| Error::Tokenizer("tokenizer_config.json has no chat_template".into()))?;
        chat.render(
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }
}
