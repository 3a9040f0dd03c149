// A teaching kernel: each block sums its slice of x, first in registers (grid-stride), then
// across its warps with shuffles, then across warps through shared memory; block 0's threads can
// say hello. Bytes per element: 4 read, 4 / blockDim written (one float per block).
//
// Roofline figures (read by ds_lab/lab/kernels.py): kernel, bytes moved per element, flops per element
// (flops: a count of the arithmetic, transcendental functions as one):
// roofline: block_sum 4 1
#include <cstdio>

__device__ float warp_sum(float value) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

extern "C" __global__ void block_sum(float* __restrict__ out, const float* __restrict__ x, int n, int verbose) {
    __shared__ float partial[32];  // one per warp
    float sum = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) sum += x[i];
    if (verbose && blockIdx.x == 0 && threadIdx.x < 4)
        printf("block %d thread %d: my grid-stride partial sum is %g\n", blockIdx.x, threadIdx.x, sum);
    sum = warp_sum(sum);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = sum;
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) / 32;
        sum = lane < warps ? partial[lane] : 0.0f;
        sum = warp_sum(sum);
        if (lane == 0) out[blockIdx.x] = sum;
    }
}
