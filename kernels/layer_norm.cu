// LayerNorm over the last dimension of x viewed as [rows, cols]:
//     y = (x - mean) * rstd * weight + bias,    rstd = 1 / sqrt(var + eps)   (biased variance)
// and its backward, with xhat = (x - mean) * rstd and g = dy * weight:
//     dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))      (means over the row)
//     dweight = sum over rows of dy * xhat,    dbias = sum over rows of dy
//
// Bytes moved per element (the roofline this is held to; weight, bias, mean, rstd are amortised
// over the rows): forward reads x, writes y: 8 B fp32, 4 B bf16. Backward reads dy and x, writes
// dx: 12 B fp32, 6 B bf16 (plus the [blocks, cols] fp32 partials of dweight/dbias, which stay in L2).
// The second and third passes over a row re-read it from cache, not from DRAM.
//
// One block per row (grid-stride over the rows); a row is reduced in registers, then across each
// warp with shuffles, then across the warps through shared memory. Statistics and accumulation are
// fp32 whatever the input type. dweight/dbias are deterministic: each block accumulates its rows
// into its own row of a partials buffer (every thread owns the same columns of it from row to
// row, so no atomics and no races), and layer_norm_bwd_params_* sums those partials column by
// column, in block order. The launcher must use a block size that is a multiple of 32.
//
// Roofline figures (read by ds_lab/lab/kernels.py): kernel, bytes moved per element, flops per element
// (flops: a count of the arithmetic, transcendental functions as one):
// roofline: layer_norm_fwd_f32 8 7
// roofline: layer_norm_fwd_bf16 4 7
// roofline: layer_norm_bwd_f32 12 12
// roofline: layer_norm_bwd_bf16 6 12
#include <cuda_bf16.h>
#include <cstdio>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float value) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

// The sum of `value` over the block, returned to every thread. `scratch` holds one float per warp;
// the leading barrier keeps a previous call's readers ahead of this call's writers.
__device__ __forceinline__ float block_sum(float value, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    value = warp_sum(value);
    __syncthreads();
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    return warp_sum(lane < warps ? scratch[lane] : 0.0f);  // every warp reduces the partials itself
}

template <typename T>
__device__ void layer_norm_forward(T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                   const T* __restrict__ x, const T* __restrict__ weight,
                                   const T* __restrict__ bias, int rows, int cols, float eps) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (size_t)row * cols;
        T* yr = y + (size_t)row * cols;
        float sum = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += to_float(xr[c]);
        const float mean = block_sum(sum, scratch) / cols;
        float squares = 0.0f;  // two passes: sum((x - mean)^2) does not cancel as E[x^2] - mean^2 does
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float d = to_float(xr[c]) - mean;
            squares += d * d;
        }
        const float rstd = rsqrtf(block_sum(squares, scratch) / cols + eps);
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            yr[c] = from_float<T>((to_float(xr[c]) - mean) * rstd * to_float(weight[c]) + to_float(bias[c]));
        if (threadIdx.x == 0) {
            mean_out[row] = mean;
            rstd_out[row] = rstd;
        }
    }
}

template <typename T>
__device__ void layer_norm_backward(T* __restrict__ dx, float* __restrict__ dweight_partial,
                                    float* __restrict__ dbias_partial, const T* __restrict__ dy,
                                    const T* __restrict__ x, const T* __restrict__ weight,
                                    const float* __restrict__ mean, const float* __restrict__ rstd, int rows,
                                    int cols) {
    __shared__ float scratch[32];
    float* dw = dweight_partial + (size_t)blockIdx.x * cols;  // this block's row of partials
    float* db = dbias_partial + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dw[c] = db[c] = 0.0f;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (size_t)row * cols;
        const T* dyr = dy + (size_t)row * cols;
        T* dxr = dx + (size_t)row * cols;
        const float m = mean[row], r = rstd[row];
        float sum_g = 0.0f, sum_g_xhat = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xhat = (to_float(xr[c]) - m) * r, grad = to_float(dyr[c]);
            const float g = grad * to_float(weight[c]);
            sum_g += g;
            sum_g_xhat += g * xhat;
            dw[c] += grad * xhat;  // only this thread ever touches column c of this block's partials
            db[c] += grad;
        }
        const float mean_g = block_sum(sum_g, scratch) / cols;
        const float mean_g_xhat = block_sum(sum_g_xhat, scratch) / cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xhat = (to_float(xr[c]) - m) * r;
            const float g = to_float(dyr[c]) * to_float(weight[c]);
            dxr[c] = from_float<T>(r * (g - mean_g - xhat * mean_g_xhat));
        }
    }
}

// dweight[c] = sum over p of dweight_partial[p, c] (likewise dbias), in p order: reproducible.
template <typename T>
__device__ void layer_norm_params(T* __restrict__ dweight, T* __restrict__ dbias,
                                  const float* __restrict__ dweight_partial, const float* __restrict__ dbias_partial,
                                  int parts, int cols) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += blockDim.x * gridDim.x) {
        float dw = 0.0f, db = 0.0f;
        for (int p = 0; p < parts; ++p) {
            dw += dweight_partial[(size_t)p * cols + c];
            db += dbias_partial[(size_t)p * cols + c];
        }
        dweight[c] = from_float<T>(dw);
        dbias[c] = from_float<T>(db);
    }
}

extern "C" __global__ void layer_norm_fwd_f32(float* y, float* mean, float* rstd, const float* x, const float* weight,
                                              const float* bias, int rows, int cols, float eps) {
    layer_norm_forward<float>(y, mean, rstd, x, weight, bias, rows, cols, eps);
}
extern "C" __global__ void layer_norm_fwd_bf16(__nv_bfloat16* y, float* mean, float* rstd, const __nv_bfloat16* x,
                                               const __nv_bfloat16* weight, const __nv_bfloat16* bias, int rows,
                                               int cols, float eps) {
    layer_norm_forward<__nv_bfloat16>(y, mean, rstd, x, weight, bias, rows, cols, eps);
}
extern "C" __global__ void layer_norm_bwd_f32(float* dx, float* dweight_partial, float* dbias_partial, const float* dy,
                                              const float* x, const float* weight, const float* mean,
                                              const float* rstd, int rows, int cols) {
    layer_norm_backward<float>(dx, dweight_partial, dbias_partial, dy, x, weight, mean, rstd, rows, cols);
}
extern "C" __global__ void layer_norm_bwd_bf16(__nv_bfloat16* dx, float* dweight_partial, float* dbias_partial,
                                               const __nv_bfloat16* dy, const __nv_bfloat16* x,
                                               const __nv_bfloat16* weight, const float* mean, const float* rstd,
                                               int rows, int cols) {
    layer_norm_backward<__nv_bfloat16>(dx, dweight_partial, dbias_partial, dy, x, weight, mean, rstd, rows, cols);
}
extern "C" __global__ void layer_norm_bwd_params_f32(float* dweight, float* dbias, const float* dweight_partial,
                                                     const float* dbias_partial, int parts, int cols) {
    layer_norm_params<float>(dweight, dbias, dweight_partial, dbias_partial, parts, cols);
}
extern "C" __global__ void layer_norm_bwd_params_bf16(__nv_bfloat16* dweight, __nv_bfloat16* dbias,
                                                      const float* dweight_partial, const float* dbias_partial,
                                                      int parts, int cols) {
    layer_norm_params<__nv_bfloat16>(dweight, dbias, dweight_partial, dbias_partial, parts, cols);
}
