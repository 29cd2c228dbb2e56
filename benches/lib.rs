//! Shared pieces of minserve's benchmarks.

use std::path::PathBuf;

/// The default model, fetched on first use like the binary does.
pub fn default_model_path() -> PathBuf {
    minserve_hub::resolve(
        minserve_hub::default_model(),
        &minserve_hub::FetchOptions::default(),
    )
    .unwrap_or_else(|e| {
        eprintln!("cannot get the default model: {e}");
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
