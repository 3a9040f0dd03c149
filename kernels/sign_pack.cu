// 1-bit compression with error feedback, the worker's side (ds_lab/comm/compressed.py), and the
// way back from bits to values. b is the padded fp32 buffer (its length n a multiple of 8).
//
//   sum_squares_partial   partial[block] = sum of b^2 over the block's grid-stride slice (in fp64)
//   sum_squares_final     scale = sqrt(sum of partial) / sqrt(n): one block, fixed order, so the
//                         scale is the same bits at every call (no atomics)
//   sign_pack_with_error  packed[i] = the signs of b[8i .. 8i+7], MSB first, bit 1 = b >= 0 (so
//                         sign(0) = +1, as pack_signs); e = b - scale * sign(b)
//   unpack_scaled         out[8i + k] = +scale_c or -scale_c by bit k of packed[i], c = i / bytes_per_chunk
//
// Bytes moved per element:
//   sum_squares_partial   reads b                                   4 B   (+ 8 B per block)
//   sign_pack_with_error  reads b, writes e and one bit             8.125 B
//   the worker step (both passes over b)                            12.125 B
//   unpack_scaled         reads one bit, writes a float             4.125 B
//
// Accumulating b^2 in fp64 makes the sum nearly exact (each product is exact in a double, and the
// GPU's fused multiply-adds round alike), so the scale is the root mean square correctly rounded
// to fp32 but for rare ties, the same on the GPU and in the emulation, and within ~3 ulps of
// torch's (an fp32 norm, then a division); given the scale, e is exact.
// No C library header (NVRTC has none): long long and unsigned char, not int64_t and uint8_t.
//
// Roofline figures (read by ds_lab/lab/kernels.py): kernel, bytes moved per element, flops per element
// (flops: a count of the arithmetic, transcendental functions as one):
// roofline: sign_pack_with_error 12.125 4
// roofline: unpack_scaled 4.125 1

__device__ __forceinline__ double warp_sum(double value) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

// The block's threads' values summed in a fixed order; the result is valid in thread 0.
// (Every thread of the block must call it: the shuffles take whole warps.)
__device__ __forceinline__ double block_sum(double value) {
    __shared__ double per_warp[32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
    value = warp_sum(value);
    if (lane == 0) per_warp[warp] = value;
    __syncthreads();
    if (warp == 0) value = warp_sum(lane < warps ? per_warp[lane] : 0.0);
    return value;
}

__device__ __forceinline__ bool aligned_to(const void* address, unsigned bytes) {
    return reinterpret_cast<unsigned long long>(address) % bytes == 0;
}

extern "C" __global__ void __launch_bounds__(256)
sum_squares_partial(double* __restrict__ partial, const float* __restrict__ b, long long n) {
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    double sum = 0.0;
    if (aligned_to(b, 16)) {  // n % 8 == 0, so float4s cover b
        const float4* b4 = reinterpret_cast<const float4*>(b);
        for (long long i = first; i < n / 4; i += stride) {
            const float4 x = b4[i];
            sum += static_cast<double>(x.x) * x.x + static_cast<double>(x.y) * x.y +
                   static_cast<double>(x.z) * x.z + static_cast<double>(x.w) * x.w;
        }
    } else {
        for (long long i = first; i < n; i += stride) sum += static_cast<double>(b[i]) * b[i];
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

extern "C" __global__ void __launch_bounds__(256)
sum_squares_final(float* __restrict__ scale, const double* __restrict__ partial, int blocks, long long n) {
    double sum = 0.0;
    for (int i = threadIdx.x; i < blocks; i += blockDim.x) sum += partial[i];
    sum = block_sum(sum);
    // in fp64, rounded once: the root mean square to within half an fp32 ulp
    if (threadIdx.x == 0) scale[0] = static_cast<float>(sqrt(sum) / sqrt(static_cast<double>(n)));
}

__device__ __forceinline__ unsigned sign_bits(float4 x, unsigned shift) {
    return (unsigned(x.x >= 0.0f) << (shift + 3)) | (unsigned(x.y >= 0.0f) << (shift + 2)) |
           (unsigned(x.z >= 0.0f) << (shift + 1)) | (unsigned(x.w >= 0.0f) << shift);
}

// b - scale * sign(b), with sign(b) = +1 for b >= 0: one rounding, the same as torch's b - (scale * signs(b))
__device__ __forceinline__ float4 residual(float4 x, float scale) {
    return make_float4(x.x - (x.x >= 0.0f ? scale : -scale), x.y - (x.y >= 0.0f ? scale : -scale),
                       x.z - (x.z >= 0.0f ? scale : -scale), x.w - (x.w >= 0.0f ? scale : -scale));
}

extern "C" __global__ void __launch_bounds__(256)
sign_pack_with_error(unsigned char* __restrict__ packed, float* __restrict__ worker_error,
                     const float* __restrict__ b, const float* __restrict__ scale_of_b, long long n_bytes) {
    const float scale = scale_of_b[0];
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    const bool vector = aligned_to(b, 16) && aligned_to(worker_error, 16);
    // one thread per output byte: eight elements, two float4s
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_bytes; i += stride) {
        float4 low, high;
        if (vector) {
            low = reinterpret_cast<const float4*>(b)[2 * i];
            high = reinterpret_cast<const float4*>(b)[2 * i + 1];
        } else {
            const float* x = b + 8 * i;
            low = make_float4(x[0], x[1], x[2], x[3]);
            high = make_float4(x[4], x[5], x[6], x[7]);
        }
        packed[i] = static_cast<unsigned char>(sign_bits(low, 4) | sign_bits(high, 0));
        const float4 low_error = residual(low, scale), high_error = residual(high, scale);
        if (vector) {
            reinterpret_cast<float4*>(worker_error)[2 * i] = low_error;
            reinterpret_cast<float4*>(worker_error)[2 * i + 1] = high_error;
        } else {
            float* e = worker_error + 8 * i;
            e[0] = low_error.x, e[1] = low_error.y, e[2] = low_error.z, e[3] = low_error.w;
            e[4] = high_error.x, e[5] = high_error.y, e[6] = high_error.z, e[7] = high_error.w;
        }
    }
}

__device__ __forceinline__ float4 signed_scales(unsigned bits, unsigned shift, float scale) {
    return make_float4((bits >> (shift + 3)) & 1u ? scale : -scale, (bits >> (shift + 2)) & 1u ? scale : -scale,
                       (bits >> (shift + 1)) & 1u ? scale : -scale, (bits >> shift) & 1u ? scale : -scale);
}

extern "C" __global__ void __launch_bounds__(256)
unpack_scaled(float* __restrict__ out, const unsigned char* __restrict__ packed, const float* __restrict__ scales,
              long long bytes_per_chunk, long long n_bytes) {
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    const bool vector = aligned_to(out, 16);
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_bytes; i += stride) {
        const unsigned bits = packed[i];
        const float scale = scales[i / bytes_per_chunk];
        const float4 low = signed_scales(bits, 4, scale), high = signed_scales(bits, 0, scale);
        if (vector) {
            reinterpret_cast<float4*>(out)[2 * i] = low;
            reinterpret_cast<float4*>(out)[2 * i + 1] = high;
        } else {
            float* o = out + 8 * i;
            o[0] = low.x, o[1] = low.y, o[2] = low.z, o[3] = low.w;
            o[4] = high.x, o[5] = high.y, o[6] = high.z, o[7] = high.w;
        }
    }
}
