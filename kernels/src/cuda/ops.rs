//! Tensor-level API over candle CUDA tensors: each function checks shapes and dtypes (errors
//! name the op and the shapes), launches the kernel on candle's stream and returns a tensor.
//! Activations are f32 or bf16; the CPU references in `crate::reference` define the results.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CudaDevice, DType, Error, InplaceOp2, Layout, Result, Tensor};
use half::bf16;

use super::{cuda_storage, function, grid, stream, view, wrap};
use crate::reference::mla::{plan_splits, MlaShape};
use crate::reference::router::RouteConfig;

fn bad(op: &str, msg: String) -> Error {
    Error::Msg(format!("{op}: {msg}"))
}

fn launch_err(op: &str) -> impl Fn(candle_core::cuda_backend::cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Msg(format!("{op}: launch failed: {e}"))
}

fn suffix(op: &str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        d => Err(bad(op, format!("unsupported dtype {d:?} (f32, bf16)"))),
    }
}

fn device(t: &Tensor, op: &str) -> Result<CudaDevice> {
    Ok(t.device().as_cuda_device().map_err(|_| bad(op, "expected a CUDA tensor".into()))?.clone())
}

fn upload<T: DeviceRepr + 'static>(dev: &CudaDevice, v: &[T]) -> Result<CudaSlice<T>> {
    dev.clone_htod(v)
}

/// `x: [.., dim]`, `w: [dim]` (same dtype) -> RMSNorm of every row (f32 statistics).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let dim = x.dims().last().copied().unwrap_or(0);
    if w.dims() != [dim] || w.dtype() != x.dtype() {
        return Err(bad(OP, format!("x {:?} {:?} with weight {:?} {:?}", x.dims(), x.dtype(), w.dims(), w.dtype())));
    }
    let rows = x.elem_count() / dim.max(1);
    let x = x.contiguous()?;
    let dev = device(&x, OP)?;
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        rows: usize,
        dim: usize,
        eps: f32,
        name: &str,
    ) -> Result<CudaSlice<T>> {
        let f = function(dev, "norm_rope", name)?;
        let s = stream(dev);
        let out = unsafe { dev.alloc::<T>(rows * dim)? };
        let (xv, wv) = (view::<T>(x.0, x.1, "rms_norm x")?, view::<T>(w.0, w.1, "rms_norm weight")?);
        let (dim_i, mut out) = (dim as i32, out);
        let mut b = s.launch_builder(&f);
        b.arg(&xv).arg(&wv).arg(&mut out).arg(&dim_i).arg(&eps);
        unsafe { b.launch(grid(rows, 1, 1, 256)) }.map_err(launch_err("rms_norm"))?;
        Ok(out)
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (xs, ws) = (cuda_storage(&xs, OP)?, cuda_storage(&ws, OP)?);
    let name = format!("rms_norm_{}", suffix(OP, x.dtype())?);
    let out = match x.dtype() {
        DType::F32 => wrap(run::<f32>(&dev, (xs, xl), (ws, wl), rows, dim, eps as f32, &name)?, &dev, x.dims()),
        _ => wrap(run::<bf16>(&dev, (xs, xl), (ws, wl), rows, dim, eps as f32, &name)?, &dev, x.dims()),
    };
    Ok(out)
}

