//! Launchers for our own kernels (`kernels/*.cu`), on candle's CUDA stream so that they run in
//! order with candle's ops (embedding, RMSNorm, matmuls, adds) without any synchronization.
//!
//! Arguments travel as device addresses: one launcher serves every element type, and a tensor
//! view (a narrowed column range) is just an address and a row stride.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaFunction, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Result, Shape, Storage, Tensor};

use crate::config::{ModelConfig, RopeStyle};

const CACHE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cache.ptx"));
const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// The head sizes `paged_attention` is compiled for.
pub const HEAD_DIMS: &[usize] = &[64, 128];

/// Our kernels for one model: its element type and attention shape fixed, each function looked
/// up once instead of by name on every launch (three launches per layer per step).
pub struct Kernels {
    stream: std::sync::Arc<CudaStream>,
    rope_and_cache: CudaFunction,
    paged_attention: CudaFunction,
    silu_and_mul: CudaFunction,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    interleaved_rope: bool,
}

impl Kernels {
    pub fn load(device: &CudaDevice, dtype: DType, config: &ModelConfig) -> Result<Self> {
        let (num_heads, num_kv_heads, head_dim) =
            (config.num_heads, config.num_kv_heads, config.head_dim);
        if !HEAD_DIMS.contains(&head_dim) {
            candle_core::bail!(
                "the GPU path supports head sizes {HEAD_DIMS:?}; this model's is {head_dim}"
            );
        }
        let group = num_heads / num_kv_heads.max(1);
        if group == 0 || group > 8 || num_heads % num_kv_heads.max(1) != 0 {
            candle_core::bail!("GPU attention supports 1 to 8 query heads per KV head");
        }
        let s = suffix(dtype)?;
        // candle keeps loaded modules by name; its function handle derefs to cudarc's.
        let load = |name: String, module: &str, ptx: &str| -> Result<CudaFunction> {
            Ok((*device.get_or_load_custom_func(&name, module, ptx)?).clone())
        };
        Ok(Self {
            stream: device.cuda_stream(),
            rope_and_cache: load(format!("rope_and_cache_{s}"), "minserve_cache", CACHE_PTX)?,
            silu_and_mul: load(format!("silu_and_mul_{s}"), "minserve_cache", CACHE_PTX)?,
            paged_attention: load(
                format!("paged_attention_{s}_{head_dim}"),
                "minserve_attention",
                ATTENTION_PTX,
            )?,
            num_heads,
            num_kv_heads,
            head_dim,
            interleaved_rope: config.rope_style == RopeStyle::Interleaved,
        })
    }

    /// Launches `func` on the model's stream with these parameters, in order.
    ///
    /// # Safety
    /// The kernel's parameters are exactly `addresses`, then `ints`, then `floats`, and every
    /// address lies inside a live tensor of the sizes the ints describe.
    unsafe fn launch(
        &self,
        func: &CudaFunction,
        addresses: &[u64],
        ints: &[i32],
        floats: &[f32],
        config: LaunchConfig,
    ) -> Result<()> {
        let mut builder = self.stream.launch_builder(func);
        for a in addresses {
            builder.arg(a);
        }
        for i in ints {
            builder.arg(i);
        }
        for f in floats {
            builder.arg(f);
        }
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}

/// The element type's suffix in our kernels' names.
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("no GPU kernels for {other:?}"),
    })
}

pub fn cuda_device(device: &Device) -> Result<&CudaDevice> {
    device.as_cuda_device()
}

