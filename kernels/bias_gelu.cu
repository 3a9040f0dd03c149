// y = gelu(x + bias), bias broadcast over the rows of x viewed as [rows, cols], and its backward:
//     dx = dy * gelu'(x + bias),    dbias = sum over rows of dx
// `approximate` = 1: GPT-2's tanh form, u = x + bias, k = sqrt(2/pi), t = tanh(k (u + 0.044715 u^3)):
//     gelu(u) = u/2 (1 + t),    gelu'(u) = (1 + t)/2 + u/2 (1 - t^2) k (1 + 3 * 0.044715 u^2)
// `approximate` = 0: the exact form with the normal CDF and density,
//     gelu(u) = u/2 (1 + erf(u / sqrt 2)),    gelu'(u) = (1 + erf(u / sqrt 2))/2 + u exp(-u^2/2) / sqrt(2 pi)
//
// Bytes moved per element (bias amortised over the rows): forward reads x, writes y: 8 B fp32,
// 4 B bf16; backward reads dy and x, writes dx: 12 B fp32, 6 B bf16 (plus a [blocks, cols] fp32
// buffer of dbias partials).
//
// Forward: one grid-stride loop over all rows * cols elements in packs of 4 (a float4, 16 B, in
// fp32; 8 B in bf16) when x and y are aligned to a pack, then a scalar loop for the last n % 4
// elements (or all of them when unaligned). Packs may straddle rows: bias is read per element.
// Backward: block b owns a contiguous chunk of rows; a thread walks down its columns (a pack of 4
// when cols % 4 == 0 and the pointers are aligned, else 1) through that chunk, keeping the dbias
// sums in registers, and writes them to row b of the partials; bias_gelu_dbias_* sums the
// partials column by column in block order, so dbias is the same on every run (no atomics).
//
// Roofline figures (read by ds_lab/lab/kernels.py): kernel, bytes moved per element, flops per element
// (flops: a count of the arithmetic, transcendental functions as one):
// roofline: bias_gelu_fwd_f32 8 12
// roofline: bias_gelu_fwd_bf16 4 12
// roofline: bias_gelu_bwd_f32 12 20
// roofline: bias_gelu_bwd_bf16 6 20
#include <cuda_bf16.h>
#include <cmath>
#include <cstdio>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {  // N elements moved by one load or store
    T v[N];
};

template <typename T, int N>
__device__ __forceinline__ bool aligned(const T* p) {
    return reinterpret_cast<size_t>(p) % sizeof(Pack<T, N>) == 0;
}

constexpr float kSqrt2OverPi = 0.7978845608028654f, kCubic = 0.044715f;
constexpr float kSqrtHalf = 0.7071067811865476f, kInvSqrt2Pi = 0.3989422804014327f;

__device__ __forceinline__ float gelu(float u, int approximate) {
    if (approximate) return 0.5f * u * (1.0f + tanhf(kSqrt2OverPi * (u + kCubic * u * u * u)));
    return 0.5f * u * (1.0f + erff(u * kSqrtHalf));
}

__device__ __forceinline__ float gelu_grad(float u, int approximate) {
    if (approximate) {
        const float t = tanhf(kSqrt2OverPi * (u + kCubic * u * u * u));
        return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kCubic * u * u);
    }
    return 0.5f * (1.0f + erff(u * kSqrtHalf)) + u * expf(-0.5f * u * u) * kInvSqrt2Pi;
}

template <typename T>
__device__ void bias_gelu_forward(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ bias, int rows,
                                  int cols, int approximate) {
    const long long n = (long long)rows * cols, stride = (long long)blockDim.x * gridDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long scalar_from = 0;
    if (aligned<T, 4>(x) && aligned<T, 4>(y)) {
        scalar_from = n / 4 * 4;
        for (long long i = first * 4; i < scalar_from; i += stride * 4) {
            const Pack<T, 4> in = *reinterpret_cast<const Pack<T, 4>*>(x + i);
            Pack<T, 4> out;
            int c = (int)(i % cols);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                out.v[k] = from_float<T>(gelu(to_float(in.v[k]) + to_float(bias[c]), approximate));
                c = c + 1 == cols ? 0 : c + 1;
            }
            *reinterpret_cast<Pack<T, 4>*>(y + i) = out;
        }
    }
    for (long long i = scalar_from + first; i < n; i += stride)
        y[i] = from_float<T>(gelu(to_float(x[i]) + to_float(bias[i % cols]), approximate));
}

