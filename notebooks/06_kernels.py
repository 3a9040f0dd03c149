# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6 · Fused kernels: count the bytes, not the flops
#
# *Source: article §3.3 and the kernels DeepSpeed ships (`ops/adam/fused_adam`, `csrc/transformer`).
# Skeleton: Goal · The idea · Run it · Measure · Compare with theory · Exercises · Summary.*
#
# ## Goal
#
# The earlier chapters made communication cheaper. This one makes the work *on* each GPU cheaper,
# for the ops that move many bytes and compute little: LayerNorm, bias + GeLU, the attention
# softmax, the optimizer step, 1-bit Adam's packing. At the end you can predict an op's best
# possible time from the bytes it moves. You can say why fusing several ops into one kernel brings
# it closer to that time. And you can read, run and check a real CUDA kernel, even without a GPU:
# `kernels/*.cu` run here on the CPU through an emulation of CUDA's execution model.

# %% [markdown]
# ## The idea
#
# ### Memory-bound ops and the roofline
#
# A GPU moves about 3.35 TB/s from its memory (H100 SXM) and computes about 67 TFLOP/s in fp32
# without tensor cores. An op that does $f$ flops per byte it moves cannot go faster than
#
# $$t \ \ge\ \max\!\left(\frac{\text{bytes}}{\text{bandwidth}},\ \frac{\text{flops}}{\text{peak}}\right).$$
#
# Below $f = 67/3.35 = 20$ flop/byte (the *ridge*), the bytes decide. LayerNorm, GeLU, softmax and
# Adam do 1–20 flops per element and move 4–28 bytes per element, so they are all far left of the
# ridge. For them only one thing matters: **how many bytes cross the memory bus**.
#
# ### Fusion
#
# Eager PyTorch runs an op as a sequence of kernels, and each one reads its inputs from memory and
# writes its output back. `gelu(x + b)` is two kernels: `t = x + b` reads 4 and writes 4 bytes per
# element, then `gelu(t)` reads 4 and writes 4, 16 bytes in all. A fused kernel reads `x`, adds the
# bias in a register, applies GeLU, and writes `y`: 8 bytes, so it can be twice as fast. Adam done
# with `_foreach` ops is eight passes over the parameters (84 bytes per element). The fused step reads
# `p, g, m, v` once and writes `p, m, v` once: 28 bytes. This is what DeepSpeed's `FusedAdam` and its
# transformer kernels are for.
#
# Each kernel in `kernels/` states its bytes and flops per element in its header
# (`// roofline: ...`). The roofline below is drawn from those lines.
#
# ### The kernels, and how we know they are right
#
# | file | entry points | what |
# |---|---|---|
# | `layer_norm.cu` | `layer_norm_{fwd,bwd,bwd_params}_{f32,bf16}` | one block per row, warp shuffles, deterministic dweight/dbias |
# | `bias_gelu.cu` | `bias_gelu_{fwd,bwd,dbias}_{f32,bf16}` | float4 loads, tanh or erf GeLU |
# | `causal_softmax.cu` | `causal_softmax_{fwd,bwd}_{f32,bf16}` | reads only the unmasked half |
# | `fused_adam.cu` | `fused_adam_f32`, `fused_adam_bf16_master` | every tensor in one launch (a chunk table) |
# | `sign_pack.cu` | `sum_squares_*`, `sign_pack_with_error`, `unpack_scaled` | 1-bit Adam's worker step |
#
# On a GPU they run through CuPy (`ds_lab/ops/cuda.py`). Here they run through the **emulation**
# (`kernels/emu/cuda_emu.h`, `ds_lab/ops/emulate.py`), which compiles the same `.cu` file,
# unchanged, with g++. Every CUDA thread becomes an OS thread. `__syncthreads` is a barrier,
# `__shared__` is shared by the block, and warp shuffles exchange values between real threads. It
# is slow and exact, and it models neither timing nor the memory model (a race may go unnoticed).
# `nvcc` builds the same file for Ampere (sm_80) and Hopper (sm_90), and ptxas says what each kernel
# costs in registers.

