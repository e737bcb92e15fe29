//! With the `cuda` feature: compile every `src/*.cu` to PTX with nvcc into OUT_DIR (embedded by
//! `src/cuda/module.rs`). Without it: nothing, and no nvcc is needed.
//!
//! `CUDA_COMPUTE_CAP` picks the target: `80` (default) emits `compute_80` PTX, which any newer
//! driver (Hopper included) JIT-compiles; `90` emits `compute_90` PTX (needs nvcc >= 11.8).
//! `NVCC` overrides the compiler, `NVCC_FLAGS` adds flags.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=NVCC_FLAGS");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = Path::new("src");
    let cap = compute_cap();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(src)
        .expect("kernels/src")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    for s in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
        let stem = s.file_stem().and_then(|n| n.to_str()).expect("kernel file name");
        let ptx = out.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg(format!("--gpu-architecture=compute_{cap}"))
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo", "-I"])
            .arg(src)
            .arg("-o")
            .arg(&ptx)
            .arg(s);
        if let Ok(extra) = std::env::var("NVCC_FLAGS") {
            cmd.args(extra.split_whitespace());
        }
        let status = cmd.status().unwrap_or_else(|e| {
            panic!("moeserve-kernels: cannot run `{nvcc}` ({e}); install the CUDA toolkit (scripts/install-cuda-toolkit.sh) or build without --features cuda")
        });
        if !status.success() {
            panic!("moeserve-kernels: nvcc failed on {} ({status})", s.display());
        }
    }
    println!("cargo:rustc-env=MOESERVE_KERNELS_COMPUTE_CAP={cap}");
}

/// `CUDA_COMPUTE_CAP` as nvcc's two digits (`8.0`, `80`, `sm_90` all accepted), default 80.
fn compute_cap() -> String {
    let raw = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    match digits.parse::<u32>() {
        Ok(c) if c >= 70 => c.to_string(),
        _ => panic!("moeserve-kernels: CUDA_COMPUTE_CAP={raw}: expected e.g. 80 or 90"),
    }
}