/// Device address of the element at `offset` (in elements) past the start of `t`'s view.
pub fn address(t: &Tensor, offset: usize) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        candle_core::bail!("tensor is not on the GPU")
    };
    let stream = cuda.device.cuda_stream();
    let start = layout.start_offset() + offset;
    macro_rules! at {
        ($slice:expr, $t:ty) => {{
            let (base, _sync) = $slice.device_ptr(&stream);
            base + (start * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(match &cuda.slice {
        CudaStorageSlice::F32(s) => at!(s, f32),
        CudaStorageSlice::F16(s) => at!(s, half::f16),
        CudaStorageSlice::BF16(s) => at!(s, half::bf16),
        CudaStorageSlice::U32(s) => at!(s, u32),
        _ => candle_core::bail!("unexpected tensor type {:?} for a kernel", t.dtype()),
    })
}

/// Distance in elements between consecutive rows of a 2-D view (its leading stride).
pub fn row_stride(t: &Tensor) -> Result<usize> {
    let (_, layout) = t.storage_and_layout();
    match layout.stride() {
        [rows, 1] => Ok(*rows),
        other => candle_core::bail!("expected a row-major 2-D view, got strides {other:?}"),
    }
}

/// A tensor whose contents the next kernel overwrites entirely: allocated, never cleared.
pub fn uninitialized(shape: impl Into<Shape>, dtype: DType, device: &CudaDevice) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    // SAFETY: every caller hands the tensor to a kernel that writes all of it before any read.
    let slice = unsafe {
        match dtype {
            DType::F32 => CudaStorageSlice::F32(device.alloc::<f32>(n)?),
            DType::F16 => CudaStorageSlice::F16(device.alloc::<half::f16>(n)?),
            DType::BF16 => CudaStorageSlice::BF16(device.alloc::<half::bf16>(n)?),
            other => candle_core::bail!("no GPU kernels for {other:?}"),
        }
    };
    let storage = CudaStorage {
        slice,
        device: device.clone(),
    };
    debug_assert_eq!(storage.dtype(), dtype);
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}

fn grid(blocks: (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.0, blocks.1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The per-token tables of a step, on the GPU.
pub struct StepTables {
    pub positions: Tensor,
    pub slots: Tensor,
    pub token_sequence: Tensor,
    /// `[sequences, max_blocks]`, padded with block 0 (never read: a token stops at its
    /// position).
    pub block_tables: Tensor,
    pub max_blocks: usize,
}

impl Kernels {
    /// Rotates q and k (`qkv`: `[tokens, q | k | v]`) by position; writes the rotated q into `query` and k, v into the pool.
    pub fn rope_and_cache(
        &self,
        qkv: &Tensor,
        query: &Tensor,
        key_cache: &Tensor,
        value_cache: &Tensor,
        tables: &StepTables,
        (cos, sin): (&Tensor, &Tensor),
    ) -> Result<()> {
        let tokens = query.dim(0)?;
        let args = [
            address(qkv, 0)?,
            address(query, 0)?,
            address(key_cache, 0)?,
            address(value_cache, 0)?,
            address(&tables.positions, 0)?,
            address(&tables.slots, 0)?,
            address(cos, 0)?,
            address(sin, 0)?,
        ];
        let ints = [
            row_stride(qkv)? as i32,
            self.num_heads as i32,
            self.num_kv_heads as i32,
            self.head_dim as i32,
            self.interleaved_rope as i32,
        ];
        let config = grid((tokens as u32, 1), 128);
        // SAFETY: the kernel's parameters are these addresses and ints, in order; every address
        // lies inside a live tensor of the sizes the ints describe.
        unsafe { self.launch(&self.rope_and_cache, &args, &ints, &[], config) }
    }

    /// Attention of every new token of a step over its sequence's cached keys and values.
    pub fn paged_attention(
        &self,
        out: &Tensor,
        query: &Tensor,
        key_cache: &Tensor,
        value_cache: &Tensor,
        tables: &StepTables,
        block_size: usize,
    ) -> Result<()> {
        let tokens = query.dim(0)?;
        let args = [
            address(out, 0)?,
            address(query, 0)?,
            address(key_cache, 0)?,
            address(value_cache, 0)?,
            address(&tables.block_tables, 0)?,
            address(&tables.token_sequence, 0)?,
            address(&tables.positions, 0)?,
        ];
        let ints = [
            self.num_heads as i32,
            self.num_kv_heads as i32,
            block_size as i32,
            tables.max_blocks as i32,
        ];
        let scale = 1f32 / (self.head_dim as f32).sqrt();
        let config = grid((tokens as u32, self.num_kv_heads as u32), 128);
        // SAFETY: as in `rope_and_cache`.
        unsafe { self.launch(&self.paged_attention, &args, &ints, &[scale], config) }
    }

    /// `silu(gate) * up` for a `[rows, 2 * width]` projection whose halves are gate and up.
    pub fn silu_and_mul(&self, gate_up: &Tensor) -> Result<Tensor> {
        let device = cuda_device(gate_up.device())?;
        let (rows, double) = gate_up.dims2()?;
        let width = double / 2;
        let out = uninitialized((rows, width), gate_up.dtype(), device)?;
        let args = [
            address(&out, 0)?,
            address(gate_up, 0)?,
            address(gate_up, width)?,
        ];
        let ints = [width as i32, row_stride(gate_up)? as i32];
        let config = grid((rows as u32, 1), 256);
        // SAFETY: as in `rope_and_cache`.
        unsafe { self.launch(&self.silu_and_mul, &args, &ints, &[], config)? };
        Ok(out)
    }
}
