// Multi-tensor fused Adam / AdamW: one launch updates every tensor of a parameter group.
//
// Bytes moved per element (the roofline: ~10 flops per 28 bytes, so the step is memory-bound):
//   fused_adam_f32          reads p, g, m, v (4 x 4 B), writes p, m, v (3 x 4 B)           = 28 B
//   fused_adam_bf16_master  reads master, m, v (3 x 4 B) and the bf16 g (2 B), writes
//                           master, m, v (3 x 4 B) and the bf16 param (2 B)                = 28 B
//                           (the bf16 param is only written: the fp32 master is the truth)
//
// One launch, many tensors (ds_lab/ops/fused_adam.py builds the two tables):
//   pointers  int64 [kinds][num_tensors]: every tensor's data_ptr(), one row per kind, in order
//               fp32: params, grads, exp_avgs, exp_avg_sqs
//               bf16: params (bf16), grads (bf16), masters (fp32), exp_avgs, exp_avg_sqs
//   chunks    int64 [gridDim.x][3]: (tensor index, first element, element count). Block b updates
//             that slice of that tensor, its threads striding through it; the slices tile every
//             tensor, so the grid covers the whole group.
//
// The math is ds_lab/optim/adam.py's (torch.optim.AdamW's op order); the host folds the scalars
// in double precision and passes them as the floats torch's scalar arguments become:
//   decoupled (adam_w_mode):  p <- p * decay                   decay = 1 - lr wd
//   L2 (adam_w_mode = 0):     g <- g + wd p
//   m <- lerp(m, g, w)                                          w = 1 - b1
//   v <- fma((1 - b2) g, g, v b2)
//   p <- p + (step_size m) / (sqrt(v) / bias2_sqrt + eps)       step_size = -lr / (1 - b1^t),
//                                                               bias2_sqrt = sqrt(1 - b2^t)
// (without bias correction the host passes step_size = -lr, bias2_sqrt = 1). Where torch's CPU
// kernels round once (lerp, addcmul, add with alpha: fused multiply-adds) so does fmaf here, and
// nothing is left for nvcc to contract: the GPU, the emulation and torch round alike.
//
// Roofline figures (read by ds_lab/lab/kernels.py): kernel, bytes moved per element, flops per element
// (flops: a count of the arithmetic, transcendental functions as one):
// roofline: fused_adam_f32 28 12
// roofline: fused_adam_bf16_master 28 12
#include <cuda_bf16.h>  // and no C library header: NVRTC has none (long long, not int64_t)

struct AdamScalars {
    float lerp_weight, beta2, one_minus_beta2, eps, step_size, bias2_sqrt, decay, weight_decay;
    int adam_w_mode;
};

__device__ __forceinline__ void adam_element(float& p, float g, float& m, float& v, const AdamScalars& s) {
    if (s.weight_decay != 0.0f) {
        if (s.adam_w_mode)
            p = p * s.decay;
        else
            g = fmaf(s.weight_decay, p, g);
    }
    // torch's lerp: from the nearer end, so that w = 1 gives g exactly
    m = s.lerp_weight < 0.5f ? fmaf(s.lerp_weight, g - m, m) : fmaf(s.lerp_weight - 1.0f, g - m, g);
    v = fmaf(s.one_minus_beta2 * g, g, v * s.beta2);  // torch's addcmul_ fuses its last multiply-add
    const float denom = sqrtf(v) / s.bias2_sqrt + s.eps;
    p = p + s.step_size * m / denom;
}

__device__ __forceinline__ bool aligned_to(const void* address, unsigned bytes) {
    return reinterpret_cast<unsigned long long>(address) % bytes == 0;
}

// four bf16 in one 8-byte load or store
struct alignas(8) Bf16x4 {
    __nv_bfloat16 x, y, z, w;
};

// This block's row of the chunk table: which tensor, from which element, how many.
struct Chunk {
    long long tensor, start;
    int count;
};
__device__ __forceinline__ Chunk chunk_of(const long long* __restrict__ chunks) {
    const long long* row = chunks + 3 * blockIdx.x;
    return Chunk{row[0], row[1], static_cast<int>(row[2])};
}

