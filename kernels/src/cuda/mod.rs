//! Loading the kernel modules into candle's CUDA context and launching them.

pub mod bench;
pub mod nccl;
pub mod ops;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaStream, CudaView, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CudaDevice, Error, Layout, Result, Storage, Tensor};

/// Environment variable naming a directory of replacement modules (`NAME.cubin` / `NAME.ptx`).
pub const PTX_DIR_ENV: &str = "MOESERVE_KERNELS_PTX_DIR";

/// The compute capability the embedded PTX targets (`CUDA_COMPUTE_CAP` at build time).
pub const COMPUTE_CAP: &str = env!("MOESERVE_KERNELS_COMPUTE_CAP");

/// Module name and embedded PTX of every `src/*.cu`.
pub const MODULES: &[(&str, &str)] = &[
    ("gemm", include_str!(concat!(env!("OUT_DIR"), "/gemm.ptx"))),
    ("mla_decode", include_str!(concat!(env!("OUT_DIR"), "/mla_decode.ptx"))),
    ("norm_rope", include_str!(concat!(env!("OUT_DIR"), "/norm_rope.ptx"))),
    ("router", include_str!(concat!(env!("OUT_DIR"), "/router.ptx"))),
];

type ModuleCache = Mutex<HashMap<(usize, &'static str), Arc<CudaModule>>>;

fn cache() -> &'static ModuleCache {
    static CACHE: OnceLock<ModuleCache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn kernel_err(op: &str, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("cuda kernel {op}: {e}"))
}

/// Where module `name` comes from: an override file, else the embedded PTX.
pub fn module_source(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(PTX_DIR_ENV)?);
    ["cubin", "ptx"].iter().map(|ext| dir.join(format!("{name}.{ext}"))).find(|p| p.is_file())
}

/// Function `func` of module `module`, loaded once per context.
pub fn function(dev: &CudaDevice, module: &'static str, func: &str) -> Result<CudaFunction> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let key = (Arc::as_ptr(ctx) as usize, module);
    let mut modules = cache().lock().map_err(|_| kernel_err(module, "module cache poisoned"))?;
    let m = match modules.get(&key) {
        Some(m) => m.clone(),
        None => {
            let ptx = match module_source(module) {
                Some(path) => Ptx::from_file(path),
                None => {
                    let (_, src) =
                        MODULES.iter().find(|(n, _)| *n == module).ok_or_else(|| kernel_err(module, "no such kernel module"))?;
                    Ptx::from_src(*src)
                }
            };
            let m = ctx.load_module(ptx).map_err(|e| kernel_err(module, e))?;
            modules.insert(key, m.clone());
            m
        }
    };
    m.load_function(func).map_err(|e| kernel_err(func, e))
}

/// A contiguous tensor's storage as a typed device view (`what` names the operand in errors).
pub(crate) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        Error::Msg(format!("{what}: expected a contiguous tensor, got dims {:?} strides {:?}", l.dims(), l.stride()))
    })?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// The CUDA storage behind a tensor, or an error naming the operand.
pub(crate) fn cuda_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => Err(Error::Msg(format!("{what}: expected a CUDA tensor"))),
    }
}

/// Wrap a freshly written device buffer as a tensor of `shape`.
pub(crate) fn wrap<T: CudaDType>(
    data: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    dev: &CudaDevice,
    shape: &[usize],
) -> Tensor {
    Tensor::from_storage(Storage::Cuda(T::wrap_cuda_slice(data, dev.clone())), shape, candle_core::op::BackpropOp::none(), false)
}

pub(crate) fn grid(x: usize, y: usize, z: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (x as u32, y as u32, z as u32), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn stream(dev: &CudaDevice) -> Arc<CudaStream> {
    dev.cuda_stream()
}

/// Number of streaming multiprocessors (for the split-K plan); 132 (H100) if unknown.
pub fn sm_count(dev: &CudaDevice) -> usize {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    dev.cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_or(132, |n| n.max(1) as usize)
}
