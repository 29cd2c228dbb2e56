// Shared by the kernels: one element type per instantiation (float, half, bfloat16), always
// computed in float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// Instantiates `NAME<T>` as three C symbols, NAME_f32 / NAME_f16 / NAME_bf16, the names the
// Rust side loads.
#define FOR_EACH_DTYPE(INSTANTIATE)        \
    INSTANTIATE(f32, float)                \
    INSTANTIATE(f16, __half)               \
    INSTANTIATE(bf16, __nv_bfloat16)