extern "C" __global__ void __launch_bounds__(256)
fused_adam_f32(const long long* __restrict__ pointers, int num_tensors, const long long* __restrict__ chunks,
               float lerp_weight, float beta2, float one_minus_beta2, float eps, float step_size,
               float bias2_sqrt, float decay, float weight_decay, int adam_w_mode) {
    const AdamScalars s{lerp_weight, beta2, one_minus_beta2, eps, step_size, bias2_sqrt, decay, weight_decay,
                        adam_w_mode};
    const Chunk chunk = chunk_of(chunks);
    const long long tensor = chunk.tensor, start = chunk.start;
    const int count = chunk.count;
    float* p = reinterpret_cast<float*>(pointers[tensor]) + start;
    const float* g = reinterpret_cast<const float*>(pointers[num_tensors + tensor]) + start;
    float* m = reinterpret_cast<float*>(pointers[2 * num_tensors + tensor]) + start;
    float* v = reinterpret_cast<float*>(pointers[3 * num_tensors + tensor]) + start;

    // float4 loads where all four slices are 16-byte aligned (torch's allocations are; a view
    // at an odd offset takes the scalar loop), then the scalar tail
    const bool vector = aligned_to(p, 16) && aligned_to(g, 16) && aligned_to(m, 16) && aligned_to(v, 16);
    const int vector_end = vector ? count / 4 * 4 : 0;
    for (int i = 4 * threadIdx.x; i < vector_end; i += 4 * blockDim.x) {
        float4 p4 = *reinterpret_cast<const float4*>(p + i);
        const float4 g4 = *reinterpret_cast<const float4*>(g + i);
        float4 m4 = *reinterpret_cast<const float4*>(m + i);
        float4 v4 = *reinterpret_cast<const float4*>(v + i);
        adam_element(p4.x, g4.x, m4.x, v4.x, s);
        adam_element(p4.y, g4.y, m4.y, v4.y, s);
        adam_element(p4.z, g4.z, m4.z, v4.z, s);
        adam_element(p4.w, g4.w, m4.w, v4.w, s);
        *reinterpret_cast<float4*>(p + i) = p4;
        *reinterpret_cast<float4*>(m + i) = m4;
        *reinterpret_cast<float4*>(v + i) = v4;
    }
    for (int i = vector_end + threadIdx.x; i < count; i += blockDim.x) adam_element(p[i], g[i], m[i], v[i], s);
}

extern "C" __global__ void __launch_bounds__(256)
fused_adam_bf16_master(const long long* __restrict__ pointers, int num_tensors, const long long* __restrict__ chunks,
                       float lerp_weight, float beta2, float one_minus_beta2, float eps, float step_size,
                       float bias2_sqrt, float decay, float weight_decay, int adam_w_mode) {
    const AdamScalars s{lerp_weight, beta2, one_minus_beta2, eps, step_size, bias2_sqrt, decay, weight_decay,
                        adam_w_mode};
    const Chunk chunk = chunk_of(chunks);
    const long long tensor = chunk.tensor, start = chunk.start;
    const int count = chunk.count;
    __nv_bfloat16* param = reinterpret_cast<__nv_bfloat16*>(pointers[tensor]) + start;
    const __nv_bfloat16* g = reinterpret_cast<const __nv_bfloat16*>(pointers[num_tensors + tensor]) + start;
    float* p = reinterpret_cast<float*>(pointers[2 * num_tensors + tensor]) + start;  // the fp32 master
    float* m = reinterpret_cast<float*>(pointers[3 * num_tensors + tensor]) + start;
    float* v = reinterpret_cast<float*>(pointers[4 * num_tensors + tensor]) + start;

    const bool vector = aligned_to(param, 8) && aligned_to(g, 8) && aligned_to(p, 16) && aligned_to(m, 16) &&
                        aligned_to(v, 16);
    const int vector_end = vector ? count / 4 * 4 : 0;
    for (int i = 4 * threadIdx.x; i < vector_end; i += 4 * blockDim.x) {
        const Bf16x4 g4 = *reinterpret_cast<const Bf16x4*>(g + i);
        float4 p4 = *reinterpret_cast<const float4*>(p + i);
        float4 m4 = *reinterpret_cast<const float4*>(m + i);
        float4 v4 = *reinterpret_cast<const float4*>(v + i);
        adam_element(p4.x, __bfloat162float(g4.x), m4.x, v4.x, s);
        adam_element(p4.y, __bfloat162float(g4.y), m4.y, v4.y, s);
        adam_element(p4.z, __bfloat162float(g4.z), m4.z, v4.z, s);
        adam_element(p4.w, __bfloat162float(g4.w), m4.w, v4.w, s);
        *reinterpret_cast<float4*>(p + i) = p4;
        *reinterpret_cast<float4*>(m + i) = m4;
        *reinterpret_cast<float4*>(v + i) = v4;
        // the bf16 param is the master rounded to nearest even, as torch's copy_ does
        *reinterpret_cast<Bf16x4*>(param + i) = Bf16x4{__float2bfloat16(p4.x), __float2bfloat16(p4.y),
                                                        __float2bfloat16(p4.z), __float2bfloat16(p4.w)};
    }
    for (int i = vector_end + threadIdx.x; i < count; i += blockDim.x) {
        adam_element(p[i], __bfloat162float(g[i]), m[i], v[i], s);
        param[i] = __float2bfloat16(p[i]);
    }
}
