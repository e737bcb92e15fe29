//! A CPU tensor's values as a slice, without copying them out of candle's storage where they
//! are contiguous (cache rows for the attention kernels, logits for the sampler).

use candle_core::{CpuStorage, DType, Storage, Tensor};

/// A contiguous CPU tensor's values as stored, in the dtypes the kernels read in place.
#[derive(Debug, Clone, Copy)]
pub enum CpuValues<'a> {
    F32(&'a [f32]),
    /// bf16 values as their bits
    Bf16(&'a [u16]),
}

/// `f` on `t`'s values as stored: `None` where `t` is not a contiguous f32 or bf16 CPU tensor.
/// candle's storage stays read-locked, on this thread, while `f` runs.
pub fn with_values<R>(t: &Tensor, f: impl FnOnce(Option<CpuValues>) -> R) -> R {
    let (storage, layout) = t.storage_and_layout();
    // (matched, not `as_slice`: its error for another dtype captures a backtrace, which costs
    // microseconds per call under RUST_BACKTRACE)
    let values = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => Some(CpuValues::F32(&values[start..end])),
        (Storage::Cpu(CpuStorage::BF16(values)), Some((start, end))) => {
            let values = &values[start..end];
            // SAFETY: `half::bf16` is a transparent u16
            Some(CpuValues::Bf16(unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u16, values.len()) }))
        }
        _ => None,
    };
    f(values)
}

/// `f` on the values of a CPU tensor as f32: in place when it is f32 and contiguous (the cache
/// rows, logits), a copy otherwise.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let f = match with_values(t, |v| match v {
        Some(CpuValues::F32(values)) => Ok(f(values)),
        _ => Err(f),
    }) {
        Ok(r) => return Ok(r),
        Err(f) => f,
    };
    Ok(f(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
}

/// `f` of a contiguous bf16 CPU tensor's values as their bits; `None` for any other tensor.
pub fn with_bf16_bits<R>(t: &Tensor, f: impl FnOnce(&[u16]) -> R) -> Option<R> {
    with_values(t, |v| match v {
        Some(CpuValues::Bf16(bits)) => Some(f(bits)),
        _ => None,
    })
}
