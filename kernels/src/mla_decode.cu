// MLA decode attention, weight-absorbed form, over the paged latent cache.
// Reference: src/reference/mla.rs (`mla_decode`).
//
// Every query row q[i] = [q_lat (L) | q_pe (R)] per head attends to the cache rows of its sequence:
// score_t = scale * q . row_t (row_t = [c_kv (L) | k_pe (R)], so one D = L + R dot product), softmax
// over t < kv_len[i], out = sum_t p_t * c_kv_t (L wide). The rows of token t live in pool row
// block_table[i][t / page_size] * page_size + t % page_size.
//
// Split-K (FlashDecoding / FlashMLA): grid (head groups of HPB, splits, queries); each block walks
// its token range in tiles of TT rows staged in shared memory, keeps an online softmax per head, and
// writes a normalized partial output plus its log-sum-exp; `mla_combine_*` merges the splits.
#include "common.cuh"

using namespace moeserve;

#define MLA_HPB 16       // heads per block
#define MLA_MAX_D 576    // L + R (R1: 512 + 64)
#define MLA_MAX_L 512    // two output dims per thread
#define MLA_THREADS 256
#define NEG_INF (-__int_as_float(0x7f800000))

template <typename T, int TT>
__device__ void mla_decode_split(const T* __restrict__ q, const T* __restrict__ pool, const int* __restrict__ block_table,
                                 const int* __restrict__ kv_lens, float* __restrict__ o_part, float* __restrict__ lse_part,
                                 int heads, int latent, int rope, int page_size, int max_pages, int tokens_per_split,
                                 float scale) {
    __shared__ float qs[MLA_HPB][MLA_MAX_D];
    __shared__ T ks[TT][MLA_MAX_D];
    __shared__ float sc[MLA_HPB][TT];
    __shared__ float m_s[MLA_HPB], l_s[MLA_HPB], corr_s[MLA_HPB];

    const int D = latent + rope;
    const int h0 = blockIdx.x * MLA_HPB;
    const int split = blockIdx.y, splits = gridDim.y;
    const int qi = blockIdx.z;
    const int hcount = min(MLA_HPB, heads - h0);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nwarps = blockDim.x / 32;
    const int kv_len = kv_lens[qi];
    const int begin = split * tokens_per_split;
    const int end = min(kv_len, begin + tokens_per_split);
    const int* table = block_table + (size_t)qi * max_pages;

    for (int idx = tid; idx < MLA_HPB * D; idx += blockDim.x) {
        int h = idx / D, d = idx % D;
        qs[h][d] = h < hcount ? to_f32(q[((size_t)qi * heads + h0 + h) * D + d]) : 0.f;
    }
    if (tid < MLA_HPB) {
        m_s[tid] = NEG_INF;
        l_s[tid] = 0.f;
    }
    float acc[MLA_HPB][2];
#pragma unroll
    for (int h = 0; h < MLA_HPB; h++) acc[h][0] = acc[h][1] = 0.f;
    __syncthreads();

    for (int t0 = begin; t0 < end; t0 += TT) {
        const int nt = min(TT, end - t0);
        for (int idx = tid; idx < nt * D; idx += blockDim.x) {
            int j = idx / D, d = idx % D;
            int pos = t0 + j;
            size_t row = (size_t)table[pos / page_size] * page_size + pos % page_size;
            ks[j][d] = pool[row * D + d];
        }
        __syncthreads();
        for (int p = warp; p < MLA_HPB * TT; p += nwarps) {
            int h = p / TT, j = p % TT;
            float s = NEG_INF;
            if (h < hcount && j < nt) {
                float dot = 0.f;
                for (int d = lane; d < D; d += 32) dot += qs[h][d] * to_f32(ks[j][d]);
                s = warp_sum(dot) * scale;
            }
            if (lane == 0) sc[h][j] = s;
        }
        __syncthreads();
        if (tid < MLA_HPB) {
            const int h = tid;
            float m_old = m_s[h], mx = m_old;
            for (int j = 0; j < TT; j++) mx = fmaxf(mx, sc[h][j]);
            float corr = (m_old == NEG_INF) ? 0.f : expf(m_old - mx);
            float sum = 0.f;
            for (int j = 0; j < TT; j++) {
                float e = (sc[h][j] == NEG_INF) ? 0.f : expf(sc[h][j] - mx);
                sc[h][j] = e;
                sum += e;
            }
            l_s[h] = l_s[h] * corr + sum;
            m_s[h] = mx;
            corr_s[h] = corr;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int d = tid + k * MLA_THREADS;
            if (d < latent) {
#pragma unroll
                for (int h = 0; h < MLA_HPB; h++) {
                    float a = acc[h][k] * corr_s[h];
                    for (int j = 0; j < nt; j++) a += sc[h][j] * to_f32(ks[j][d]);
                    acc[h][k] = a;
                }
            }
        }
        __syncthreads();
    }

    const size_t base = ((size_t)qi * splits + split) * heads + h0;
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const int d = tid + k * MLA_THREADS;
        if (d < latent) {
#pragma unroll
            for (int h = 0; h < MLA_HPB; h++) {
                if (h < hcount) {
                    float l = l_s[h];
                    o_part[(base + h) * latent + d] = l > 0.f ? acc[h][k] / l : 0.f;
                }
            }
        }
    }
    if (tid < hcount) lse_part[base + tid] = l_s[tid] > 0.f ? m_s[tid] + logf(l_s[tid]) : NEG_INF;
}

// out[i, h, :] = sum_s w_s * o_part[i, s, h, :] with w_s = exp(lse_s - max) / sum; grid (heads, queries).
template <typename T>
__device__ void mla_combine(const float* __restrict__ o_part, const float* __restrict__ lse_part, T* __restrict__ out,
                            int heads, int latent, int splits) {
    const int h = blockIdx.x, qi = blockIdx.y;
    float mx = NEG_INF;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, lse_part[((size_t)qi * splits + s) * heads + h]);
    float denom = 0.f;
    for (int s = 0; s < splits; s++) {
        float l = lse_part[((size_t)qi * splits + s) * heads + h];
        denom += (l == NEG_INF) ? 0.f : expf(l - mx);
    }
    for (int d = threadIdx.x; d < latent; d += blockDim.x) {
        float v = 0.f;
        if (mx != NEG_INF) {
            for (int s = 0; s < splits; s++) {
                float l = lse_part[((size_t)qi * splits + s) * heads + h];
                if (l != NEG_INF) v += expf(l - mx) * o_part[(((size_t)qi * splits + s) * heads + h) * latent + d];
            }
            v /= denom;
        }
        out[((size_t)qi * heads + h) * latent + d] = from_f32<T>(v);
    }
}

#define MLA(T, NAME, TT)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MLA_THREADS)                                                            \
        mla_decode_##NAME(const T* q, const T* pool, const int* block_table, const int* kv_lens, float* o_part,          \
                          float* lse_part, int heads, int latent, int rope, int page_size, int max_pages,                 \
                          int tokens_per_split, float scale) {                                                            \
        mla_decode_split<T, TT>(q, pool, block_table, kv_lens, o_part, lse_part, heads, latent, rope, page_size,        \
                                max_pages, tokens_per_split, scale);                                                      \
    }                                                                                                                     \
    extern "C" __global__ void mla_combine_##NAME(const float* o_part, const float* lse_part, T* out, int heads,         \
                                                  int latent, int splits) {                                               \
        mla_combine<T>(o_part, lse_part, out, heads, latent, splits);                                                     \
    }

MLA(float, f32, 4)
MLA(__nv_bfloat16, bf16, 8)
