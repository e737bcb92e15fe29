//! Resident weight formats and their packing.
//!
//! A [`PackedMatrix`] is a `[rows, cols]` weight (output rows × input columns) stored row by row,
//! each row padded with zeros to a whole number of blocks (`padded_cols`), so the kernels never
//! need a column tail. `q8_0`, `q4_K` and `q6_K` hold the GGUF/ggml blocks' bytes regrouped for
//! integer dot products over 16 rows at once (see [`Q8_0_GROUP`], [`Q4K_GROUP_RECORD`] and
//! [`Q6K_GROUP_RECORD`]).

use half::{bf16, f16};

use crate::Error;

/// Bytes of one ggml block and weights per block.
pub const Q8_0_BLOCK: (usize, usize) = (34, 32);
pub const Q4K_BLOCK: (usize, usize) = (144, 256);
pub const Q6K_BLOCK: (usize, usize) = (210, 256);

/// q8_0 rows are kept in groups of this many (the matrix padded with zero rows to whole groups).
/// A group holds, for each 32-column block, the quantized weights of its 16 rows as 8 runs of
/// `[16 rows][4 columns]` (512 bytes: the 4 consecutive columns of every row side by side, each
/// byte offset by 128 to an unsigned value), then the f16 scales of the 16 rows for every block
/// (32 bytes a block). One 64-byte vector then holds 4 columns of 16 rows, so `vpdpbusd` against
/// 4 activation bytes broadcast gives 16 rows' sums with no horizontal additions, and each
/// 512-byte block is the right-hand operand of an AMX int8 tile as it is stored. The same bytes
/// as ggml's q8_0 (34 a block per row), in another order.
pub const Q8_0_GROUP: usize = 16;
/// Bytes of one 32-column block of a q8_0 group: the quantized weights (the scales follow all blocks).
pub(crate) const Q8_0_GROUP_QUANTS: usize = 32 * Q8_0_GROUP;

/// q4_K rows are kept in groups of 16 too ([`Q8_0_GROUP`]), one record of this many bytes per
/// 256-column superblock: the 16 rows' `d` (f16), their `dmin` (f16), their 12 bytes of packed
/// 6-bit scales and mins as three runs of `[16 rows][4 bytes]` (256 bytes of header), then the
/// quantized nibbles as for q8_0: for each 64-column chunk, 8 runs of `[16 rows][4 bytes]` of
/// ggml's bytes (low nibbles: 4 columns of the chunk's first 32, high nibbles: the same 4 of its
/// last 32). One 64-byte vector masked to its low or high nibbles is then 4 columns of 16 rows,
/// ready for `vpdpbusd` or, unpacked, for an AMX tile; the scales of 16 rows decode as vectors.
pub const Q4K_GROUP_RECORD: usize = Q4K_BLOCK.0 * Q8_0_GROUP;
/// Bytes of a q4_K record's header (`d`, `dmin`, the packed scales of 16 rows).
pub(crate) const Q4K_GROUP_HEADER: usize = 256;

/// q6_K rows are kept in groups of 16 too ([`Q8_0_GROUP`]), one record of this many bytes per
/// 256-column superblock: the 16 rows' `d` (f16), their 16 block scales as `[16 blocks][16 rows]`
/// (signed bytes; 288 bytes of header), then for each half of 128 columns ggml's bytes as runs of
/// `[16 rows][4 bytes]`: the 64 bytes of low bits (`ql`, 16 runs), then the 32 bytes of high bits
/// (`qh`, 8 runs). A 64-byte run of `ql` masked to its low or high nibbles, with 2 bits of the
/// matching `qh` run shifted in, is then 4 columns of 16 rows as unsigned 6-bit values, ready for
/// `vpdpbusd`; a block's 16 scales load as one vector.
pub const Q6K_GROUP_RECORD: usize = Q6K_BLOCK.0 * Q8_0_GROUP;
/// Bytes of a q6_K record's header (`d`, the block scales of 16 rows).
pub(crate) const Q6K_GROUP_HEADER: usize = 288;
/// Bytes of each half's runs in a q6_K record (16 runs of `ql`, 8 of `qh`).
pub(crate) const Q6K_GROUP_HALF: usize = 24 * 64;

