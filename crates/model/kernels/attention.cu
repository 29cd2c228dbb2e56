// Paged attention over block tables: one kernel for decode tokens and prefill chunks alike.
//
// Each new token attends to the keys at positions 0..=its own position. Its own K/V (and those
// of the earlier tokens of its chunk) are already in the pool, written by rope_and_cache, so
// causality inside a prefill chunk needs no mask: a token simply stops at its position.
//
// One thread block per (token, KV head) serves all the query heads that share that KV head
// (grouped-query attention), so each key and value is read from memory once for the group.
// Keys are taken in tiles of THREADS: one thread scores one key against every query head of
// the group, the tile's softmax is folded into running maxima and sums (online softmax, as in
// FlashAttention), and then every thread accumulates its share of the weighted values.

#include "common.cuh"

constexpr int THREADS = 128;
constexpr int MAX_GROUP = 8;  // query heads per KV head

// The 16-byte vector that carries 16 / sizeof(T) elements.
template <typename T> struct Vec16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

template <typename T, int HEAD_DIM>
__device__ void paged_attention(
    T* __restrict__ out,                  // [tokens, num_heads, HEAD_DIM]
    const T* __restrict__ query,          // [tokens, num_heads, HEAD_DIM], rotated
    const T* __restrict__ key_cache,      // [slots, num_kv_heads, HEAD_DIM]
    const T* __restrict__ value_cache,    // [slots, num_kv_heads, HEAD_DIM]
    const uint32_t* __restrict__ block_tables,    // [sequences, max_blocks]
    const uint32_t* __restrict__ token_sequence,  // [tokens]: index of the token's sequence
    const uint32_t* __restrict__ positions,       // [tokens]
    int num_heads, int num_kv_heads, int block_size, int max_blocks, float scale) {
    constexpr int PER_THREAD = MAX_GROUP * HEAD_DIM / THREADS;
    constexpr int CHUNK = Vec16<T>::N;
    const int token = blockIdx.x;
    const int kv_head = blockIdx.y;
    const int tid = threadIdx.x;
    const int group = num_heads / num_kv_heads;
    const int context = positions[token] + 1;
    const int kv_width = num_kv_heads * HEAD_DIM;
    const uint32_t* table = block_tables + (size_t)token_sequence[token] * max_blocks;

    __shared__ float q[MAX_GROUP][HEAD_DIM];
    __shared__ float weights[MAX_GROUP][THREADS];
    __shared__ uint32_t tile_slots[THREADS];
    __shared__ float running_max[MAX_GROUP], running_sum[MAX_GROUP], rescale[MAX_GROUP];

    const T* q_in = query + ((size_t)token * num_heads + kv_head * group) * HEAD_DIM;
    for (int i = tid; i < group * HEAD_DIM; i += THREADS)
        q[i / HEAD_DIM][i % HEAD_DIM] = to_float(q_in[i]) * scale;
    if (tid < group) {
        running_max[tid] = -INFINITY;
        running_sum[tid] = 0.0f;
    }
    // Output element r of this thread: o = tid + r * THREADS, head o / HEAD_DIM, dim o % HEAD_DIM.
    // THREADS is a multiple of HEAD_DIM, so the dim is the same for every r.
    float acc[PER_THREAD];
#pragma unroll
    for (int r = 0; r < PER_THREAD; ++r) acc[r] = 0.0f;
    const int dim = tid % HEAD_DIM;
    __syncthreads();

    for (int tile = 0; tile < context; tile += THREADS) {
        const int key = tile + tid;
        if (key < context) {
            const uint32_t slot = table[key / block_size] * block_size + key % block_size;
            tile_slots[tid] = slot;
            const T* k = key_cache + (size_t)slot * kv_width + kv_head * HEAD_DIM;
            float dot[MAX_GROUP];
#pragma unroll
            for (int g = 0; g < MAX_GROUP; ++g) dot[g] = 0.0f;
#pragma unroll
            for (int c = 0; c < HEAD_DIM; c += CHUNK) {
                const Vec16<T> chunk = *reinterpret_cast<const Vec16<T>*>(k + c);
#pragma unroll
                for (int e = 0; e < CHUNK; ++e) {
                    const float kv = to_float(chunk.v[e]);
#pragma unroll
                    for (int g = 0; g < MAX_GROUP; ++g)
                        if (g < group) dot[g] += q[g][c + e] * kv;
                }
            }
#pragma unroll
            for (int g = 0; g < MAX_GROUP; ++g)
                if (g < group) weights[g][tid] = dot[g];
        } else {
            for (int g = 0; g < group; ++g) weights[g][tid] = -INFINITY;
        }
        __syncthreads();

        // Online softmax: a warp per query head turns the tile's scores into weights relative
        // to the new running maximum and rescales what came before.
        const int warp = tid / 32, lane = tid % 32;
        for (int g = warp; g < group; g += THREADS / 32) {
            float tile_max = -INFINITY;
            for (int i = lane; i < THREADS; i += 32) tile_max = fmaxf(tile_max, weights[g][i]);
            for (int step = 16; step > 0; step /= 2)
                tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, step));
            // The tile's first key is always inside the context, so the maximum is finite.
            const float new_max = fmaxf(running_max[g], tile_max);
            float sum = 0.0f;
            for (int i = lane; i < THREADS; i += 32) {
                const float w = __expf(weights[g][i] - new_max);
                weights[g][i] = w;
                sum += w;
            }
            for (int step = 16; step > 0; step /= 2)
                sum += __shfl_xor_sync(0xffffffff, sum, step);
            if (lane == 0) {
                const float factor = __expf(running_max[g] - new_max);
                rescale[g] = factor;
                running_sum[g] = running_sum[g] * factor + sum;
                running_max[g] = new_max;
            }
        }
        __syncthreads();

