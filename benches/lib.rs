//! Shared pieces of minserve's benchmarks.

use std::path::PathBuf;
use std::time::Instant;

/// The default model, fetched on first use like the binary does.
pub fn default_model_path() -> PathBuf {
    catalog_model_path(minserve_hub::default_model())
}

/// A catalog model by alias, fetched on first use like the binary does.
pub fn catalog_model_path(alias: &str) -> PathBuf {
    minserve_hub::resolve(alias, &minserve_hub::FetchOptions::default()).unwrap_or_else(|e| {
        eprintln!("cannot get `{alias}`: {e}");
        std::process::exit(2);
    })
}

/// Median of `values` (which must not be empty).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Memory bandwidth in GB/s: bytes read plus bytes written per second by a 256 MiB copy
/// (median of 5), well past any cache.
pub fn memory_gbps() -> f64 {
    let len = 256 << 20;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src);
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            // A copy reads and writes every byte.
            2.0 * len as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(&mut runs)
}