template <typename T, int N>
__device__ void bias_gelu_backward_packs(T* __restrict__ dx, float* __restrict__ dbias_partial,
                                         const T* __restrict__ dy, const T* __restrict__ x,
                                         const T* __restrict__ bias, int rows, int cols, int approximate) {
    const int chunk = (rows + gridDim.x - 1) / gridDim.x;
    const int begin = (int)blockIdx.x * chunk, end = begin + chunk < rows ? begin + chunk : rows;  // may be empty
    for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
        float b[N], sum[N];
#pragma unroll
        for (int k = 0; k < N; ++k) b[k] = to_float(bias[c + k]), sum[k] = 0.0f;
        for (int row = begin; row < end; ++row) {
            const size_t at = (size_t)row * cols + c;
            const Pack<T, N> grad = *reinterpret_cast<const Pack<T, N>*>(dy + at);
            const Pack<T, N> in = *reinterpret_cast<const Pack<T, N>*>(x + at);
            Pack<T, N> out;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float d = to_float(grad.v[k]) * gelu_grad(to_float(in.v[k]) + b[k], approximate);
                out.v[k] = from_float<T>(d);
                sum[k] += d;
            }
            *reinterpret_cast<Pack<T, N>*>(dx + at) = out;
        }
#pragma unroll
        for (int k = 0; k < N; ++k) dbias_partial[(size_t)blockIdx.x * cols + c + k] = sum[k];
    }
}

template <typename T>
__device__ void bias_gelu_backward(T* dx, float* dbias_partial, const T* dy, const T* x, const T* bias, int rows,
                                   int cols, int approximate) {
    if (cols % 4 == 0 && aligned<T, 4>(dx) && aligned<T, 4>(dy) && aligned<T, 4>(x) && aligned<T, 4>(bias))
        bias_gelu_backward_packs<T, 4>(dx, dbias_partial, dy, x, bias, rows, cols, approximate);
    else
        bias_gelu_backward_packs<T, 1>(dx, dbias_partial, dy, x, bias, rows, cols, approximate);
}

// dbias[c] = sum over p of dbias_partial[p, c], in p order.
template <typename T>
__device__ void bias_gelu_dbias(T* __restrict__ dbias, const float* __restrict__ dbias_partial, int parts, int cols) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += blockDim.x * gridDim.x) {
        float sum = 0.0f;
        for (int p = 0; p < parts; ++p) sum += dbias_partial[(size_t)p * cols + c];
        dbias[c] = from_float<T>(sum);
    }
}

extern "C" __global__ void bias_gelu_fwd_f32(float* y, const float* x, const float* bias, int rows, int cols,
                                             int approximate) {
    bias_gelu_forward<float>(y, x, bias, rows, cols, approximate);
}
extern "C" __global__ void bias_gelu_fwd_bf16(__nv_bfloat16* y, const __nv_bfloat16* x, const __nv_bfloat16* bias,
                                              int rows, int cols, int approximate) {
    bias_gelu_forward<__nv_bfloat16>(y, x, bias, rows, cols, approximate);
}
extern "C" __global__ void bias_gelu_bwd_f32(float* dx, float* dbias_partial, const float* dy, const float* x,
                                             const float* bias, int rows, int cols, int approximate) {
    bias_gelu_backward<float>(dx, dbias_partial, dy, x, bias, rows, cols, approximate);
}
extern "C" __global__ void bias_gelu_bwd_bf16(__nv_bfloat16* dx, float* dbias_partial, const __nv_bfloat16* dy,
                                              const __nv_bfloat16* x, const __nv_bfloat16* bias, int rows, int cols,
                                              int approximate) {
    bias_gelu_backward<__nv_bfloat16>(dx, dbias_partial, dy, x, bias, rows, cols, approximate);
}
extern "C" __global__ void bias_gelu_dbias_f32(float* dbias, const float* dbias_partial, int parts, int cols) {
    bias_gelu_dbias<float>(dbias, dbias_partial, parts, cols);
}
extern "C" __global__ void bias_gelu_dbias_bf16(__nv_bfloat16* dbias, const float* dbias_partial, int parts,
                                                int cols) {
    bias_gelu_dbias<__nv_bfloat16>(dbias, dbias_partial, parts, cols);
}