# %%
# %matplotlib inline
import math
import shutil

import matplotlib.pyplot as plt
import torch

import ds_lab.ops as ops
from ds_lab.lab.kernels import GPUS, UNFUSED, bound_seconds, draw_roofline, function_source, max_error, roofline_points
from ds_lab.ops import compile as kernels_compile
from ds_lab.ops import emulate
from ds_lab.ops.fused_adam import fused_adam_step
from ds_lab.ops.gelu import bias_gelu_reference
from ds_lab.ops.norm import layer_norm_reference
from ds_lab.ops.sign_pack import pack_signs, pack_with_error, signs, unpack_scaled
from ds_lab.ops.softmax import causal_softmax_reference

HAVE_NVCC = kernels_compile.nvcc() is not None
HAVE_GPU = ops.backend.cupy_available()
print(f"emulation: {emulate.available()} (g++); nvcc: {HAVE_NVCC}; GPU with CuPy: {HAVE_GPU}")

# %% [markdown]
# ## Run it
#
# ### 1. A CUDA kernel on the CPU: print from threads, watch a block reduce
#
# `kernels/block_sum.cu` sums a vector. Each thread adds up its grid-stride slice, then the 32
# lanes of each warp combine their sums with `__shfl_xor_sync`, and the warps combine theirs
# through `__shared__` memory. Block 0's first four threads `printf` their partial sums. That is
# C's `printf`, from four real threads, captured here.

# %%
print(function_source("block_sum.cu", "block_sum"))
x = torch.arange(1, 1001, dtype=torch.float32)
out = torch.full((2,), float("nan"))
printed = emulate.load("block_sum").launch("block_sum", grid=2, block=64, args=(out, x, x.numel(), 1), capture=True)
print("".join(sorted(printed.splitlines(keepends=True))))
print(f"block sums {out.tolist()}, together {out.sum().item():.0f}; torch says {x.sum().item():.0f}")

# %% [markdown]
# Thread $t$ of block $b$ adds the elements $i = 64b + t, \; i + 128, \; i + 256, \ldots$. Thread 0
# of block 0 adds $1 + 129 + 257 + \cdots + 897 = 8 + 128 \cdot 28 = 3592$, exactly what it printed.
#
# ### 2. A real kernel beside its reference
#
# The forward of bias + GeLU: a grid-stride loop over packs of four elements (one 16-byte load
# and one 16-byte store each), the bias added in a register, then a scalar tail. The torch reference is
# one line, `F.gelu(x + bias, approximate=...)`, which is two kernels.

# %%
print(function_source("bias_gelu.cu", "bias_gelu_forward"))

# %% [markdown]
# ### 3. Parity: every kernel, forward and backward, against torch
#
# Odd shapes (not multiples of 4, 32 or the block size) and fp32 and bf16. Every output buffer is
# filled with NaN before the call (`ops.poison_outputs()`), so an element a kernel forgets to write
# shows up as NaN. `tests/test_kernels_parity.py` runs more shapes. Here is a sample, with its
# largest errors:

# %%
def forward_backward(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    y = fn(*leaves)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    y.backward(g)
    return [y] + [t.grad for t in leaves if t.grad is not None]


gen = torch.Generator().manual_seed(0)
rows, cols, T = 37, 129, 33
cases = {
    "layer_norm": (lambda x, w, b, be=None: ops.layer_norm(x, w, b, backend=be), layer_norm_reference,
                   [torch.randn(rows, cols, generator=gen), torch.randn(cols, generator=gen), torch.randn(cols, generator=gen)]),
    "bias_gelu": (lambda x, b, be=None: ops.bias_gelu(x, b, backend=be), lambda x, b: bias_gelu_reference(x, b, "tanh"),
                  [torch.randn(rows, cols, generator=gen) * 2, torch.randn(cols, generator=gen)]),
    "causal_softmax": (lambda s, be=None: ops.causal_softmax(s, backend=be), causal_softmax_reference,
                       [torch.randn(3, T, T, generator=gen) * 4]),
}
parity = {}
for name, (op, reference, inputs) in cases.items():
    for dtype in (torch.float32, torch.bfloat16):
        cast = [t.to(dtype) for t in inputs]
        with ops.poison_outputs():
            got = forward_backward(lambda *a: op(*a, be="emulate"), cast)
        want = forward_backward(reference, [t.double() for t in cast])
        errors = [max_error(a, b) / b.abs().max().item() for a, b in zip(got, want)]  # relative to the values
        parity[(name, str(dtype)[6:])] = errors
        print(f"{name:<15} {str(dtype)[6:]:<9} max |kernel - reference| / max |reference|: output {errors[0]:.1e}, "
              f"gradients {', '.join(f'{e:.1e}' for e in errors[1:])}; NaN left: {any(torch.isnan(t).any().item() for t in got)}")

# %% [markdown]
# The references run in float64 on the same inputs, so these are the kernels' own rounding errors:
# a few fp32 ulps, and for bf16 at most half a bf16 step (2^-9 ≈ 2e-3 of the value) per rounding.
#
# ### 4. The fused Adam step, against `torch.optim.AdamW`
#
# Five tensors of odd sizes go into **one** launch per step (a chunk table tells each block which
# tensor and which slice it owns), for five steps:

# %%
sizes = [1, 7, 33, 1000, 4099]
gen = torch.Generator().manual_seed(1)
start = [torch.randn(n, generator=gen) for n in sizes]
grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(5)]
hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)

mine = [p.clone() for p in start]
m, v = [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes]
for step, g in enumerate(grads, 1):
    with ops.poison_outputs():
        fused_adam_step(mine, g, m, v, step=step, backend="emulate", **hyper)

theirs = [torch.nn.Parameter(p.clone()) for p in start]
adamw = torch.optim.AdamW(theirs, **hyper)
for g in grads:
    for p, gi in zip(theirs, g):
        p.grad = gi
    adamw.step()
adam_error = max(max_error(a, b.detach()) for a, b in zip(mine, theirs))
state_error = max(max_error(a, adamw.state[p]["exp_avg_sq"]) for a, p in zip(v, theirs))
print(f"fused Adam (emulated) vs torch.optim.AdamW after 5 steps: params {adam_error:.1e}, exp_avg_sq {state_error:.1e}")

# %% [markdown]
# The parameters differ by at most one fp32 ulp. The kernel's `sqrtf` is correctly rounded, and
# torch's CPU `sqrt` is not always (`tests/test_kernels_adam_sign.py` explains the ulp).
#
# ### 5. 1-bit Adam's packing
#
# The worker step of chapter 5's compressed all-reduce, as kernels: scale $= \lVert b\rVert/\sqrt n$,
# one bit per element (MSB first, $\text{sign}(0) = +1$), error $e \leftarrow b - \text{scale}\cdot\text{sign}(b)$.

# %%
b = torch.randn(1000, generator=torch.Generator().manual_seed(2))
b[::97] = 0.0
error = torch.zeros(1000)
with ops.poison_outputs():
    packed, scale = pack_with_error(b, error, backend="emulate")
    back = unpack_scaled(packed, torch.ones(1), backend="emulate")
print(f"{b.numel()} floats ({4 * b.numel()} B) -> {packed.numel()} B; bits equal torch's: {torch.equal(packed, pack_signs(b))}; "
      f"round trip = sign(b): {torch.equal(back, signs(b))}; error exact: {torch.equal(error, b - scale * signs(b))}")

# %% [markdown]
# ## Measure
#
# ### What the compiler says: PTX and registers
#
# `nvcc` compiles each file for Ampere (sm_80) and Hopper (sm_90). ptxas reports, for each kernel,
# the registers per thread and any **spills**. A spill is a value that did not fit in registers and
# went to local memory, which is DRAM behind the caches: extra bytes in a kernel whose only job is to
# move few bytes. Every kernel here has zero spills. The PTX of bias + GeLU's forward shows the
# vector loads (`ld.global.v4.f32`) that the packs of four compile to.

