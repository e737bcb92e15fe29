//! What one forward call computes: n tokens for each of several sequences, flattened.

/// How attention is evaluated. `Auto` uses the naive (decompressed) form for long chunks and the
/// weight-absorbed form over the latent cache for decode-sized chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnMode {
    #[default]
    Auto,
    Naive,
    Absorbed,
}

/// Chunks of at most this many tokens use the absorbed form under `AttnMode::Auto`.
pub const ABSORB_MAX_TOKENS: usize = 4;

/// `len` new tokens of one sequence at positions `start_pos..start_pos + len`; the sequence's
/// cache must hold exactly `start_pos` tokens before the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqChunk {
    pub start_pos: usize,
    pub len: usize,
}

#[derive(Debug, Clone, Default)]
pub struct ForwardBatch {
    /// Tokens of all chunks, concatenated in chunk order.
    pub tokens: Vec<u32>,
    pub chunks: Vec<SeqChunk>,
    pub attn: AttnMode,
}

impl ForwardBatch {
    pub fn single(tokens: &[u32], start_pos: usize) -> Self {
        ForwardBatch { tokens: tokens.to_vec(), chunks: vec![SeqChunk { start_pos, len: tokens.len() }], attn: AttnMode::Auto }
    }

    pub fn with_attn(mut self, attn: AttnMode) -> Self {
        self.attn = attn;
        self
    }

    /// Rope position of every token.
    pub fn positions(&self) -> Vec<usize> {
        self.chunks.iter().flat_map(|c| c.start_pos..c.start_pos + c.len).collect()
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn use_absorbed(&self, chunk: &SeqChunk) -> bool {
        match self.attn {
            AttnMode::Naive => false,
            AttnMode::Absorbed => true,
            AttnMode::Auto => chunk.len <= ABSORB_MAX_TOKENS,
        }
    }
}