/// `x: [n, heads, rope_dim]` (any strides with a unit last stride, e.g. q's rope part), `cos`/`sin`
/// `[n, rope_dim / 2]` f32 -> the rotated contiguous `[n, heads, rope_dim]` in x's dtype.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    const OP: &str = "rope_interleaved";
    let (n, heads, rope) = x.dims3()?;
    if cos.dims() != [n, rope / 2] || sin.dims() != cos.dims() || cos.dtype() != DType::F32 || rope % 2 != 0 {
        return Err(bad(
            OP,
            format!("x {:?} with cos {:?} / sin {:?} (f32 [n, rope/2] expected)", x.dims(), cos.dims(), sin.dims()),
        ));
    }
    let dev = device(x, OP)?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    if xl.stride()[2] != 1 {
        return Err(bad(OP, format!("x strides {:?}: the last must be 1", xl.stride())));
    }
    let (st, sh) = (xl.stride()[0] as i64, xl.stride()[1] as i64);
    let (cs, cl) = cos.storage_and_layout();
    let (ss, sl) = sin.storage_and_layout();
    let xs = cuda_storage(&xs, OP)?;
    let (cv, sv) = (view::<f32>(cuda_storage(&cs, OP)?, cl, "rope cos")?, view::<f32>(cuda_storage(&ss, OP)?, sl, "rope sin")?);
    let name = format!("rope_interleaved_{}", suffix(OP, x.dtype())?);
    let f = function(&dev, "norm_rope", &name)?;
    let s = stream(&dev);
    let total = n * heads * rope / 2;
    let cfg = grid(total.div_ceil(256).clamp(1, 65535), 1, 1, 256);
    let (n_i, h_i, r_i) = (n as i32, heads as i32, rope as i32);
    // the strided input starts at the layout's offset and spans up to its last element
    let span = if n == 0 { 0 } else { (n - 1) * st as usize + (heads - 1) * sh as usize + rope };
    macro_rules! go {
        ($t:ty) => {{
            let src = xs.as_cuda_slice::<$t>()?.slice(xl.start_offset()..xl.start_offset() + span);
            let mut out = unsafe { dev.alloc::<$t>(n * heads * rope)? };
            let mut b = s.launch_builder(&f);
            b.arg(&src).arg(&cv).arg(&sv).arg(&mut out).arg(&n_i).arg(&h_i).arg(&r_i).arg(&st).arg(&sh);
            unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
            wrap(out, &dev, &[n, heads, rope])
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => go!(f32),
        _ => go!(bf16),
    })
}

struct CacheWrite {
    slots: Vec<i32>,
}

impl InplaceOp2 for CacheWrite {
    fn name(&self) -> &'static str {
        "cache_write"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<()> {
        Err(bad("cache_write", "CUDA only (the CPU path uses slice_set)".into()))
    }

    fn cuda_fwd(&self, dst: &mut CudaStorage, dst_l: &Layout, src: &CudaStorage, src_l: &Layout) -> Result<()> {
        let row_dim = src_l.dims().last().copied().unwrap_or(0);
        let (n, rows) = (self.slots.len(), dst_l.dims().first().copied().unwrap_or(0));
        if src_l.dims() != [n, row_dim] || dst_l.dims() != [rows, row_dim] || !dst_l.is_contiguous() || dst_l.start_offset() != 0
        {
            return Err(bad("cache_write", format!("rows {:?} into pool {:?} with {n} slots", src_l.dims(), dst_l.dims())));
        }
        if let Some(&s) = self.slots.iter().find(|&&s| s < 0 || s as usize >= rows) {
            return Err(bad("cache_write", format!("slot {s} outside the pool's {rows} rows")));
        }
        let dev = dst.device.clone();
        let slots = upload(&dev, &self.slots)?;
        let name = format!("cache_write_{}", suffix("cache_write", dst.dtype())?);
        let f = function(&dev, "norm_rope", &name)?;
        let s = stream(&dev);
        let rd = row_dim as i32;
        macro_rules! go {
            ($t:ty) => {{
                let sv = view::<$t>(src, src_l, "cache_write rows")?;
                let dv = dst.as_cuda_slice_mut::<$t>()?;
                let mut b = s.launch_builder(&f);
                b.arg(&sv).arg(&slots).arg(dv).arg(&rd);
                unsafe { b.launch(grid(n, 1, 1, 128)) }.map_err(launch_err("cache_write"))?;
            }};
        }
        match dst.dtype() {
            DType::F32 => go!(f32),
            _ => go!(bf16),
        }
        Ok(())
    }
}