/// Where byte `i` of a q6_K block (ggml's: `ql`, `qh`, scales, `d`) of row `n` of a group lies in
/// its record ([`Q6K_GROUP_RECORD`]).
fn q6k_record_offset(i: usize, n: usize) -> usize {
    let run = |half: usize, run: usize, byte: usize| Q6K_GROUP_HEADER + half * Q6K_GROUP_HALF + run * 64 + 4 * n + byte;
    match i {
        0..128 => run(i / 64, (i % 64) / 4, i % 4),
        128..192 => run((i - 128) / 32, 16 + (i - 128) % 32 / 4, i % 4),
        192..208 => 32 + 16 * (i - 192) + n,
        _ => 2 * n + (i - 208),
    }
}

/// FP8 weights are decoded through f16 (`(i8 as i16) << 7 & 0xbf80` is the f16 with the same
/// sign/exponent/mantissa bits, 2^-8 times the E4M3 value, subnormals included), so every block
/// scale is stored pre-multiplied by 2^8.
pub(crate) const FP8_VIA_F16_FACTOR: f32 = 256.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    Bf16,
    /// E4M3 with one f32 scale per `[block[0] rows, block[1] cols]` block (DeepSeek's FP8).
    Fp8 {
        block: [usize; 2],
    },
    Q8_0,
    Q4K,
    Q6K,
}

impl Format {
    pub fn name(&self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::Bf16 => "bf16",
            Format::Fp8 { .. } => "fp8",
            Format::Q8_0 => "q8_0",
            Format::Q4K => "q4k",
            Format::Q6K => "q6k",
        }
    }

    /// Columns are padded to a multiple of this.
    pub fn col_block(&self) -> usize {
        match self {
            Format::F32 | Format::Bf16 | Format::Fp8 { .. } | Format::Q8_0 => 32,
            Format::Q4K | Format::Q6K => 256,
        }
    }

    /// Bytes of one row of `cols` columns (padded to whole blocks) in this format.
    pub fn bytes_per_row(&self, cols: usize) -> usize {
        self.row_bytes(cols.next_multiple_of(self.col_block()))
    }

    fn row_bytes(&self, padded_cols: usize) -> usize {
        match self {
            Format::F32 => padded_cols * 4,
            Format::Bf16 => padded_cols * 2,
            Format::Fp8 { .. } => padded_cols,
            Format::Q8_0 => padded_cols / Q8_0_BLOCK.1 * Q8_0_BLOCK.0,
            Format::Q4K => padded_cols / Q4K_BLOCK.1 * Q4K_BLOCK.0,
            Format::Q6K => padded_cols / Q6K_BLOCK.1 * Q6K_BLOCK.0,
        }
    }

    /// Whether a matrix of this format stores its rows in groups of 16 ([`Q8_0_GROUP`]) in this
    /// process: q8_0 and q4_K always, q6_K where [`q6k_grouped`].
    pub(crate) fn grouped(&self) -> bool {
        match self {
            Format::Q8_0 | Format::Q4K => true,
            Format::Q6K => q6k_grouped(),
            _ => false,
        }
    }

    /// Whether the kernels multiply quantized 8-bit activations (integer dot products).
    pub(crate) fn int_activations(&self) -> bool {
        matches!(self, Format::Q8_0 | Format::Q4K | Format::Q6K)
    }
}

