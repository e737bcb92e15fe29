// Fused MoE router selection from f32 logits: scores (sigmoid / softmax), the selection method
// (greedy, group_limited_greedy, noaux_tc with e_score_correction_bias), top-k, weights from the
// unbiased scores, normalisation and routed_scaling_factor. One block per token.
// Reference: src/reference/router.rs (the model's `Router::select`, index-for-index).
#include "common.cuh"

#define ROUTE_MAX_E 512
#define ROUTE_MAX_G 64
#define ROUTE_MAX_K 32
#define NEG_INF (-__int_as_float(0x7f800000))

// Index of the largest value not yet taken (ties: the lower index), as the CPU's stable sort.
__device__ int arg_best(const float* v, const bool* taken, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

// scoring: 0 sigmoid, 1 softmax; method: 0 greedy, 1 group_limited_greedy, 2 noaux_tc.
extern "C" __global__ void moe_route(const float* __restrict__ logits, const float* __restrict__ bias, int* __restrict__ experts,
                                     float* __restrict__ weights, int n_experts, int n_group, int topk_group, int top_k,
                                     int scoring, int method, int norm_topk_prob, float scaling) {
    __shared__ float score[ROUTE_MAX_E], choice[ROUTE_MAX_E];
    __shared__ bool taken[ROUTE_MAX_E];
    __shared__ float gscore[ROUTE_MAX_G];
    __shared__ bool gtaken[ROUTE_MAX_G], gkeep[ROUTE_MAX_G];
    __shared__ float red[2];
    const float* l = logits + (size_t)blockIdx.x * n_experts;
    const int tid = threadIdx.x;
    const int per_group = n_experts / n_group;

    if (scoring == 0) {
        for (int e = tid; e < n_experts; e += blockDim.x) score[e] = 1.f / (1.f + expf(-l[e]));
    } else {
        if (tid == 0) {
            float m = NEG_INF;
            for (int e = 0; e < n_experts; e++) m = fmaxf(m, l[e]);
            red[0] = m;
        }
        __syncthreads();
        for (int e = tid; e < n_experts; e += blockDim.x) score[e] = expf(l[e] - red[0]);
        __syncthreads();
        if (tid == 0) {
            float s = 0.f;
            for (int e = 0; e < n_experts; e++) s += score[e];
            red[1] = s;
        }
        __syncthreads();
        for (int e = tid; e < n_experts; e += blockDim.x) score[e] = score[e] / red[1];
    }
    __syncthreads();
    for (int e = tid; e < n_experts; e += blockDim.x) {
        choice[e] = (method == 2 && bias) ? score[e] + bias[e] : score[e];
        taken[e] = false;
    }
    __syncthreads();
    if (method != 0) {
        // group score: best expert (group_limited_greedy) or the sum of the best two (noaux_tc)
        for (int g = tid; g < n_group; g += blockDim.x) {
            const float* v = choice + g * per_group;
            int b1 = 0;
            for (int i = 1; i < per_group; i++)
                if (v[i] > v[b1]) b1 = i;
            float gs = v[b1];
            if (method == 2 && per_group > 1) {
                int b2 = -1;
                for (int i = 0; i < per_group; i++)
                    if (i != b1 && (b2 < 0 || v[i] > v[b2])) b2 = i;
                gs = v[b1] + v[b2];
            }
            gscore[g] = gs;
            gtaken[g] = false;
            gkeep[g] = false;
        }
        __syncthreads();
        if (tid == 0) {
            for (int k = 0; k < topk_group && k < n_group; k++) {
                int g = arg_best(gscore, gtaken, n_group);
                gtaken[g] = true;
                gkeep[g] = true;
            }
        }
        __syncthreads();
        const float fill = method == 2 ? NEG_INF : 0.f;
        for (int e = tid; e < n_experts; e += blockDim.x)
            if (!gkeep[e / per_group]) choice[e] = fill;
        __syncthreads();
    }
    if (tid == 0) {
        int sel[ROUTE_MAX_K];
        float w[ROUTE_MAX_K];
        for (int k = 0; k < top_k; k++) {
            int e = arg_best(choice, taken, n_experts);
            taken[e] = true;
            sel[k] = e;
            w[k] = score[e];
        }
        if (norm_topk_prob && top_k > 1) {
            float sum = 0.f;
            for (int k = 0; k < top_k; k++) sum += w[k];
            sum += 1e-20f;
            for (int k = 0; k < top_k; k++) w[k] /= sum;
        }
        for (int k = 0; k < top_k; k++) {
            experts[(size_t)blockIdx.x * top_k + k] = sel[k];
            weights[(size_t)blockIdx.x * top_k + k] = w[k] * scaling;
        }
    }
}