/// Write `rows: [n, row_dim]` into `pool: [pool_rows, row_dim]` at pool rows `slots` (in place).
pub fn cache_write(pool: &Tensor, rows: &Tensor, slots: &[i32]) -> Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    let rows = rows.to_dtype(pool.dtype())?.contiguous()?;
    pool.inplace_op2(&rows, &CacheWrite { slots: slots.to_vec() })
}

/// Absorbed MLA decode (see `reference::mla::mla_decode`): `q: [nq, heads, latent + rope]`,
/// `pool: [rows, latent + rope]` (same dtype) -> `[nq, heads, latent]` in that dtype.
pub fn mla_decode(q: &Tensor, pool: &Tensor, block_table: &[i32], kv_lens: &[i32], shape: &MlaShape) -> Result<Tensor> {
    const OP: &str = "mla_decode";
    let d = shape.row_dim();
    let nq = kv_lens.len();
    if q.dims() != [nq, shape.heads, d] || pool.dims().get(1) != Some(&d) || q.dtype() != pool.dtype() {
        return Err(bad(
            OP,
            format!("q {:?} {:?}, pool {:?} {:?}, {nq} queries, {shape:?}", q.dims(), q.dtype(), pool.dims(), pool.dtype()),
        ));
    }
    if d > 576 || shape.latent > 512 || block_table.len() != nq * shape.max_pages || shape.page_size == 0 {
        return Err(bad(
            OP,
            format!("{shape:?} with a block table of {} entries: needs latent <= 512, latent + rope <= 576", block_table.len()),
        ));
    }
    let max_len = kv_lens.iter().copied().max().unwrap_or(0).max(0) as usize;
    if max_len > shape.max_pages * shape.page_size {
        return Err(bad(OP, format!("kv length {max_len} beyond {} pages of {}", shape.max_pages, shape.page_size)));
    }
    let dev = device(q, OP)?;
    let q = q.contiguous()?;
    let groups = shape.heads.div_ceil(16);
    let (splits, per_split) = plan_splits(max_len, nq * groups, super::sm_count(&dev));
    let sfx = suffix(OP, q.dtype())?;
    let fd = function(&dev, "mla_decode", &format!("mla_decode_{sfx}"))?;
    let fc = function(&dev, "mla_decode", &format!("mla_combine_{sfx}"))?;
    let s = stream(&dev);
    let table = upload(&dev, block_table)?;
    let lens = upload(&dev, kv_lens)?;
    let mut o_part = dev.alloc_zeros::<f32>(nq * splits * shape.heads * shape.latent)?;
    let mut lse = dev.alloc_zeros::<f32>(nq * splits * shape.heads)?;
    let (h, l, r, ps, mp, per) = (
        shape.heads as i32,
        shape.latent as i32,
        shape.rope as i32,
        shape.page_size as i32,
        shape.max_pages as i32,
        per_split as i32,
    );
    let (qs, ql) = q.storage_and_layout();
    let (pst, pl) = pool.storage_and_layout();
    let (qs, pst) = (cuda_storage(&qs, OP)?, cuda_storage(&pst, OP)?);
    let splits_i = splits as i32;
    macro_rules! go {
        ($t:ty) => {{
            let qv = view::<$t>(qs, ql, "mla q")?;
            let pv = view::<$t>(pst, pl, "mla pool")?;
            let mut b = s.launch_builder(&fd);
            b.arg(&qv).arg(&pv).arg(&table).arg(&lens).arg(&mut o_part).arg(&mut lse);
            b.arg(&h).arg(&l).arg(&r).arg(&ps).arg(&mp).arg(&per).arg(&shape.scale);
            unsafe { b.launch(grid(groups, splits, nq, 256)) }.map_err(launch_err(OP))?;
            let mut out = unsafe { dev.alloc::<$t>(nq * shape.heads * shape.latent)? };
            let mut b = s.launch_builder(&fc);
            b.arg(&o_part).arg(&lse).arg(&mut out).arg(&h).arg(&l).arg(&splits_i);
            unsafe { b.launch(grid(shape.heads, nq, 1, 128)) }.map_err(launch_err("mla_combine"))?;
            wrap(out, &dev, &[nq, shape.heads, shape.latent])
        }};
    }
    Ok(match q.dtype() {
        DType::F32 => go!(f32),
        _ => go!(bf16),
    })
}

