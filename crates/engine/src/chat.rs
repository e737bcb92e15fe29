//! Chat templates rendered with minijinja the way transformers renders them with Jinja2
//! (`trim_blocks`, `lstrip_blocks`, Python string methods such as `split`).

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use moeserve_core::{Error, Result};
use serde_json::Value;

pub struct ChatTemplate {
    env: Environment<'static>,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_string()).map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        Ok(ChatTemplate { env })
    }

    pub fn render(&self, messages: &[Value], add_generation_prompt: bool, bos_token: &str, eos_token: &str) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        tmpl.render(context! { messages, add_generation_prompt, bos_token, eos_token })
            .map_err(|e| Error::Input(format!("chat template: {e}")))
    }
}
