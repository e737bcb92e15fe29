//! SwiGLU MLP: dense layers, routed experts and shared experts.

use std::sync::Arc;

use candle_core::Tensor;
use moeserve_core::{error::Context, Result};
use moeserve_quant::{Linear, Weights};

#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Arc<dyn Linear>,
    up: Arc<dyn Linear>,
    down: Arc<dyn Linear>,
}

impl Mlp {
    pub fn load(w: &Weights, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(Mlp {
            gate: w.linear("gate_proj", hidden, intermediate)?,
            up: w.linear("up_proj", hidden, intermediate)?,
            down: w.linear("down_proj", intermediate, hidden)?,
        })
    }

    pub fn resident_bytes(&self) -> usize {
        self.gate.resident_bytes() + self.up.resident_bytes() + self.down.resident_bytes()
    }

    /// The gate, up and down weights when all three are resident in a CPU kernel format.
    pub fn packed(&self) -> Option<[&moeserve_cpu::PackedMatrix; 3]> {
        Some([self.gate.packed()?, self.up.packed()?, self.down.packed()?])
    }

    /// `x: [n, hidden]` -> `down(silu(gate x) ⊙ up x)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(x)?).ctx(|| "silu".into())?;
        let h = (g * self.up.forward(x)?).ctx(|| "swiglu".into())?;
        self.down.forward(&h)
    }
}
