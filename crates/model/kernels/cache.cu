// Rotary embedding and reshape-and-cache in one pass over a step's q/k/v projections.
//
// A step's fused projection gives each token one row [q heads | k heads | v heads]. This
// kernel rotates q and k by the token's position, writes the rotated query where attention
// reads it, and writes k and v into the paged pool at the token's slot. Fusing the two saves a
// launch and a round trip of k through memory per layer.
//
// Pool layout per layer: [slot][kv head][head_dim], slot = block * block_size + offset, the
// same slot numbering as the CPU cache (the scheduler's slot mapping).

#include "common.cuh"

template <typename T>
__device__ void rope_and_cache(
    const T* __restrict__ qkv,         // [tokens, row_stride]
    T* __restrict__ query,             // [tokens, num_heads * head_dim], rotated
    T* __restrict__ key_cache,         // [slots, num_kv_heads * head_dim]
    T* __restrict__ value_cache,       // [slots, num_kv_heads * head_dim]
    const uint32_t* __restrict__ positions,
    const uint32_t* __restrict__ slots,
    const float* __restrict__ cos,     // [max_positions, head_dim / 2]
    const float* __restrict__ sin,
    int row_stride, int num_heads, int num_kv_heads, int head_dim, int interleaved) {
    const int token = blockIdx.x;
    const int half = head_dim / 2;
    const int kv_width = num_kv_heads * head_dim;
    const T* row = qkv + (size_t)token * row_stride;
    const float* c = cos + (size_t)positions[token] * half;
    const float* s = sin + (size_t)positions[token] * half;
    T* q_out = query + (size_t)token * num_heads * head_dim;
    T* k_out = key_cache + (size_t)slots[token] * kv_width;
    T* v_out = value_cache + (size_t)slots[token] * kv_width;

    // One thread per rotated pair, query heads first, then key heads.
    for (int pair = threadIdx.x; pair < (num_heads + num_kv_heads) * half; pair += blockDim.x) {
        const int head = pair / half;
        const int j = pair % half;
        // Llama's GGUF keeps pairs adjacent (2j, 2j+1); NeoX-style checkpoints pair j with
        // j + head_dim / 2.
        const int a = head * head_dim + (interleaved ? 2 * j : j);
        const int b = head * head_dim + (interleaved ? 2 * j + 1 : j + half);
        const float x0 = to_float(row[a]);
        const float x1 = to_float(row[b]);
        const T r0 = from_float<T>(x0 * c[j] - x1 * s[j]);
        const T r1 = from_float<T>(x0 * s[j] + x1 * c[j]);
        if (head < num_heads) {
            q_out[a] = r0;
            q_out[b] = r1;
        } else {
            const int offset = -num_heads * head_dim;
            k_out[a + offset] = r0;
            k_out[b + offset] = r1;
        }
    }
    const T* v_in = row + (num_heads + num_kv_heads) * head_dim;
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) v_out[i] = v_in[i];
}

#define INSTANTIATE(NAME, T)                                                                  \
    extern "C" __global__ void rope_and_cache_##NAME(                                        \
        const T* qkv, T* query, T* key_cache, T* value_cache, const uint32_t* positions,     \
        const uint32_t* slots, const float* cos, const float* sin, int row_stride,           \
        int num_heads, int num_kv_heads, int head_dim, int interleaved) {                    \
        rope_and_cache<T>(qkv, query, key_cache, value_cache, positions, slots, cos, sin,    \
                          row_stride, num_heads, num_kv_heads, head_dim, interleaved);       \
    }
FOR_EACH_DTYPE(INSTANTIATE)
#undef INSTANTIATE

// out = silu(gate) * up, row by row; gate and up may be the two halves of one fused row.
template <typename T>
__device__ void silu_and_mul(T* __restrict__ out, const T* __restrict__ gate,
                             const T* __restrict__ up, int width, int in_stride) {
    const size_t row = blockIdx.x;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float g = to_float(gate[row * in_stride + i]);
        const float u = to_float(up[row * in_stride + i]);
        out[row * width + i] = from_float<T>(g / (1.0f + __expf(-g)) * u);
    }
}

#define INSTANTIATE(NAME, T)                                                                  \
    extern "C" __global__ void silu_and_mul_##NAME(T* out, const T* gate, const T* up,       \
                                                   int width, int in_stride) {               \
        silu_and_mul<T>(out, gate, up, width, in_stride);                                    \
    }
FOR_EACH_DTYPE(INSTANTIATE)
#undef INSTANTIATE