# %%
reports = {}
if HAVE_NVCC:
    for cu in sorted(emulate.KERNELS.glob("*.cu")):
        for arch in (80, 90):
            reports[(cu.stem, arch)] = kernels_compile.compile_report(cu.stem, arch)
    print(kernels_compile.report_table(reports))
    text = kernels_compile.ptx("bias_gelu", 90)
    vector_lines = [line.strip() for line in text.splitlines() if "ld.global.v4.f32" in line or "st.global.v4.f32" in line]
    print("\nbias_gelu.cu, sm_90 PTX, the packed loads and stores:", *vector_lines[:4], sep="\n  ")
else:
    print("nvcc is not installed here: the compile report is skipped (the CI machine has it)")

# %% [markdown]
# ### The roofline, from the kernels' own headers
#
# Each point is a fused kernel: its flops per byte and the rate it would reach at the full memory
# bandwidth. The hollow points are the same ops done unfused, as eager torch sequences
# (`ds_lab.lab.kernels.UNFUSED` lists the passes). Fusion moves an op to the right along the
# bandwidth line: the same flops from fewer bytes. (torch's own `F.layer_norm` and `softmax` are
# already single kernels; the unfused rows count the textbook sequence of eager ops, which is what
# a model written op by op runs, and what `torch.optim.AdamW(foreach=True)` still runs for Adam.)

# %%
points = roofline_points()
shown = {k: p for k, p in points.items() if k.endswith("f32") or k in ("sign_pack_with_error",)}
fig = draw_roofline(shown, UNFUSED)
plt.show()
print("| op (fp32) | fused B/elem | unfused B/elem | bound at 100 M elements, H100: fused | unfused |")
print("|---|---:|---:|---:|---:|")
for name, (label, unfused_bytes) in UNFUSED.items():
    p = points[name]
    fused_t = bound_seconds(100_000_000, p["bytes"], p["flops"])
    unfused_t = bound_seconds(100_000_000, unfused_bytes, p["flops"])
    print(f"| {name} | {p['bytes']:.0f} | {unfused_bytes} ({label}) | {fused_t * 1e6:.0f} us | {unfused_t * 1e6:.0f} us |")

# %% [markdown]
# ### On a GPU
#
# With a GPU and CuPy, the same ops run `kernels/*.cu` for real (the default backend there). The
# cell below times them against torch eager. Without a GPU, it says so and runs nothing.
# `scripts/gpu_check.sh` runs the full GPU parity tests and `benchmarks/kernels_gpu.py` (fused Adam
# against `AdamW(foreach=True)` and `fused=True`, each op's effective bandwidth against a measured
# device-to-device copy) and writes a table.

# %%
if HAVE_GPU:
    x = torch.randn(8192, 4096, device="cuda")
    bias = torch.randn(4096, device="cuda")
    for name, fn in (("ds_lab bias_gelu", lambda: ops.bias_gelu(x, bias, backend="cuda")),
                     ("torch gelu(x + b)", lambda: torch.nn.functional.gelu(x + bias, approximate="tanh"))):
        fn(); torch.cuda.synchronize()
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
        for _ in range(20):
            fn()
        end_event.record(); torch.cuda.synchronize()
        ms = start_event.elapsed_time(end_event) / 20
        print(f"{name:<20} {ms:.3f} ms, {8 * x.numel() / ms / 1e9:.0f} GB/s at 8 B/element")
else:
    print("No GPU with CuPy here: nothing to time. On a GPU machine run scripts/gpu_check.sh; "
          "benchmarks/RESULTS.md records what it measured.")

# %% [markdown]
# ## Compare with theory
#
# ### Assertions: measured vs theory