/// Router selection on the GPU: `logits: [n, n_experts]` f32, `bias: [n_experts]` f32 ->
/// token-major experts and weights (`[n, top_k]` each, on the host: the MoE groups by them).
pub fn route(logits: &Tensor, bias: Option<&Tensor>, cfg: &RouteConfig) -> Result<(Vec<u32>, Vec<f32>)> {
    const OP: &str = "moe_route";
    let (n, e) = logits.dims2()?;
    if e != cfg.n_experts
        || e > 512
        || cfg.n_group == 0
        || cfg.n_group > 64
        || cfg.top_k > 32
        || cfg.top_k > e
        || logits.dtype() != DType::F32
    {
        return Err(bad(
            OP,
            format!(
                "logits {:?} {:?} with {cfg:?} (f32, <= 512 experts, <= 64 groups, top_k <= 32)",
                logits.dims(),
                logits.dtype()
            ),
        ));
    }
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let dev = device(logits, OP)?;
    let logits = logits.contiguous()?;
    let f = function(&dev, "router", OP)?;
    let s = stream(&dev);
    let mut experts = dev.alloc_zeros::<i32>(n * cfg.top_k)?;
    let mut weights = dev.alloc_zeros::<f32>(n * cfg.top_k)?;
    let (ls, ll) = logits.storage_and_layout();
    let lv = view::<f32>(cuda_storage(&ls, OP)?, ll, "router logits")?;
    let bias = bias.map(|b| b.to_dtype(DType::F32).and_then(|b| b.contiguous())).transpose()?;
    let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
    let args = (e as i32, cfg.n_group as i32, cfg.topk_group as i32, cfg.top_k as i32, cfg.scoring as i32, cfg.method as i32);
    let norm = cfg.norm_topk_prob as i32;
    let null = 0u64;
    let bv = match &bias_guard {
        Some((bs, bl)) if bl.dims() == [e] => Some(view::<f32>(cuda_storage(bs, OP)?, bl, "router bias")?),
        Some((_, bl)) => return Err(bad(OP, format!("bias {:?} for {e} experts", bl.dims()))),
        None => None,
    };
    {
        let mut b = s.launch_builder(&f);
        b.arg(&lv);
        match &bv {
            Some(bv) => b.arg(bv),
            None => b.arg(&null),
        };
        b.arg(&mut experts).arg(&mut weights).arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3).arg(&args.4).arg(&args.5);
        b.arg(&norm).arg(&cfg.scaling);
        unsafe { b.launch(grid(n, 1, 1, 256)) }.map_err(launch_err(OP))?;
    }
    let experts: Vec<i32> = dev.clone_dtoh(&experts)?;
    let weights: Vec<f32> = dev.clone_dtoh(&weights)?;
    Ok((experts.into_iter().map(|x| x as u32).collect(), weights))
}

/// A projection weight resident on the GPU: `data: [n, k]` in f32 / bf16, or FP8 E4M3 bytes (U8)
/// with `scale: [ceil(n / block[0]), ceil(k / block[1])]` f32.
#[derive(Debug, Clone)]
pub struct GpuWeight {
    pub data: Tensor,
    pub scale: Option<Tensor>,
    pub block: [usize; 2],
}

impl GpuWeight {
    pub fn dims(&self) -> (usize, usize) {
        let d = self.data.dims();
        (d.first().copied().unwrap_or(0), d.get(1).copied().unwrap_or(0))
    }

