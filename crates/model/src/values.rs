//! A CPU tensor's values as a slice, without copying them out of candle's storage where they
//! are contiguous (cache rows for the attention kernels, logits for the sampler).

use candle_core::{DType, Tensor};

/// `f` on the values of a CPU tensor as f32: in place when it is f32 and contiguous (the cache
/// rows, logits), a copy otherwise.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        // (matched, not `as_slice`: its error for another dtype captures a backtrace, which
        // costs microseconds per call under RUST_BACKTRACE)
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&values[start..end]));
        }
    }
    Ok(f(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
}

/// `f` of a contiguous bf16 CPU tensor's values as their bits; `None` for any other tensor.
pub fn with_bf16_bits<R>(t: &Tensor, f: impl FnOnce(&[u16]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(values)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return None;
    };
    let values = &values[start..end];
    // SAFETY: `half::bf16` is a transparent u16
    Some(f(unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u16, values.len()) }))
}
