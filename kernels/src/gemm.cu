// y = x . W^T with W [N, K] in f32, bf16 or FP8 E4M3 with f32 block scales (DeepSeek's
// `weight_scale_inv`, one per sbn x sbk block), dequantized into the shared-memory tile;
// activations and output in f32 or bf16, accumulation in f32.
// `gemm_*`: one matrix. `grouped_gemm_*`: one group per active expert (grid.z), rows
// offsets[g]..offsets[g+1] of the expert-sorted list, x rows gathered through row_idx, weights
// (and scales) through per-group device pointers.
// Reference: src/reference/gemm.rs.
#include "common.cuh"

using namespace moeserve;

#define GEMM_BK 32

template <typename TW> struct Weight;
template <> struct Weight<float> {
    __device__ static float load(const void* w, const float*, size_t idx, int, int, int, int) { return ((const float*)w)[idx]; }
};
template <> struct Weight<__nv_bfloat16> {
    __device__ static float load(const void* w, const float*, size_t idx, int, int, int, int) {
        return __bfloat162float(((const __nv_bfloat16*)w)[idx]);
    }
};
struct Fp8 {};
template <> struct Weight<Fp8> {
    __device__ static float load(const void* w, const float* scale, size_t idx, int n, int k, int sbn, int sbk_cols) {
        // sbk_cols packs (sbk << 16) | scale columns
        int sbk = sbk_cols >> 16, cols = sbk_cols & 0xffff;
        return e4m3_to_f32(((const uint8_t*)w)[idx]) * scale[(size_t)(n / sbn) * cols + k / sbk];
    }
};

// One BM x BN output tile: rows [row0, row0 + BM) of a group of `rows` rows starting at list
// position `pos0`; 256 threads as 16 x 16, each owning (BM/16) x (BN/16) outputs.
template <typename TX, typename TW, int BM, int BN>
__device__ void gemm_tile(const TX* __restrict__ x, const int* __restrict__ row_idx, int pos0, int rows, const void* __restrict__ w,
                          const float* __restrict__ scale, TX* __restrict__ y, int N, int K, int sbn, int sbk, int row0, int col0) {
    constexpr int TM = BM / 16, TN = BN / 16;
    __shared__ float xs[GEMM_BK][BM + 1];
    __shared__ float ws[GEMM_BK][BN + 1];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int sbk_cols = sbk > 0 ? (sbk << 16) | ((K + sbk - 1) / sbk) : 0;
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) acc[i][j] = 0.f;

    for (int k0 = 0; k0 < K; k0 += GEMM_BK) {
        for (int idx = threadIdx.x; idx < BM * GEMM_BK; idx += 256) {
            int m = idx / GEMM_BK, k = idx % GEMM_BK;
            int r = row0 + m, kk = k0 + k;
            float v = 0.f;
            if (r < rows && kk < K) {
                int pos = pos0 + r;
                size_t xr = row_idx ? (size_t)row_idx[pos] : (size_t)pos;
                v = to_f32(x[xr * K + kk]);
            }
            xs[k][m] = v;
        }
        for (int idx = threadIdx.x; idx < BN * GEMM_BK; idx += 256) {
            int n = idx / GEMM_BK, k = idx % GEMM_BK;
            int c = col0 + n, kk = k0 + k;
            ws[k][n] = (c < N && kk < K) ? Weight<TW>::load(w, scale, (size_t)c * K + kk, c, kk, sbn, sbk_cols) : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < GEMM_BK; k++) {
            float a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; i++) a[i] = xs[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < TN; j++) b[j] = ws[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int j = 0; j < TN; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TM; i++) {
        int r = row0 + ty + 16 * i;
        if (r >= rows) continue;
#pragma unroll
        for (int j = 0; j < TN; j++) {
            int c = col0 + tx + 16 * j;
            if (c < N) y[(size_t)(pos0 + r) * N + c] = from_f32<TX>(acc[i][j]);
        }
    }
}

// grid (ceil(N / BN), ceil(M / BM)); sbn/sbk only for FP8 (0 otherwise).
#define GEMM(TX, XN, TW, WN, BM, BN, TILE)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                                                     \
        gemm_##WN##_##XN##_##TILE(const TX* x, const void* w, const float* scale, TX* y, int M, int N, int K, int sbn,  \
                                  int sbk) {                                                                              \
        gemm_tile<TX, TW, BM, BN>(x, nullptr, 0, M, w, scale, y, N, K, sbn, sbk, blockIdx.y * BM, blockIdx.x * BN);      \
    }                                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) grouped_gemm_##WN##_##XN##_##TILE(                                  \
        const TX* x, const int* row_idx, const int* offsets, const unsigned long long* w_ptrs,                            \
        const unsigned long long* s_ptrs, TX* y, int N, int K, int sbn, int sbk) {                                        \
        const int g = blockIdx.z;                                                                                         \
        const int pos0 = offsets[g], rows = offsets[g + 1] - pos0;                                                        \
        if ((int)blockIdx.y * BM >= rows) return;                                                                         \
        const float* scale = s_ptrs ? (const float*)s_ptrs[g] : nullptr;                                                  \
        gemm_tile<TX, TW, BM, BN>(x, row_idx, pos0, rows, (const void*)w_ptrs[g], scale, y, N, K, sbn, sbk,              \
                                  blockIdx.y * BM, blockIdx.x * BN);                                                      \
    }

#define GEMM_TILES(TX, XN, TW, WN)          \
    GEMM(TX, XN, TW, WN, 16, 128, small)    \
    GEMM(TX, XN, TW, WN, 64, 64, large)

GEMM_TILES(float, f32, float, f32)
GEMM_TILES(float, f32, __nv_bfloat16, bf16)
GEMM_TILES(float, f32, Fp8, fp8)
GEMM_TILES(__nv_bfloat16, bf16, float, f32)
GEMM_TILES(__nv_bfloat16, bf16, __nv_bfloat16, bf16)
GEMM_TILES(__nv_bfloat16, bf16, Fp8, fp8)
