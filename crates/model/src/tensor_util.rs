//! Access to the raw f32 data behind candle tensors, for our own CPU kernels.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// The values of a contiguous f32 CPU tensor, in order.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("expected a contiguous tensor, got {layout:?}"),
    }
}

/// Runs `f` over the values of an f32 CPU tensor (made contiguous first if needed).
pub fn with_f32_slice<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let tensor = tensor.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(contiguous_f32(cpu, layout)?)),
        _ => candle_core::bail!("expected a CPU tensor"),
    }
}
