//! The latent KV layout an MLA model declares; the engine allocates pages from it.

/// Per token and per attention layer, MLA caches one row of `latent_dim` normalized latent
/// channels followed by `rope_dim` already-rotated shared key channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub latent_dim: usize,
    pub rope_dim: usize,
}

impl KvLayout {
    /// Values in one cache row (576 for R1).
    pub fn row_dim(&self) -> usize {
        self.latent_dim + self.rope_dim
    }

    /// Bytes one token occupies across all layers at `elem_bytes` per value.
    pub fn bytes_per_token(&self, elem_bytes: usize) -> usize {
        self.num_layers * self.row_dim() * elem_bytes
    }
}