/// Whether q6_K matrices are kept in groups ([`Q6K_GROUP_RECORD`]) rather than in ggml's rows:
/// where the products run on the AVX-512 kernels ([`crate::backend`]), unless
/// `MOESERVE_Q6K_LAYOUT=rows` (or `groups`) says otherwise. The grouped kernel takes 4–16
/// activation rows at a fraction of the row kernel's cost, one or two rows about 5 % slower (Zen
/// 4, 8192 × 4096, 2 threads, both layouts in one run, `bench --kernels`: batch 1 0.78–0.84 →
/// 0.82–0.92 ms, 2 0.77–0.90 → 0.81–0.96, 4 1.07–1.20 → 0.82–0.89, 8 1.9–2.3 → 0.88–1.02, 16
/// 3.8–3.9 → 1.8; bench-small `--quant q6k` prefill of 128 tokens 525–583 → 966–1022 tok/s,
/// decode 112–118 → 102–107 tok/s). AVX2's grouped kernel, with 8 rows a vector, is slower than
/// its row kernel for 1–2 rows (0.79–0.82 → 1.07–1.12 ms, 1.0 → 1.5), so there the rows stay as
/// stored. [`PackedMatrix::with_q6k_layout`] packs either layout anywhere (tests, benchmarks).
pub(crate) fn q6k_grouped() -> bool {
    static GROUPED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GROUPED.get_or_init(|| match std::env::var("MOESERVE_Q6K_LAYOUT").as_deref() {
        Ok("rows") => false,
        Ok("groups") => true,
        _ => matches!(crate::backend(), crate::Backend::Avx512 | crate::Backend::Amx),
    })
}

/// A weight matrix in one resident format.
#[derive(Clone)]
pub struct PackedMatrix {
    pub(crate) format: Format,
    /// Whether the rows are stored in groups of 16 ([`Q8_0_GROUP`]; see [`Format::grouped`]).
    pub(crate) grouped: bool,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) padded_cols: usize,
    pub(crate) row_bytes: usize,
    pub(crate) data: Vec<u8>,
    /// FP8 only: `[ceil(rows / block[0]), padded_cols / block[1]]` scales × 2^8.
    pub(crate) scales: Vec<f32>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMatrix({} [{}, {}], {} bytes)", self.format.name(), self.rows, self.cols, self.resident_bytes())
    }
}

/// Whether every value is a bf16 value (its low 16 bits zero): such weights (from a bf16
/// checkpoint) lose nothing as [`Format::Bf16`].
pub fn bf16_exact(values: &[f32]) -> bool {
    values.iter().all(|x| x.to_bits() & 0xffff == 0)
}

