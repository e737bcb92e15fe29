//! SwiGLU MLP: dense layers, routed experts and shared experts.

use std::sync::Arc;

use candle_core::Tensor;
use moeserve_core::{error::Context, Result};
use moeserve_quant::{Linear, Slice, Weights};

use crate::parallel::{Parallel, Part};

#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Arc<dyn Linear>,
    up: Arc<dyn Linear>,
    down: Arc<dyn Linear>,
}

impl Mlp {
    pub fn load(w: &Weights, hidden: usize, intermediate: usize) -> Result<Self> {
        Self::load_part(w, hidden, intermediate, (0, 1))
    }

    /// Part `part` of the intermediate dimension: rows of gate and up, columns of down (whose
    /// output is then a partial sum over the parts).
    pub fn load_part(w: &Weights, hidden: usize, intermediate: usize, part: Part) -> Result<Self> {
        let range = Parallel::split(intermediate, part, &format!("{} rows", w.name("gate_proj")))?;
        let rows = Slice::rows(range.clone());
        Ok(Mlp {
            gate: w.linear_part("gate_proj", hidden, intermediate, &rows)?,
            up: w.linear_part("up_proj", hidden, intermediate, &rows)?,
            down: w.linear_part("down_proj", intermediate, hidden, &Slice::cols(range))?,
        })
    }

    pub fn resident_bytes(&self) -> usize {
        self.gate.resident_bytes() + self.up.resident_bytes() + self.down.resident_bytes()
    }

    /// The gate, up and down weights when all three are resident in a CPU kernel format.
    pub fn packed(&self) -> Option<[&moeserve_cpu::PackedMatrix; 3]> {
        Some([self.gate.packed()?, self.up.packed()?, self.down.packed()?])
    }

    /// The gate and up weights, for the waiting threads to fetch ahead (`moeserve_cpu::prefetch`).
    pub fn fetch_first(&self) {
        moeserve_cpu::prefetch::next([&self.gate, &self.up].into_iter().filter_map(|l| l.packed()));
    }

    /// `x: [n, hidden]` -> `down(silu(gate x) ⊙ up x)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [g, u] = moeserve_quant::packed::forward_same_input([self.gate.as_ref(), self.up.as_ref()], x)?;
        let g = candle_nn::ops::silu(&g).ctx(|| "silu".into())?;
        let h = (g * u).ctx(|| "swiglu".into())?;
        self.down.forward(&h)
    }
}
