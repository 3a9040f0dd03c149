// Causal softmax over the last dimension of scores [..., T, T], viewed as [rows, T] with query
// i = row % T: key j > i is masked (probability exactly 0), the others get
//     p_j = exp(s_j - max_{k<=i} s_k) / sum_{k<=i} exp(s_k - max)
// and the backward, with dp the gradient of the probabilities:
//     ds_j = p_j * (dp_j - sum_{k<=i} dp_k p_k)   for j <= i,    0 above the diagonal
//
// Bytes moved per element: forward writes all T probabilities of a row but reads only the i + 1
// unmasked scores: 8 B fp32 / 4 B bf16 at most, about 6 B / 3 B averaged over a causal [T, T]
// (half the reads skipped). Backward reads dp and p below the diagonal and writes ds everywhere:
// 12 B / 6 B at most, about 8 B / 4 B averaged. The passes after the first re-read the row from
// cache.
//
// One block per row (grid-stride over the rows): max and sum reduced in registers, then across
// each warp with shuffles, then across warps through shared memory; fp32 arithmetic whatever the
// input type. The launcher must use a block size that is a multiple of 32.
//
// Roofline figures (read by ds_lab/lab/kernels.py): kernel, bytes moved per element, flops per element
// (flops: a count of the arithmetic, transcendental functions as one):
// roofline: causal_softmax_fwd_f32 6 5
// roofline: causal_softmax_fwd_bf16 3 5
// roofline: causal_softmax_bwd_f32 8 4
// roofline: causal_softmax_bwd_bf16 4 4
#include <cuda_bf16.h>
#include <cmath>
#include <cstdio>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

struct Sum {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class Op>
__device__ __forceinline__ float warp_reduce(float value, Op op) {
    for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

// op over the block, returned to every thread (`identity`: op(identity, v) == v). `scratch` holds
// one float per warp; the leading barrier keeps a previous call's readers ahead of these writers.
template <class Op>
__device__ __forceinline__ float block_reduce(float value, float identity, Op op, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    value = warp_reduce(value, op);
    __syncthreads();
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    return warp_reduce(lane < warps ? scratch[lane] : identity, op);
}

template <typename T>
__device__ void causal_softmax_forward(T* __restrict__ probs, const T* __restrict__ scores, int rows, int length) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const int visible = row % length + 1;  // keys 0..i
        const T* s = scores + (size_t)row * length;
        T* p = probs + (size_t)row * length;
        float largest = -INFINITY;
        for (int j = threadIdx.x; j < visible; j += blockDim.x) largest = fmaxf(largest, to_float(s[j]));
        largest = block_reduce(largest, -INFINITY, Max(), scratch);
        float total = 0.0f;
        for (int j = threadIdx.x; j < visible; j += blockDim.x) total += expf(to_float(s[j]) - largest);
        const float inverse = 1.0f / block_reduce(total, 0.0f, Sum(), scratch);
        for (int j = threadIdx.x; j < length; j += blockDim.x)
            p[j] = from_float<T>(j < visible ? expf(to_float(s[j]) - largest) * inverse : 0.0f);
    }
}

template <typename T>
__device__ void causal_softmax_backward(T* __restrict__ dscores, const T* __restrict__ dprobs,
                                        const T* __restrict__ probs, int rows, int length) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const int visible = row % length + 1;
        const T* dp = dprobs + (size_t)row * length;
        const T* p = probs + (size_t)row * length;
        T* ds = dscores + (size_t)row * length;
        float dot = 0.0f;
        for (int j = threadIdx.x; j < visible; j += blockDim.x) dot += to_float(dp[j]) * to_float(p[j]);
        dot = block_reduce(dot, 0.0f, Sum(), scratch);
        for (int j = threadIdx.x; j < length; j += blockDim.x)
            ds[j] = from_float<T>(j < visible ? to_float(p[j]) * (to_float(dp[j]) - dot) : 0.0f);
    }
}

extern "C" __global__ void causal_softmax_fwd_f32(float* probs, const float* scores, int rows, int length) {
    causal_softmax_forward<float>(probs, scores, rows, length);
}
extern "C" __global__ void causal_softmax_fwd_bf16(__nv_bfloat16* probs, const __nv_bfloat16* scores, int rows,
                                                   int length) {
    causal_softmax_forward<__nv_bfloat16>(probs, scores, rows, length);
}
extern "C" __global__ void causal_softmax_bwd_f32(float* dscores, const float* dprobs, const float* probs, int rows,
                                                  int length) {
    causal_softmax_backward<float>(dscores, dprobs, probs, rows, length);
}
extern "C" __global__ void causal_softmax_bwd_bf16(__nv_bfloat16* dscores, const __nv_bfloat16* dprobs,
                                                   const __nv_bfloat16* probs, int rows, int length) {
    causal_softmax_backward<__nv_bfloat16>(dscores, dprobs, probs, rows, length);
}