#pragma unroll
        for (int r = 0; r < PER_THREAD; ++r) {
            const int g = (tid + r * THREADS) / HEAD_DIM;
            if (g < group) acc[r] *= rescale[g];
        }
        const int keys = min(THREADS, context - tile);
#pragma unroll 4
        for (int j = 0; j < keys; ++j) {
            const float v = to_float(
                value_cache[(size_t)tile_slots[j] * kv_width + kv_head * HEAD_DIM + dim]);
#pragma unroll
            for (int r = 0; r < PER_THREAD; ++r) {
                const int g = (tid + r * THREADS) / HEAD_DIM;
                if (g < group) acc[r] += weights[g][j] * v;
            }
        }
        __syncthreads();
    }

    T* o = out + ((size_t)token * num_heads + kv_head * group) * HEAD_DIM;
#pragma unroll
    for (int r = 0; r < PER_THREAD; ++r) {
        const int g = (tid + r * THREADS) / HEAD_DIM;
        if (g < group) o[g * HEAD_DIM + dim] = from_float<T>(acc[r] / running_sum[g]);
    }
}

#define INSTANTIATE_DIM(NAME, T, DIM)                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                    \
        paged_attention_##NAME##_##DIM(T* out, const T* query, const T* key_cache,           \
                                       const T* value_cache, const uint32_t* block_tables,   \
                                       const uint32_t* token_sequence,                       \
                                       const uint32_t* positions, int num_heads,             \
                                       int num_kv_heads, int block_size, int max_blocks,     \
                                       float scale) {                                        \
        paged_attention<T, DIM>(out, query, key_cache, value_cache, block_tables,            \
                                token_sequence, positions, num_heads, num_kv_heads,          \
                                block_size, max_blocks, scale);                              \
    }
#define INSTANTIATE(NAME, T)        \
    INSTANTIATE_DIM(NAME, T, 64)    \
    INSTANTIATE_DIM(NAME, T, 128)
FOR_EACH_DTYPE(INSTANTIATE)
#undef INSTANTIATE
#undef INSTANTIATE_DIM
