// Fused RMSNorm, interleaved (YaRN) rope and the latent-cache write.
// References: src/reference/elementwise.rs.
#include "common.cuh"

using namespace moeserve;

// out[r] = T(T(x[r] / sqrt(mean(x[r]^2) + eps)) * w): f32 statistics, the weight multiply on
// the compute-dtype value (the model's HF order). One block per row.
template <typename T>
__device__ void rms_norm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, int dim, float eps) {
    __shared__ float partial[32];
    const T* xr = x + (size_t)blockIdx.x * dim;
    T* yr = out + (size_t)blockIdx.x * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_f32(xr[i]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) / 32;
        float v = lane < nw ? partial[lane] : 0.f;
        v = warp_sum(v);
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    float denom = sqrtf(partial[0] / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float n = to_f32(from_f32<T>(to_f32(xr[i]) / denom));
        yr[i] = from_f32<T>(n * to_f32(w[i]));
    }
}

// x: element (t, h, i) at x[t * st + h * sh + i] (a strided view, e.g. the rope part of q);
// out: contiguous [n, heads, rope_dim]; cos/sin: [n, rope_dim / 2] f32 (attention scaling
// included). Pairs (2i, 2i+1) rotate by angle i, in f32.
template <typename T>
__device__ void rope_interleaved(const T* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                 T* __restrict__ out, int n, int heads, int rope_dim, long long st, long long sh) {
    int half = rope_dim / 2;
    long long total = (long long)n * heads * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total; idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        long long th = idx / half;
        int h = (int)(th % heads);
        int t = (int)(th / heads);
        const T* src = x + t * st + h * sh + 2 * i;
        float x0 = to_f32(src[0]), x1 = to_f32(src[1]);
        float c = cos_t[(size_t)t * half + i], s = sin_t[(size_t)t * half + i];
        T* dst = out + ((size_t)t * heads + h) * rope_dim + 2 * i;
        dst[0] = from_f32<T>(x0 * c - x1 * s);
        dst[1] = from_f32<T>(x0 * s + x1 * c);
    }
}

// dst[slots[r], :] = src[r, :] for r < n (latent rows into their pool rows). One block per row.
template <typename T>
__device__ void cache_write(const T* __restrict__ src, const int* __restrict__ slots, T* __restrict__ dst, int row_dim) {
    const T* s = src + (size_t)blockIdx.x * row_dim;
    T* d = dst + (size_t)slots[blockIdx.x] * row_dim;
    for (int i = threadIdx.x; i < row_dim; i += blockDim.x) d[i] = s[i];
}

#define NORM_ROPE(T, NAME)                                                                                                 \
    extern "C" __global__ void rms_norm_##NAME(const T* x, const T* w, T* out, int dim, float eps) {                      \
        rms_norm<T>(x, w, out, dim, eps);                                                                                  \
    }                                                                                                                      \
    extern "C" __global__ void rope_interleaved_##NAME(const T* x, const float* c, const float* s, T* out, int n, int heads, \
                                                       int rope_dim, long long st, long long sh) {                         \
        rope_interleaved<T>(x, c, s, out, n, heads, rope_dim, st, sh);                                                     \
    }                                                                                                                      \
    extern "C" __global__ void cache_write_##NAME(const T* src, const int* slots, T* dst, int row_dim) {                  \
        cache_write<T>(src, slots, dst, row_dim);                                                                          \
    }

NORM_ROPE(float, f32)
NORM_ROPE(__nv_bfloat16, bf16)
