//! One error type for the library crates; every variant names the file, tensor or field at fault.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: field `{field}`: {msg}")]
    Config { path: String, field: String, msg: String },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("checkpoint file {file}: {msg}")]
    CheckpointFile { file: PathBuf, msg: String },

    #[error("checkpoint {dir}: tensor `{tensor}` not found{hint}")]
    MissingTensor { dir: PathBuf, tensor: String, hint: String },

    #[error("checkpoint file {file}: tensor `{tensor}`: {msg}")]
    Tensor { file: PathBuf, tensor: String, msg: String },

    #[error("tensor `{tensor}` in {file}: expected shape {expected:?}, found {found:?}")]
    Shape { file: PathBuf, tensor: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("invalid input: {0}")]
    Input(String),

    #[error("kv cache: {0}")]
    Cache(String),

    /// A Hugging Face Hub model: resolving, downloading or finding it in the cache.
    #[error("model repo {repo}, file {file}: {msg}")]
    Hub { repo: String, file: String, msg: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{context}: {source}")]
    Candle { context: String, source: candle_core::Error },
}

impl From<candle_core::Error> for Error {
    fn from(source: candle_core::Error) -> Self {
        Error::Candle { context: "tensor op".into(), source }
    }
}

/// Attach a context string (layer, tensor, op) to candle errors.
pub trait Context<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, candle_core::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Candle { context: context(), source })
    }
}
