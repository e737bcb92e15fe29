// Shared helpers for the moeserve kernels: element loads/stores in f32, FP8 E4M3 decoding.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace moeserve {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// E4M3FN byte -> f32, exact (0x7f / 0xff are NaN in the format; checkpoints never hold them).
__device__ __forceinline__ float e4m3_to_f32(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80) << 24;
    uint32_t exp = (b >> 3) & 0x0f;
    uint32_t man = b & 0x07;
    float v;
    if (exp == 0) {
        v = (float)man * 0.001953125f;  // man * 2^-9
        return sign ? -v : v;
    }
    uint32_t bits = sign | ((exp + 120u) << 23) | (man << 20);
    return __uint_as_float(bits);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

}  // namespace moeserve
