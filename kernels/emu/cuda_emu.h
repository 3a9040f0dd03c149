// CUDA's execution model on the CPU, so that the kernels in kernels/*.cu compile unchanged with g++
// (C++20) and run, slowly and exactly, on a laptop. ds_lab/ops/emulate.py includes this header and
// a .cu file into one translation unit and adds a launcher per `extern "C" __global__` kernel.
//
// What is modelled:
//   - a launch <<<grid, block>>>: blocks run one after another; inside a block every CUDA thread
//     is an OS thread (std::thread), so threads really run concurrently and really wait;
//   - threadIdx / blockIdx / blockDim / gridDim, warpSize = 32 (lanes: linear thread id % 32);
//   - __syncthreads(): a barrier of the block (std::barrier); a thread that returned counts as
//     arrived, as on the hardware;
//   - __shared__: one copy per block (a function-local static: blocks never overlap in time);
//   - warp shuffles (__shfl_sync, __shfl_xor_sync, __shfl_down_sync, __shfl_up_sync) with width,
//     through a per-warp exchange and barrier; __ballot_sync, __any_sync, __all_sync;
//   - atomics (atomicAdd / atomicMax / atomicMin / atomicExch / atomicCAS) with std::atomic_ref;
//   - printf from any thread (stdout; ds_lab.ops.emulate can capture it).
// What is not:
//   - the memory model: every access is an ordinary CPU access, so a missing __syncthreads may
//     happen to work here and fail on a GPU (a race is a race, but the timing differs);
//   - timing, occupancy, registers, bank conflicts, coalescing: nothing here says how fast a
//     kernel is (nvcc's ptxas report and the GPU benchmarks do);
//   - independent thread scheduling inside a warp (lanes are threads; a shuffle waits for the
//     whole warp, so a shuffle under divergence with a partial mask is not supported);
//   - dynamic shared memory (extern __shared__), streams, cooperative groups, textures.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned x, y, z;
};
struct float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace emu {

struct Block {  // what the threads of one block share for the duration of that block
    std::unique_ptr<std::barrier<>> sync;                // __syncthreads
    std::vector<std::unique_ptr<std::barrier<>>> warps;  // one per warp, for the shuffles
    std::vector<uint64_t> slots;                         // one exchange slot per thread
};

inline thread_local uint3 thread_index{0, 0, 0};
inline thread_local uint3 block_index{0, 0, 0};
inline thread_local Block* block = nullptr;
inline thread_local unsigned linear = 0;  // linear thread id in the block
inline dim3 block_dim, grid_dim;          // of the running launch (one launch at a time)
inline std::mutex launch_mutex;

inline unsigned threads_per_block() { return block_dim.x * block_dim.y * block_dim.z; }

template <class T>
T exchange(T value, int source_lane, bool in_range) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    unsigned warp = linear / 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    block->slots[linear] = bits;
    block->warps[warp]->arrive_and_wait();  // every lane has written
    T out = value;  // a lane outside the warp or the width segment reads its own value, as on the GPU
    unsigned source = warp * 32 + static_cast<unsigned>(source_lane);
    if (in_range && source_lane >= 0 && source_lane < 32 && source < threads_per_block())
        std::memcpy(&out, &block->slots[source], sizeof(T));
    block->warps[warp]->arrive_and_wait();  // every lane has read: the slots may be reused
    return out;
}

// Run body() as every thread of every block of <<<grid, block_shape>>>.
template <class F>
void launch(dim3 grid, dim3 block_shape, F&& body) {
    std::lock_guard<std::mutex> guard(launch_mutex);
    grid_dim = grid;
    block_dim = block_shape;
    const unsigned n = threads_per_block(), warps = (n + 31) / 32;
    Block current;
    std::barrier<> start(n + 1), done(n + 1);
    uint3 next_block{0, 0, 0};
    bool finished = false;
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned t = 0; t < n; ++t) {
        threads.emplace_back([&, t] {
            linear = t;
            thread_index = {t % block_shape.x, (t / block_shape.x) % block_shape.y, t / (block_shape.x * block_shape.y)};
            for (;;) {
                start.arrive_and_wait();
                if (finished) return;
                block = &current;
                block_index = next_block;
                body();
                current.sync->arrive_and_drop();  // a returned thread no longer holds the others up
                current.warps[t / 32]->arrive_and_drop();
                done.arrive_and_wait();
            }
        });
    }
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                current.sync = std::make_unique<std::barrier<>>(n);
                current.warps.clear();
                for (unsigned w = 0; w < warps; ++w)
                    current.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
                current.slots.assign(n, 0);
                next_block = {x, y, z};
                start.arrive_and_wait();
                done.arrive_and_wait();
            }
    finished = true;
    start.arrive_and_wait();
    for (auto& thread : threads) thread.join();
}

}  // namespace emu

#define threadIdx (emu::thread_index)
#define blockIdx (emu::block_index)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define warpSize 32
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

inline void __syncthreads() { emu::block->sync->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::block->warps[emu::linear / 32]->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_sync(unsigned, T value, int src_lane, int width = 32) {
    int lane = static_cast<int>(emu::linear % 32), base = lane / width * width;
    return emu::exchange(value, base + (src_lane % width), true);
}
template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = 32) {
    int lane = static_cast<int>(emu::linear % 32), source = lane ^ lane_mask;
    return emu::exchange(value, source, source / width == lane / width);
}
template <class T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int width = 32) {
    int lane = static_cast<int>(emu::linear % 32), source = lane + static_cast<int>(delta);
    return emu::exchange(value, source, source / width == lane / width);
}
template <class T>
T __shfl_up_sync(unsigned, T value, unsigned delta, int width = 32) {
    int lane = static_cast<int>(emu::linear % 32), source = lane - static_cast<int>(delta);
    return emu::exchange(value, source, source >= 0 && source / width == lane / width);
}
inline unsigned __ballot_sync(unsigned, int predicate) {
    unsigned bits = 0, first = emu::linear / 32 * 32;
    for (int offset = 0; offset < 32; ++offset) {
        int other = emu::exchange(predicate ? 1 : 0, offset, true);
        if (other && first + offset < emu::threads_per_block()) bits |= 1u << offset;
    }
    return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, !predicate) == 0; }

template <class T>
T atomicAdd(T* address, T value) { return std::atomic_ref<T>(*address).fetch_add(value); }
template <class T>
T atomicExch(T* address, T value) { return std::atomic_ref<T>(*address).exchange(value); }
template <class T>
T atomicCAS(T* address, T expected, T desired) {
    std::atomic_ref<T>(*address).compare_exchange_strong(expected, desired);
    return expected;
}
template <class T>
T atomicMax(T* address, T value) {
    std::atomic_ref<T> ref(*address);
    T old = ref.load();
    while (old < value && !ref.compare_exchange_weak(old, value)) {}
    return old;
}
template <class T>
T atomicMin(T* address, T value) {
    std::atomic_ref<T> ref(*address);
    T old = ref.load();
    while (old > value && !ref.compare_exchange_weak(old, value)) {}
    return old;
}

// CUDA's device-side min/max overloads
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// the fast-math intrinsics, at full precision (a GPU's are approximate: compare with tolerances)
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return std::min(1.0f, std::max(0.0f, x)); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
template <class T>
T __ldg(const T* p) { return *p; }