# %%
# 1. The emulated block reduce: the printed partial sums are the grid-stride sums; the total is exact
assert "block 0 thread 0: my grid-stride partial sum is 3592" in printed
assert out.sum().item() == x.sum().item() == 500500
# 2. Parity, relative to the values: fp32 within 1e-5 of the float64 reference, bf16 within 1e-2
for (name, dtype), errors in parity.items():
    limit = 1e-5 if dtype == "float32" else 1e-2
    assert all(e < limit for e in errors), (name, dtype, errors)
# 3. Fused Adam equals AdamW to one fp32 ulp of the parameters (|p| < 4: 4.8e-7)
assert adam_error <= 4.8e-7 and state_error <= 1e-9
# 4. The sign pack: bits, round trip and error feedback exact
assert torch.equal(packed, pack_signs(b)) and torch.equal(back, signs(b)) and torch.equal(error, b - scale * signs(b))
# 5. The compile report: every kernel builds for sm_80 and sm_90 without spills
if HAVE_NVCC:
    for (name, arch), report in reports.items():
        for kernel, r in report.items():
            assert r.spill_stores == 0 and r.spill_loads == 0, (name, arch, kernel)
            assert not r.entry or r.registers > 0, (name, arch, kernel)
    assert vector_lines, "bias_gelu's packs of four should compile to vector loads"
# 6. The roofline: every fused kernel is memory-bound on an H100 and an A100, and fusion cuts its bytes
for spec in GPUS.values():
    ridge = spec["peak"] / spec["bandwidth"]
    assert all(p["intensity"] < ridge for p in points.values())
assert all(points[name]["bytes"] < unfused for name, (_, unfused) in UNFUSED.items())
assert points["fused_adam_f32"]["bytes"] == 28 and UNFUSED["fused_adam_f32"][1] / 28 == 3.0
print("kernels: parity, fused Adam, packing, compile report and roofline claims hold")

# %% [markdown]
# ## Exercises
#
# 1. **Print from a warp.** Add a `printf` after `warp_sum` in a copy of `block_sum.cu` (load it
#    with `emulate.Library(path)`). Which lanes hold the warp's total after the `__shfl_xor_sync`
#    butterfly, all of them or lane 0 only? Why does the kernel use lane 0?
# 2. **Break it.** Remove the `__syncthreads()` from your copy and run it many times. The
#    emulation may still give the right sum. Why is the kernel wrong all the same? (Read "what is
#    not modelled" at the top of `kernels/emu/cuda_emu.h`.)
# 3. **Count the bytes of LayerNorm backward.** The header says 12 B per element in fp32. Which
#    tensors are read and written? Where do the dweight/dbias partials go, and why do they not count?
# 4. **Unaligned input.** Call `ops.bias_gelu(x[1:], b, backend="emulate")` on a flattened view that
#    starts one element into its storage. Which loop runs? Check in `bias_gelu.cu`.
# 5. **Adam's bytes.** bf16 parameters with fp32 masters move 28 B per element too (the header of
#    `fused_adam.cu`). Count them. How much would keeping `m` and `v` in bf16 save?
#
# ## Summary
#
# - Elementwise and row ops are memory-bound: their best time is bytes / bandwidth, and fusing a
#   sequence of them into one kernel divides the bytes. Adam goes from 84 B to 28 B per element,
#   bias + GeLU from 16 to 8.
# - `kernels/*.cu` are plain CUDA. nvcc builds them for sm_80 and sm_90 with zero spills, and the
#   registers are recorded. The CPU emulation runs the same source unchanged, so every kernel,
#   forward and backward, fp32 and bf16, is checked against torch in CI without a GPU.
# - The engine uses the kernels where they can run. On a GPU with CuPy (`"fused_kernels"`, on by
#   default), Adam's step, the GPT's LayerNorms and bias + GeLU, and 1-bit Adam's packing run
#   `kernels/*.cu`; on a CPU they run torch, never an error.
# - How close each kernel gets to the bandwidth limit is measured on a GPU by `scripts/gpu_check.sh`;
#   `benchmarks/RESULTS.md` says what has been measured so far.
