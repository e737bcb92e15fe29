//! Storage formats and their exact byte cost for a `[rows, cols]` weight (or a `[n]` vector).

use moeserve_cpu::format::{Q4K_BLOCK, Q6K_BLOCK, Q8_0_BLOCK};
use moeserve_quant::Target;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    F32,
    F16,
    Bf16,
    /// E4M3, one byte per weight, plus one f32 scale per `[block[0] rows, block[1] cols]` block
    /// (partial edge blocks count as whole blocks: `ceil(rows/b0) · ceil(cols/b1)` scales).
    Fp8 {
        block: [usize; 2],
    },
    /// ggml blocks along each row: 34 B per 32 weights.
    Q8_0,
    /// 144 B per 256 weights.
    Q4K,
    /// 210 B per 256 weights.
    Q6K,
}

impl Format {
    pub fn name(&self) -> String {
        match self {
            Format::F32 => "f32".into(),
            Format::F16 => "f16".into(),
            Format::Bf16 => "bf16".into(),
            Format::Fp8 { block } => format!("fp8 {}x{}", block[0], block[1]),
            Format::Q8_0 => "q8_0".into(),
            Format::Q4K => "q4k".into(),
            Format::Q6K => "q6k".into(),
        }
    }

    pub fn from_target(t: Target) -> Self {
        match t {
            Target::F32 => Format::F32,
            Target::Bf16 => Format::Bf16,
            Target::Q8_0 => Format::Q8_0,
            Target::Q4K => Format::Q4K,
            Target::Q6K => Format::Q6K,
        }
    }

    /// Exact bytes of a tensor of `shape` (1-D or 2-D `[rows, cols]`); block formats pad each
    /// row to whole blocks, as the ggml layouts (and moeserve's packed matrices) do.
    pub fn bytes(&self, shape: &[usize]) -> u64 {
        let (rows, cols) = match shape {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => (shape.iter().product::<usize>(), 1),
        };
        let (r, c) = (rows as u64, cols as u64);
        let blocks = |(bytes, per): (usize, usize)| r * c.div_ceil(per as u64) * bytes as u64;
        match self {
            Format::F32 => r * c * 4,
            Format::F16 | Format::Bf16 => r * c * 2,
            Format::Fp8 { block } => {
                let scales = if shape.len() == 2 { r.div_ceil(block[0] as u64) * c.div_ceil(block[1] as u64) } else { 0 };
                r * c + scales * 4
            }
            Format::Q8_0 => blocks(Q8_0_BLOCK),
            Format::Q4K => blocks(Q4K_BLOCK),
            Format::Q6K => blocks(Q6K_BLOCK),
        }
    }

    /// A split of the row dimension must land on a multiple of this (FP8: the scale block rows).
    pub fn row_align(&self) -> usize {
        match self {
            Format::Fp8 { block } => block[0],
            _ => 1,
        }
    }

    /// A split of the column dimension must land on a multiple of this (the block along a row).
    pub fn col_align(&self) -> usize {
        match self {
            Format::Fp8 { block } => block[1],
            Format::Q8_0 => Q8_0_BLOCK.1,
            Format::Q4K => Q4K_BLOCK.1,
            Format::Q6K => Q6K_BLOCK.1,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Format;

    #[test]
    fn byte_costs() {
        let fp8 = Format::Fp8 { block: [128, 128] };
        // kv_a_proj_with_mqa: 576 rows = 4.5 blocks -> 5 scale rows
        assert_eq!(fp8.bytes(&[576, 7168]), 576 * 7168 + 5 * 56 * 4);
        assert_eq!(Format::Bf16.bytes(&[7168]), 14336);
        assert_eq!(Format::F32.bytes(&[256]), 1024);
        assert_eq!(Format::Q8_0.bytes(&[2, 64]), 2 * 2 * 34);
        assert_eq!(Format::Q4K.bytes(&[3, 300]), 3 * 2 * 144);
        assert_eq!(Format::Q6K.bytes(&[1, 256]), 210);
    }
}