    fn kind(&self, op: &str) -> Result<&'static str> {
        match (self.data.dtype(), &self.scale) {
            (DType::U8, Some(_)) => Ok("fp8"),
            (DType::F32, None) => Ok("f32"),
            (DType::BF16, None) => Ok("bf16"),
            (d, s) => Err(bad(op, format!("weight dtype {d:?} (scale: {})", s.is_some()))),
        }
    }

    fn check(&self, op: &str) -> Result<()> {
        let (n, k) = self.dims();
        if self.data.rank() != 2 || !self.data.is_contiguous() {
            return Err(bad(op, format!("weight {:?}: a contiguous [n, k] tensor expected", self.data.dims())));
        }
        if let Some(s) = &self.scale {
            let want = [n.div_ceil(self.block[0].max(1)), k.div_ceil(self.block[1].max(1))];
            if s.dims() != want || s.dtype() != DType::F32 || self.block.contains(&0) || !s.is_contiguous() {
                return Err(bad(
                    op,
                    format!("scale {:?} {:?} for weight [{n}, {k}] in blocks {:?}", s.dims(), s.dtype(), self.block),
                ));
            }
        }
        Ok(())
    }

    /// Device pointers of the weight and its scale (0 without).
    fn pointers(&self, dev: &CudaDevice, op: &str) -> Result<(u64, u64)> {
        let s = stream(dev);
        let ptr = |t: &Tensor| -> Result<u64> {
            let (st, l) = t.storage_and_layout();
            let cs = cuda_storage(&st, op)?;
            let off = l.start_offset();
            let p = match t.dtype() {
                DType::U8 => cs.as_cuda_slice::<u8>()?.slice(off..).device_ptr(&s).0,
                DType::F32 => cs.as_cuda_slice::<f32>()?.slice(off..).device_ptr(&s).0,
                DType::BF16 => cs.as_cuda_slice::<bf16>()?.slice(off..).device_ptr(&s).0,
                d => return Err(bad(op, format!("weight dtype {d:?}"))),
            };
            Ok(p)
        };
        Ok((ptr(&self.data)?, self.scale.as_ref().map(ptr).transpose()?.unwrap_or(0)))
    }
}

/// Tile shape for `m` rows: 16 x 128 for decode-sized batches, 64 x 64 otherwise.
fn tile(m: usize) -> (&'static str, usize, usize) {
    if m <= 16 {
        ("small", 16, 128)
    } else {
        ("large", 64, 64)
    }
}

