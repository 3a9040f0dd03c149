// Kernels that exercise each piece of the CPU emulation (tests/test_emulate.py): shuffles of every
// kind and width, ballots, atomics, __syncthreads with threads that returned early, bf16 rounding.
#include <cuda_bf16.h>

extern "C" __global__ void shuffles(int* out, int width, int delta) {
    int t = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
    int base = t * 4;
    out[base + 0] = __shfl_xor_sync(0xffffffffu, lane * 10 + (int)blockIdx.x, delta, width);
    out[base + 1] = __shfl_down_sync(0xffffffffu, lane, delta, width);
    out[base + 2] = __shfl_up_sync(0xffffffffu, lane, delta, width);
    out[base + 3] = __shfl_sync(0xffffffffu, lane, delta, width);
}

extern "C" __global__ void ballot(unsigned* out, const int* predicate) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    out[t] = __ballot_sync(0xffffffffu, predicate[t]);
}

extern "C" __global__ void atomics(float* total, int* hits, int* largest, const float* x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        atomicAdd(total, x[i]);
        atomicAdd(hits, 1);
        atomicMax(largest, i);
    }
}

// Threads with threadIdx.x >= live return at once; the others meet at two barriers and must not hang.
extern "C" __global__ void early_exit(float* out, int live) {
    __shared__ float stage[256];
    if ((int)threadIdx.x >= live) return;
    stage[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    float mirrored = stage[live - 1 - threadIdx.x];
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = mirrored;
}

extern "C" __global__ void to_bf16(__nv_bfloat16* out, float* back, const float* x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        out[i] = __float2bfloat16(x[i]);
        back[i] = __bfloat162float(out[i]);
    }
}
