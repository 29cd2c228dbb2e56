//! With the `cuda` feature, compiles `kernels/*.cu` to PTX for the GPU path (`src/cuda`). The
//! driver turns PTX into machine code for whatever GPU it finds at load time, so one build runs
//! on every GPU at least as new as `CUDA_COMPUTE_CAP` (default 80: bf16 needs Ampere).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let compute_cap: String = compute_cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = match std::env::var_os("CUDA_HOME") {
        Some(home) => Path::new(&home).join("bin/nvcc"),
        None => PathBuf::from("nvcc"),
    };
    for name in ["attention", "cache"] {
        let source = format!("kernels/{name}.cu");
        let ptx = out_dir.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{compute_cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {} failed ({e}): the cuda feature needs the CUDA compiler \
                     (scripts/cuda-toolkit installs one)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {source}");
    }
}