/// `x: [m, k]` (f32 / bf16) · `wᵀ` -> `[m, n]` in x's dtype (FP8 dequantized in the tile).
pub fn gemm(x: &Tensor, w: &GpuWeight) -> Result<Tensor> {
    const OP: &str = "gemm";
    w.check(OP)?;
    let (m, k) = x.dims2()?;
    let (n, wk) = w.dims();
    if wk != k {
        return Err(bad(OP, format!("x {:?} with weight [{n}, {wk}]", x.dims())));
    }
    let dev = device(x, OP)?;
    let x = x.contiguous()?;
    let (tname, bm, bn) = tile(m);
    let f = function(&dev, "gemm", &format!("gemm_{}_{}_{tname}", w.kind(OP)?, suffix(OP, x.dtype())?))?;
    let s = stream(&dev);
    let (wp, sp) = w.pointers(&dev, OP)?;
    let (m_i, n_i, k_i, sbn, sbk) = (m as i32, n as i32, k as i32, w.block[0] as i32, w.block[1] as i32);
    let (sbn, sbk) = if w.scale.is_some() { (sbn, sbk) } else { (0, 0) };
    let (xs, xl) = x.storage_and_layout();
    let xs = cuda_storage(&xs, OP)?;
    let cfg = grid(n.div_ceil(bn), m.div_ceil(bm).max(1), 1, 256);
    macro_rules! go {
        ($t:ty) => {{
            let xv = view::<$t>(xs, xl, "gemm x")?;
            let mut out = unsafe { dev.alloc::<$t>(m * n)? };
            let mut b = s.launch_builder(&f);
            b.arg(&xv).arg(&wp).arg(&sp).arg(&mut out).arg(&m_i).arg(&n_i).arg(&k_i).arg(&sbn).arg(&sbk);
            unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
            wrap(out, &dev, &[m, n])
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => go!(f32),
        _ => go!(bf16),
    })
}

/// Grouped expert GEMM: list row `p` (rows `offsets[g]..offsets[g + 1]` belong to `weights[g]`)
/// reads `x[row_idx[p]]`; returns `[offsets.last(), n]` in list order, in x's dtype. All weights
/// share one kind and shape.
pub fn grouped_gemm(x: &Tensor, row_idx: &[i32], offsets: &[i32], weights: &[&GpuWeight]) -> Result<Tensor> {
    const OP: &str = "grouped_gemm";
    let (rows_x, k) = x.dims2()?;
    let Some(first) = weights.first() else { return Err(bad(OP, "no groups".into())) };
    let (n, wk) = first.dims();
    let kind = first.kind(OP)?;
    let total = offsets.last().copied().unwrap_or(0).max(0) as usize;
    if offsets.len() != weights.len() + 1 || row_idx.len() != total || wk != k || offsets.windows(2).any(|w| w[1] < w[0]) {
        return Err(bad(
            OP,
            format!(
                "x {:?}, {} groups, {} offsets, {} row indices, weight [{n}, {wk}]",
                x.dims(),
                weights.len(),
                offsets.len(),
                row_idx.len()
            ),
        ));
    }
    if let Some(&r) = row_idx.iter().find(|&&r| r < 0 || r as usize >= rows_x) {
        return Err(bad(OP, format!("row index {r} outside x's {rows_x} rows")));
    }
    let dev = device(x, OP)?;
    let mut ptrs = Vec::with_capacity(weights.len());
    let mut sptrs = Vec::with_capacity(weights.len());
    for w in weights {
        w.check(OP)?;
        if w.dims() != (n, k) || w.kind(OP)? != kind || w.block != first.block {
            return Err(bad(OP, format!("group weights differ: [{n}, {k}] {kind} vs {:?} {}", w.dims(), w.kind(OP)?)));
        }
        let (p, sp) = w.pointers(&dev, OP)?;
        ptrs.push(p);
        sptrs.push(sp);
    }
    let x = x.contiguous()?;
    let max_rows = offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
    let (tname, bm, bn) = tile(max_rows);
    let f = function(&dev, "gemm", &format!("grouped_gemm_{kind}_{}_{tname}", suffix(OP, x.dtype())?))?;
    let s = stream(&dev);
    let idx = upload(&dev, row_idx)?;
    let offs = upload(&dev, offsets)?;
    let wp = upload(&dev, &ptrs)?;
    let sp = if first.scale.is_some() { Some(upload(&dev, &sptrs)?) } else { None };
    let (sbn, sbk) = if first.scale.is_some() { (first.block[0] as i32, first.block[1] as i32) } else { (0, 0) };
    let (n_i, k_i, null) = (n as i32, k as i32, 0u64);
    let (xs, xl) = x.storage_and_layout();
    let xs = cuda_storage(&xs, OP)?;
    let cfg = grid(n.div_ceil(bn), max_rows.div_ceil(bm).max(1), weights.len(), 256);
    macro_rules! go {
        ($t:ty) => {{
            let xv = view::<$t>(xs, xl, "grouped x")?;
            let mut out = dev.alloc_zeros::<$t>(total.max(1) * n)?;
            let mut b = s.launch_builder(&f);
            b.arg(&xv).arg(&idx).arg(&offs).arg(&wp);
            match &sp {
                Some(sp) => b.arg(sp),
                None => b.arg(&null),
            };
            b.arg(&mut out).arg(&n_i).arg(&k_i).arg(&sbn).arg(&sbk);
            if total > 0 {
                unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
            }
            wrap(out, &dev, &[total.max(1), n]).narrow(0, 0, total)?
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => go!(f32),
        _ => go!(bf16),
    })
}