impl PackedMatrix {
    pub fn format(&self) -> Format {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held in memory (weights, padding and scales).
    pub fn resident_bytes(&self) -> usize {
        self.data.len() + self.scales.len() * 4
    }

    fn empty(format: Format, rows: usize, cols: usize) -> Self {
        Self::empty_in(format, rows, cols, format.grouped())
    }

    fn empty_in(format: Format, rows: usize, cols: usize, grouped: bool) -> Self {
        let padded_cols = cols.div_ceil(format.col_block()) * format.col_block();
        let row_bytes = format.row_bytes(padded_cols);
        let stored_rows = if grouped { rows.next_multiple_of(Q8_0_GROUP) } else { rows };
        let data = vec![0; stored_rows * row_bytes];
        PackedMatrix { format, grouped, rows, cols, padded_cols, row_bytes, data, scales: Vec::new() }
    }

    /// Whether the rows are stored in groups of 16 ([`Q8_0_GROUP`]): q8_0 and q4_K, and q6_K
    /// where the CPU has AVX-512 (see [`Self::with_q6k_layout`]).
    pub fn is_grouped(&self) -> bool {
        self.grouped
    }

    /// This matrix with q6_K's rows in groups (`grouped`) or as ggml stores them, whichever this
    /// CPU's default ([`Format::grouped`]): the same weights, for tests and benchmarks of both
    /// kernels on one CPU. Other formats: a copy.
    pub fn with_q6k_layout(&self, grouped: bool) -> PackedMatrix {
        if self.format != Format::Q6K || self.grouped == grouped {
            return self.clone();
        }
        let nsb = self.padded_cols / Q6K_BLOCK.1;
        let mut bytes = Vec::with_capacity(self.rows * self.row_bytes);
        for r in 0..self.rows {
            if self.grouped {
                (0..nsb).for_each(|sb| bytes.extend_from_slice(&self.q6k_block(r, sb)));
            } else {
                bytes.extend_from_slice(self.row(r));
            }
        }
        let mut m = Self::empty_in(self.format, self.rows, self.cols, grouped);
        m.set_blocks(bytes);
        m
    }

    fn check_len(what: &str, found: usize, rows: usize, cols: usize) -> Result<(), Error> {
        if found != rows * cols {
            return Err(Error(format!("{what}: {found} values for a [{rows}, {cols}] matrix")));
        }
        Ok(())
    }

    /// Pack float weights (row-major `[rows, cols]`) into `format`, quantizing when it is a ggml
    /// block format. FP8 needs its scales: use [`PackedMatrix::from_fp8`].
    pub fn from_f32(format: Format, rows: usize, cols: usize, w: &[f32]) -> Result<Self, Error> {
        Self::check_len("weights", w.len(), rows, cols)?;
        let mut m = Self::empty(format, rows, cols);
        let pc = m.padded_cols;
        match format {
            Format::F32 => {
                for (r, src) in w.chunks_exact(cols.max(1)).enumerate().take(rows) {
                    let dst = &mut m.data[r * m.row_bytes..][..cols * 4];
                    for (d, v) in dst.chunks_exact_mut(4).zip(src) {
                        d.copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
            Format::Bf16 => {
                for (r, src) in w.chunks_exact(cols.max(1)).enumerate().take(rows) {
                    let dst = &mut m.data[r * m.row_bytes..][..cols * 2];
                    for (d, v) in dst.chunks_exact_mut(2).zip(src) {
                        d.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                    }
                }
            }
            Format::Fp8 { .. } => return Err(Error("FP8 packing needs the checkpoint's scales (from_fp8)".into())),
            Format::Q8_0 | Format::Q4K | Format::Q6K => {
                let dtype = match format {
                    Format::Q8_0 => candle_core::quantized::GgmlDType::Q8_0,
                    Format::Q4K => candle_core::quantized::GgmlDType::Q4K,
                    _ => candle_core::quantized::GgmlDType::Q6K,
                };
                // rows are independent: quantize chunks of them on all threads
                use rayon::prelude::*;
                let chunk_rows = 64;
                let parts: Vec<Result<Vec<u8>, Error>> = (0..rows.div_ceil(chunk_rows))
                    .into_par_iter()
                    .map(|c| {
                        let (r0, r1) = (c * chunk_rows, ((c + 1) * chunk_rows).min(rows));
                        let mut padded = vec![0f32; (r1 - r0) * pc];
                        for r in r0..r1 {
                            padded[(r - r0) * pc..(r - r0) * pc + cols].copy_from_slice(&w[r * cols..(r + 1) * cols]);
                        }
                        candle_core::Tensor::from_vec(padded, (r1 - r0, pc), &candle_core::Device::Cpu)
                            .and_then(|t| candle_core::quantized::QTensor::quantize(&t, dtype))
                            .and_then(|q| q.data().map(|d| d.into_owned()))
                            .map_err(|e| Error(format!("quantizing to {}: {e}", format.name())))
                    })
                    .collect();
                let mut data = Vec::with_capacity(rows * m.row_bytes);
                for p in parts {
                    data.extend_from_slice(&p?);
                }
                if data.len() != rows * m.row_bytes {
                    return Err(Error(format!(
                        "{} quantizer gave {} bytes, expected {}",
                        format.name(),
                        data.len(),
                        rows * m.row_bytes
                    )));
                }
                m.set_blocks(data);
            }
        }
        Ok(m)
    }

    /// bf16 weights (raw bits) kept as bf16.
    pub fn from_bf16(rows: usize, cols: usize, w: &[u16]) -> Result<Self, Error> {
        Self::check_len("weights", w.len(), rows, cols)?;
        let mut m = Self::empty(Format::Bf16, rows, cols);
        for r in 0..rows {
            let dst = &mut m.data[r * m.row_bytes..][..cols * 2];
            for (d, v) in dst.chunks_exact_mut(2).zip(&w[r * cols..(r + 1) * cols]) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        Ok(m)
    }

    /// FP8 E4M3 bytes `[rows, cols]` with DeepSeek's `weight_scale_inv`
    /// `[ceil(rows / block[0]), ceil(cols / block[1])]`, kept at one byte per weight.
    /// `block[1]` must be a multiple of 8 (DeepSeek uses 128).
    pub fn from_fp8(rows: usize, cols: usize, w: &[u8], scale_inv: &[f32], block: [usize; 2]) -> Result<Self, Error> {
        Self::check_len("weights", w.len(), rows, cols)?;
        if block[0] == 0 || block[1] == 0 || !block[1].is_multiple_of(8) {
            return Err(Error(format!("FP8 block {block:?}: the column block must be a positive multiple of 8")));
        }
        let (srows, scols) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
        Self::check_len("FP8 scales", scale_inv.len(), srows, scols)?;
        let mut m = Self::empty(Format::Fp8 { block }, rows, cols);
        // whole scale blocks per padded row
        let pscols = m.padded_cols.div_ceil(block[1]);
        m.scales = vec![0.0; srows * pscols];
        for br in 0..srows {
            for bc in 0..scols {
                m.scales[br * pscols + bc] = scale_inv[br * scols + bc] * FP8_VIA_F16_FACTOR;
            }
        }
        for r in 0..rows {
            m.data[r * m.row_bytes..][..cols].copy_from_slice(&w[r * cols..(r + 1) * cols]);
        }
        Ok(m)
    }

    /// ggml blocks as stored in a GGUF file: `rows` rows of `cols / block` blocks each.
    pub fn from_blocks(format: Format, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self, Error> {
        if !format.int_activations() {
            return Err(Error(format!("{} is not a block format", format.name())));
        }
        if !cols.is_multiple_of(format.col_block()) {
            return Err(Error(format!(
                "{} rows of {cols} columns: not a whole number of {}-blocks",
                format.name(),
                format.col_block()
            )));
        }
        let mut m = Self::empty(format, rows, cols);
        if bytes.len() != rows * m.row_bytes {
            return Err(Error(format!(
                "{} [{rows}, {cols}]: {} bytes, expected {}",
                format.name(),
                bytes.len(),
                rows * m.row_bytes
            )));
        }
        m.set_blocks(bytes);
        Ok(m)
    }

    /// ggml blocks, row after row, as the resident data (q8_0, q4_K and q6_K regrouped, see
    /// [`Q8_0_GROUP`], [`Q4K_GROUP_RECORD`] and [`Q6K_GROUP_RECORD`]).
    fn set_blocks(&mut self, bytes: Vec<u8>) {
        if !self.grouped {
            self.data = bytes;
            return;
        }
        let group_bytes = Q8_0_GROUP * self.row_bytes;
        for (r, row) in bytes.chunks_exact(self.row_bytes).enumerate() {
            let (g, n) = (r / Q8_0_GROUP, r % Q8_0_GROUP);
            let group = &mut self.data[g * group_bytes..(g + 1) * group_bytes];
            if self.format == Format::Q8_0 {
                let (quants, scales) = group.split_at_mut(row.len() / Q8_0_BLOCK.0 * Q8_0_GROUP_QUANTS);
                for (blk, b) in row.chunks_exact(Q8_0_BLOCK.0).enumerate() {
                    scales[blk * 32 + 2 * n..blk * 32 + 2 * n + 2].copy_from_slice(&b[..2]);
                    for (i, q4) in b[2..].chunks_exact(4).enumerate() {
                        let at = blk * Q8_0_GROUP_QUANTS + i * 64 + n * 4;
                        for (d, &q) in group_quants(quants, at).iter_mut().zip(q4) {
                            *d = q ^ 0x80;
                        }
                    }
                }
            } else if self.format == Format::Q6K {
                for (sb, b) in row.chunks_exact(Q6K_BLOCK.0).enumerate() {
                    let rec = &mut group[sb * Q6K_GROUP_RECORD..(sb + 1) * Q6K_GROUP_RECORD];
                    for (i, &v) in b.iter().enumerate() {
                        rec[q6k_record_offset(i, n)] = v;
                    }
                }
            } else {
                for (sb, b) in row.chunks_exact(Q4K_BLOCK.0).enumerate() {
                    let rec = &mut group[sb * Q4K_GROUP_RECORD..(sb + 1) * Q4K_GROUP_RECORD];
                    rec[2 * n..2 * n + 2].copy_from_slice(&b[0..2]);
                    rec[32 + 2 * n..32 + 2 * n + 2].copy_from_slice(&b[2..4]);
                    for (i, q4) in b[4..].chunks_exact(4).enumerate() {
                        // scale words (3), then the quantized bytes (32 per 64-column chunk)
                        rec[64 * (i + 1) + 4 * n..][..4].copy_from_slice(q4);
                    }
                }
            }
        }
        // rows past the matrix: zero weights (q8_0: offset 128) and zero scales
        if self.format == Format::Q8_0 {
            let nb = self.padded_cols / Q8_0_BLOCK.1;
            for r in self.rows..self.rows.next_multiple_of(Q8_0_GROUP) {
                let (g, n) = (r / Q8_0_GROUP, r % Q8_0_GROUP);
                let quants = &mut self.data[g * group_bytes..][..nb * Q8_0_GROUP_QUANTS];
                for blk in 0..nb {
                    for i in 0..8 {
                        group_quants(quants, blk * Q8_0_GROUP_QUANTS + i * 64 + n * 4).fill(0x80);
                    }
                }
            }
        }
    }

    /// Row `r` as stored (not the grouped formats: [`Self::group`]).
    pub(crate) fn row(&self, r: usize) -> &[u8] {
        debug_assert!(!self.grouped, "q8_0, q4_K and (on AVX-512) q6_K rows are stored in groups");
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Rows `16 g .. 16 g + 16` of a grouped format (see [`Q8_0_GROUP`], [`Q4K_GROUP_RECORD`] and
    /// [`Q6K_GROUP_RECORD`]).
    pub(crate) fn group(&self, g: usize) -> &[u8] {
        &self.data[g * Q8_0_GROUP * self.row_bytes..(g + 1) * Q8_0_GROUP * self.row_bytes]
    }

    /// Superblock `sb` of q6_K row `r` as ggml's block (its bytes gathered from the group's record).
    pub(crate) fn q6k_block(&self, r: usize, sb: usize) -> [u8; Q6K_BLOCK.0] {
        let n = r % Q8_0_GROUP;
        let rec = &self.group(r / Q8_0_GROUP)[sb * Q6K_GROUP_RECORD..(sb + 1) * Q6K_GROUP_RECORD];
        let mut b = [0u8; Q6K_BLOCK.0];
        // `ql` and `qh` in runs of 4 bytes, then the scales and `d` byte by byte
        for i in (0..192).step_by(4) {
            let at = q6k_record_offset(i, n);
            b[i..i + 4].copy_from_slice(&rec[at..at + 4]);
        }
        for (i, v) in b.iter_mut().enumerate().skip(192) {
            *v = rec[q6k_record_offset(i, n)];
        }
        b
    }

    /// Row `r` of a grouped format as f32 into `out` (`padded_cols` long).
    pub(crate) fn decode_grouped_row(&self, r: usize, out: &mut [f32]) {
        let n = r % Q8_0_GROUP;
        let group = self.group(r / Q8_0_GROUP);
        if self.format == Format::Q6K {
            for (sb, o) in out.chunks_exact_mut(Q6K_BLOCK.1).enumerate().take(self.padded_cols / Q6K_BLOCK.1) {
                q6k_block_values(&self.q6k_block(r, sb), o);
            }
            return;
        }
        if self.format == Format::Q4K {
            for (sb, o) in out.chunks_exact_mut(Q4K_BLOCK.1).enumerate().take(self.padded_cols / Q4K_BLOCK.1) {
                let rec = &group[sb * Q4K_GROUP_RECORD..(sb + 1) * Q4K_GROUP_RECORD];
                let (d, dmin) = (f16_at(rec, 2 * n), f16_at(rec, 32 + 2 * n));
                let mut packed = [0u8; 12];
                for (i, word) in packed.chunks_exact_mut(4).enumerate() {
                    word.copy_from_slice(&rec[64 * (i + 1) + 4 * n..][..4]);
                }
                let (sc, m) = q4k_scales(&packed);
                for (k, v) in o.iter_mut().enumerate() {
                    let (chunk, col) = (k / 64, k % 64);
                    let (gi, j) = (2 * chunk + col / 32, col % 32);
                    let q = rec[Q4K_GROUP_HEADER + chunk * 512 + (j / 4) * 64 + 4 * n + j % 4];
                    let q = if col < 32 { q & 0xf } else { q >> 4 };
                    *v = d * sc[gi] as f32 * q as f32 - dmin * m[gi] as f32;
                }
            }
            return;
        }
        let nb = self.padded_cols / Q8_0_BLOCK.1;
        let scales = &group[nb * Q8_0_GROUP_QUANTS..];
        for (blk, o) in out.chunks_exact_mut(32).enumerate().take(nb) {
            let d = f16_at(scales, blk * 32 + 2 * n);
            for (i, o4) in o.chunks_exact_mut(4).enumerate() {
                let q = &group[blk * Q8_0_GROUP_QUANTS + i * 64 + n * 4..][..4];
                for (v, &q) in o4.iter_mut().zip(q) {
                    *v = d * (q ^ 0x80) as i8 as f32;
                }
            }
        }
    }

    /// FP8 scales of row `r` (one per column block of the padded row).
    pub(crate) fn fp8_row_scales(&self, r: usize) -> &[f32] {
        match self.format {
            Format::Fp8 { block } => {
                let n = self.padded_cols.div_ceil(block[1]);
                &self.scales[(r / block[0]) * n..][..n]
            }
            _ => &[],
        }
    }

    /// Every stored byte (not FP8 scales). For prefetching.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The stored bytes of `rows` (not FP8 scales) where they are contiguous: a grouped format's
    /// only in whole groups of [`Q8_0_GROUP`] rows. For prefetching.
    pub fn bytes_of_rows(&self, rows: std::ops::Range<usize>) -> Option<&[u8]> {
        let whole = |r: usize| !self.grouped || r.is_multiple_of(Q8_0_GROUP) || r == self.rows;
        if rows.start > rows.end || rows.end > self.rows || !whole(rows.start) || !whole(rows.end) {
            return None;
        }
        let stored = |r: usize| if self.grouped { r.next_multiple_of(Q8_0_GROUP) } else { r };
        self.data.get(stored(rows.start) * self.row_bytes..stored(rows.end) * self.row_bytes)
    }

    /// Row `r` as f32 (the reference every kernel is tested against), `padded_cols` long.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let pc = self.padded_cols;
        // (the grouped formats have no rows as stored)
        let row = if self.grouped { &[][..] } else { self.row(r) };
        match self.format {
            Format::Q8_0 | Format::Q4K => {
                let mut out = vec![0f32; pc];
                self.decode_grouped_row(r, &mut out);
                out
            }
            Format::Q6K if self.grouped => {
                let mut out = vec![0f32; pc];
                self.decode_grouped_row(r, &mut out);
                out
            }
            Format::Q6K => {
                let mut out = vec![0f32; pc];
                for (b, o) in row.chunks_exact(Q6K_BLOCK.0).zip(out.chunks_exact_mut(Q6K_BLOCK.1)) {
                    let mut block = [0u8; Q6K_BLOCK.0];
                    block.copy_from_slice(b);
                    q6k_block_values(&block, o);
                }
                out
            }
            Format::F32 => row.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Format::Bf16 => row.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
            Format::Fp8 { block } => {
                let scales = self.fp8_row_scales(r);
                (0..pc).map(|c| fp8_via_f16(row[c]) * scales[c / block[1]]).collect()
            }
        }
    }
}

/// A ggml q6_K block's 256 values, by its definition.
fn q6k_block_values(b: &[u8; Q6K_BLOCK.0], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let base = 128 * half + l;
            for (k, q) in [q1, q2, q3, q4].into_iter().enumerate() {
                y[base + 32 * k] = d * sc[is + 2 * k] as i8 as f32 * q as f32;
            }
        }
    }
}

/// The 4 bytes at `at` of a q8_0 group's quantized blocks.
fn group_quants(quants: &mut [u8], at: usize) -> &mut [u8] {
    &mut quants[at..at + 4]
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The FP8 byte decoded through the f16 bit trick (2^-8 × its E4M3 value).
pub(crate) fn fp8_via_f16(b: u8) -> f32 {
    let bits = (((b as i8 as i16) << 7) as u16) & 0xbf80;
    f16::from_bits(bits).to_f32()
}

/// The eight 6-bit scales and mins of a q4_K block (ggml's `get_scale_min_k4`), unpacked with
/// 32-bit masks four at a time as llama.cpp does (this runs once per 256 weights per row).
#[inline(always)]
pub(crate) fn q4k_scales(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let sc_lo = u0 & LOW6;
    let sc_hi = (u2 & LOW4) | (((u0 >> 6) & LOW2) << 4);
    let m_lo = u1 & LOW6;
    let m_hi = ((u2 >> 4) & LOW4) | (((u1 >> 6) & LOW2) << 4);
    let join = |lo: u32, hi: u32| {
        let (l, h) = (lo.to_le_bytes(), hi.to_le_bytes());
        [l[0], l[1], l[2], l[3], h[0], h[1], h[2], h[3]]
    };
    (join(sc_lo, sc_hi), join(m_lo, m_hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row range's bytes: its rows' where rows are stored one after another, whole groups of
    /// 16 for q8_0 (refused for part of a group), nothing past the matrix.
    #[test]
    fn bytes_of_rows_are_the_stored_rows() {
        let w: Vec<f32> = (0..40 * 64).map(|i| (i % 13) as f32 - 6.0).collect();
        let f = PackedMatrix::from_f32(Format::F32, 40, 64, &w).unwrap();
        let rows = f.bytes_of_rows(3..5).unwrap();
        assert_eq!(rows.len(), 2 * 64 * 4);
        assert_eq!(rows[..4], w[3 * 64].to_le_bytes());
        assert!(f.bytes_of_rows(39..41).is_none());
        let q = PackedMatrix::from_f32(Format::Q8_0, 40, 64, &w).unwrap();
        assert_eq!(q.bytes_of_rows(16..32).map(<[u8]>::len), Some(16 * q.row_bytes));
        assert_eq!(q.bytes_of_rows(32..40).map(<[u8]>::len), Some(16 * q.row_bytes), "the last group whole");
        assert!(q.bytes_of_rows(8..16).is_none());
        assert_eq!(q.bytes_of_rows(0..40).map(<[u8]>::len), Some(q.bytes().len()));
    }

    #[test]
    fn q4k_scale_unpacking_matches_the_bytewise_definition() {
        for seed in 0..2000u32 {
            let q: Vec<u8> = (0..12u32).map(|i| (seed.wrapping_mul(2654435761).rotate_left(i * 5) >> 7) as u8).collect();
            let (sc, m) = super::q4k_scales(&q);
            for j in 0..8 {
                let (s, mm) = if j < 4 {
                    (q[j] & 63, q[j + 4] & 63)
                } else {
                    ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
                };
                assert_eq!((sc[j], m[j]), (s, mm), "{q:?} j={j}");
            }
        }
    }
}
