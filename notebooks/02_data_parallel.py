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
# # 2 · Data parallelism
#
# *Source article §2.1, §3.1 and §4.1. Skeleton: Goal · The idea · Run it · Measure · Compare
# with theory · Exercises · Summary.*
#
# ## Goal
#
# Train one model on N processes so that it learns **exactly** what one process learns from the
# same global batch. Measure what that costs on the wire, and predict it with the α–β cost model.
# Then see why PyTorch's DDP, and ds_lab, send gradients in a few large buckets *while backward is
# still running*, instead of one tensor at a time after it, and what DeepSpeed does instead.

# %% [markdown]
# ## The idea
#
# Each of the N ranks holds a full copy of the model: weights, gradients and optimizer states,
# all 16Ψ bytes from chapter 1. Each rank trains on its own slice of the global batch. After
# backward, rank *r* holds $g_r$, the mean gradient over its slice. When the slices are the same
# size, their average
#
# $$g = \frac{1}{N}\sum_{r=0}^{N-1} g_r$$
#
# is exactly the mean gradient over the whole global batch. So every rank applies the update one
# process would apply to the whole batch, and the copies stay identical. The average is one
# **all-reduce** of all the gradient bytes per optimizer step. With the ring algorithm each rank
# sends $2\frac{N-1}{N}$ times the gradient bytes: a reduce-scatter and an all-gather,
# $\frac{N-1}{N}$ each. For large N that is the ZeRO paper's "2Ψ".
#
# ### What an all-reduce costs: the α–β model
#
# A ring all-reduce of *M* bytes over *N* ranks runs in 2(N−1) steps; in each, every rank sends
# *M*/*N* bytes to its neighbour. With α the fixed cost of a step (latency) and β the link's
# bandwidth:
#
# $$t(M, N) = \underbrace{2(N-1)\,\alpha}_{\text{latency: grows with } N}
#           + \underbrace{2\tfrac{N-1}{N}\,\frac{M}{\beta}}_{\text{bandwidth: tends to } 2M/\beta}$$
#
# Two consequences drive everything in this chapter:
#
# - **At a fixed global batch, compute per rank falls as 1/N, traffic does not.** Each rank
#   computes on 1/N of the batch, but still all-reduces the whole gradient; its bandwidth term
#   barely moves and its latency term grows. Adding ranks shrinks the part communication can hide
#   behind.
# - **Messages cost α each; bytes cost 1/β wherever they go.** Sending the gradient as *k* messages
#   (one per tensor) pays the latency term *k* times and the bandwidth term once:
#   $t_k = k \cdot 2(N-1)\alpha + 2\frac{N-1}{N}\frac{M}{\beta}$. Buckets cut *k* from the number of
#   tensors to a handful.
#
# With the numbers of a real cluster (assumptions, stated: α = 10 µs per step, β = 25 GB/s per GPU,
# a 200 Gb/s NIC; A100s at 40 % of 312 TFLOP/s), GPT-2's 1.5 B parameters, bf16 gradients (2Ψ
# bytes), a global batch of 512 sequences of 1,024 tokens, sent as one message per tensor
# (12 per layer + 4: 580 for GPT-2's 48 layers) or in DeepSpeed's 500 M-element buckets (3):
# The batch arithmetic is DeepSpeed's:
#
# $$\text{train\_batch\_size} = \text{micro batch per GPU} \times \text{gradient accumulation steps} \times N$$
#
# The article's §4.1 writes the global batch as $B \times P$. That is the special case with no
# gradient accumulation.
#
# > **Where the article is wrong or misleading**
# >
# > - §2.1 lists data parallelism as a kind of *model* parallelism. It is the opposite: data
# >   parallelism splits the **batch** and *replicates* the model, while model parallelism (tensor,
# >   pipeline; chapter 4) splits the **model**. The difference matters because data parallelism
# >   does nothing for memory. Every rank still holds all 16Ψ bytes, as we measure below, and
# >   that is why ZeRO (chapter 3) exists.
# > - §3.1 says DeepSpeed's model parallelism "is based on PyTorch's `DistributedDataParallel`"
# >   and is set up with `deepspeed.init()`. DeepSpeed's engine does not wrap the model in DDP. It
# >   reduces the gradients itself: without ZeRO, in large buckets after backward (the box in
# >   "2. The engine" below quotes the code); with ZeRO, through the ZeRO optimizer's own hooks
# >   (chapter 3). Its model parallelism is tensor parallelism
# >   (Megatron-style, passed in as `mpu`) and pipeline parallelism (`deepspeed.pipe.PipelineModule`),
# >   and neither one is DDP. The entry point is `deepspeed.initialize(...)`, which the article's
# >   own code block calls. There is no `deepspeed.init()`.
# > - §3.1's `engine.zero.Init(module=model)` fails in DeepSpeed: the engine has no `zero`
# >   attribute (`'DeepSpeedEngine' object has no attribute 'zero'`). What exists is
# >   `deepspeed.zero.Init`, used before `initialize`: usually as a context manager you *build the
# >   model inside* (`with deepspeed.zero.Init(...): model = Model()`), so that no rank ever
# >   materializes the whole model; or as `deepspeed.zero.Init(module=model)`, which partitions a
# >   model already built. ds_lab has both (chapter 3). ZeRO itself is switched on by the config's
# >   `zero_optimization.stage`.

# %%
# %matplotlib inline
import functools
import math
import statistics

import torch
import matplotlib.pyplot as plt

import ds_lab
from ds_lab import comm
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.lab import bucket_sizes, data_parallel_train
from ds_lab.lab.alpha_beta import (all_reduce_seconds, data_parallel_step, fit_per_message, ring_against_gloo,
                                   time_all_reduces)
from ds_lab.lab.naive_dp import naive_data_parallel
from ds_lab.models import GPT, GPTConfig
from ds_lab.monitor import Dashboard
from ds_lab.zero.estimate import estimate_ledger

MODEL = dict(n_layer=2, n_head=4, n_embd=128, block_size=64)
GLOBAL_BATCH = 16         # sequences per optimizer step, whatever the number of ranks
STEPS = 8
# The engine's reduce_bucket_size, in elements. DeepSpeed's default, 5e8, is larger than every
# model in this course: it would put all gradients in one bucket, and one bucket cannot overlap
# with backward. 100,000 cuts this model into a few buckets, as 5e8 cuts a model of billions.
BUCKET = 100_000
PSI = GPT(GPTConfig(**MODEL)).num_parameters()
GRAD_BYTES = 4 * PSI      # fp32 gradients: what every step has to average over the ranks

# The global batches, drawn once: every run below trains on exactly these, on any number of ranks.
loader = DistributedLoader(corpus_tokens(), MODEL["block_size"], GLOBAL_BATCH, seed=0)
batches = [loader.batch(i)["input_ids"] for i in range(STEPS)]


def theory(world_size):
    """What each rank should hold and send per step (stage 0, fp32 Adam), for the dashboard."""
    memory = estimate_ledger(PSI, world_size, stage=0, precision="fp32")
    memory.pop("total")
    per_step = 2 * (world_size - 1) / world_size * GRAD_BYTES
    return {"memory": memory, "comm": {"per_step_bytes": per_step, "label": "ring-model bytes 2(N-1)/N x 4Ψ"}}


print(f"Ψ = {PSI:,} parameters, gradient bytes 4Ψ = {GRAD_BYTES:,}")

# %%
GPT2_PSI, GPT2_TENSORS, GPT2_TOKENS = 1.5e9, 12 * 48 + 4, 512 * 1024
CLUSTER = dict(alpha=10e-6, beta=25e9, flops_per_second=0.4 * 312e12)   # assumptions, not measurements
DS_BUCKETS = math.ceil(GPT2_PSI / 5e8)                                  # DeepSpeed's stage-0 bucket: 5e8 elements
print(f"{'N':>5}{'compute (s)':>13}{'bandwidth (s)':>15}{'latency, 580 msgs':>19}{'latency, 3 buckets':>20}")
for world_size in (8, 64, 512):
    per_tensor = data_parallel_step(GPT2_PSI, GPT2_TOKENS, world_size, GPT2_TENSORS, **CLUSTER)
    bucketed = data_parallel_step(GPT2_PSI, GPT2_TOKENS, world_size, DS_BUCKETS, **CLUSTER)
    print(f"{world_size:>5}{per_tensor['compute']:>13.3f}{per_tensor['bandwidth']:>15.3f}"
          f"{per_tensor['latency']:>19.3f}{bucketed['latency']:>20.4f}")

# %% [markdown]
# At 8 GPUs compute dwarfs communication either way. At 512, compute per GPU is down to 74 ms,
# while the bandwidth term has *grown* a little (to 0.24 s) and 580 messages pay 6 s of latency:
# 80 times the compute. Buckets cut that to 31 ms. (NCCL switches to tree algorithms at large N,
# whose latency grows like log N; the ring's bandwidth term stays.) We measure both terms on gloo
# below.


# %% [markdown]
# ## Run it
#
# ### 1. Naive data parallelism, written by hand
#
# Plain PyTorch with one addition: after `loss.backward()`, all-reduce each parameter's gradient
# and divide by N. That is the whole step below. Every collective goes through `ds_lab.comm`,
# which records it (op, bytes, seconds). What the chapter measures around the step (its time, its
# collectives, and the spans and memory the dashboard draws) is gathered from outside, by
# `ds_lab.lab.naive_dp.naive_data_parallel`, which builds the same GPT and AdamW on every rank and
# calls this step on the rank's rows of each global batch.

# %%
def naive_step(model, optimizer, x, world_size):
    """One step of naive data parallelism, on every rank: plain PyTorch plus one all-reduce per tensor."""
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    for p in model.parameters():  # after backward, one tensor at a time
        comm.all_reduce(p.grad)   # sum over ranks...
        p.grad /= world_size      # ...then the mean: the gradient of the global batch
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the engine does (gradient_clipping 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss


# %%
dash = Dashboard("Naive data parallel, 2 ranks: one all-reduce per tensor, after backward", theory=theory(2))
naive = ds_lab.launch(naive_data_parallel, 2, naive_step, batches, MODEL, dashboard=dash)

# %%
r = naive[0]
print(f"parameter tensors:          {r['tensors']}")
print(f"collectives per step:       {r['collectives']}")
print(f"bytes all-reduced per step: {r['bytes'][0]:,}   (gradient bytes 4Ψ = {GRAD_BYTES:,})")
print(f"median step time:           {1e3 * statistics.median(r['step_seconds'][1:]):.1f} ms\n")
print(comm.format_summary(r["summary"]))


# %% [markdown]
# It trains, and it is correct. But it has two costs that grow with scale:
#
# - **One collective per tensor.** Each all-reduce pays a fixed latency (a ring all-reduce takes
#   2(N−1) hops) however small the tensor is. The table above shows messages of a few hundred
#   bytes (LayerNorm weights and biases) paying the same per-call price as the large matrices.
# - **Communication waits for all of backward.** While backward runs, the network sits idle.
#   While the gradients travel, the compute sits idle.
#
# ### 2. The engine: buckets, overlapped with backward
#
# `ds_lab.initialize` wraps the same model. Data parallelism (ZeRO stage 0) lives in
# `ds_lab/runtime/data_parallel.py` and works like PyTorch's DDP:
#
# - all gradients live in **one flat buffer**, laid out in *reverse* parameter order because
#   backward produces the last layer's gradients first, and each `param.grad` is a view into it;
# - the buffer is cut into **buckets** of `reduce_bucket_size` elements;
# - a hook fires as each gradient is ready. When a bucket is complete, its all-reduce starts
#   **asynchronously**, while backward goes on computing the earlier layers
#   (`overlap_comm: true`).
#
# > **This is not what DeepSpeed's stage 0 does.** Without ZeRO, DeepSpeed starts no communication
# > from gradient hooks and overlaps nothing. In `deepspeed/runtime/engine.py` (0.19.8),
# > `DeepSpeedEngine.backward` runs `_backward_epilogue()` once backward is over (after
# > `loss.backward()` returns; with the bf16 optimizer, from a hook that fires when every gradient
# > is ready), and that calls `allreduce_gradients()`, which calls
# > `buffered_allreduce_fallback(elements_per_buffer=500000000)`, whose `allreduce_no_retain`
# > groups the `.grad` tensors into buckets of 500 M elements, and `allreduce_and_copy` flattens
# > each bucket into a new tensor, all-reduces it and copies the result back into every `.grad`.
# > `overlap_comm` and `reduce_bucket_size` are keys of the ZeRO section: they have no effect at
# > stage 0 (and DeepSpeed defaults `overlap_comm` to true only at stage 3). ds_lab's stage 0 is
# > DDP-like and does better than DeepSpeed's: buckets of `reduce_bucket_size`, overlapped with
# > backward, gradients as views (no flatten-and-copy). ds_lab reads both keys at stage 0 for
# > that reason, and `overlap_comm` unset means "on" at stage 0.
# >
# > **And DDP differs in two details.** Its `param.grad` is a view into the bucket only with
# > `DistributedDataParallel(..., gradient_as_bucket_view=True)`; by default the gradients are
# > copied into the buckets and back. And DDP rebuilds its buckets after the first iteration, in
# > the order the gradients actually became ready, where ds_lab keeps the reverse parameter order.
#
# Same model, same data, `reduce_bucket_size` = 100,000 elements. We run it twice: overlap on and
# overlap off. The worker is `ds_lab.lab.data_parallel_train` (read it in `ds_lab/lab/workers.py`:
# the naive loop above, with the engine's three calls in place of the all-reduce loop). It also
# records when backward produced its last gradient, so we can count how many buckets were already
# on the wire by then.
#
# The bucket sizes follow from the rule above, so we can predict them from the model alone
# (`ds_lab.lab.bucket_sizes`, which does not ask the engine): walk the parameters in reverse and
# close a bucket once it holds `reduce_bucket_size` elements. Their number is close to
# ⌈Ψ / reduce_bucket_size⌉: a bucket closes at the first tensor that reaches the size, so it can
# run past it by less than one tensor.

# %%
engine_data_parallel = functools.partial(data_parallel_train, model=MODEL, global_batch=GLOBAL_BATCH)
SIZES = [p.numel() for p in GPT(GPTConfig(**MODEL)).parameters()]
BUCKETS = bucket_sizes(GPT(GPTConfig(**MODEL)), BUCKET)   # elements per bucket, in sending order
print(f"parameter tensors: {len(SIZES)}, largest {max(SIZES):,} elements; Ψ / reduce_bucket_size = "
      f"{PSI / BUCKET:.2f}")
print(f"predicted buckets (elements): {BUCKETS}")


# %%
dash = Dashboard("ds_lab engine, 2 ranks: buckets, overlap_comm=True", theory=theory(2))
overlapped = ds_lab.launch(engine_data_parallel, 2, batches,
                           zero={"reduce_bucket_size": BUCKET, "overlap_comm": True}, dashboard=dash)

# %% [markdown]
# In the timeline above, each rank's comm lane shows its all-reduce bars *under* the backward bar,
# spread across it. Now with overlap off: the same buckets, all sent after backward has finished
# computing, so the comm bars bunch up at the end of each backward bar.

# %%
dash = Dashboard("ds_lab engine, 2 ranks: buckets, overlap_comm=False", theory=theory(2))
sequential = ds_lab.launch(engine_data_parallel, 2, batches,
                           zero={"reduce_bucket_size": BUCKET, "overlap_comm": False}, dashboard=dash)


# %% [markdown]
# ## Measure

# %%
def median_ms(run):
    return 1e3 * statistics.median(run["step_seconds"][1:])  # skip the first (warm-up) step


# "sent before last grad" and "lead": the last step (see the note on the first step below)
print(f"{'2 ranks':<26}{'collectives/step':>17}{'bytes/step':>12}{'step (ms)':>11}"
      f"{'sent before last grad':>23}{'lead (ms)':>11}")
print(f"{'naive (by hand)':<26}{naive[0]['collectives'][0]:>17}{naive[0]['bytes'][0]:>12,}"
      f"{median_ms(naive[0]):>11.1f}{0:>23}{'-':>11}")
for name, runs in (("engine, overlap on", overlapped), ("engine, overlap off", sequential)):
    r = runs[0]
    print(f"{name:<26}{r['collectives'][0]:>17}{r['bytes'][0]:>12,}{median_ms(r):>11.1f}"
          f"{r['sent_early'][-1]:>23}{r['lead_ms'][-1]:>11.1f}")
print(f"\nengine messages (bytes) in the last step: {overlapped[0]['messages'][-1]}")
print(f"predicted: {len(BUCKETS)} buckets x 4 bytes = {[4 * b for b in BUCKETS]} (Ψ = {PSI:,}, {BUCKET:,} per bucket)")
print(comm.format_summary(overlapped[0]["summary"]))

# %% [markdown]
# - **Fewer, bigger collectives.** The engine issues one all-reduce per bucket instead of one per
#   tensor, and sends the same bytes (all gradients, once).
# - **Reading the latency columns.** An overlapped all-reduce is timed from the moment it is
#   issued until it completes. That includes the time it waits for the other rank to reach the
#   same bucket, which is still busy with backward. Its "latency" is mostly waiting, not wire
#   time.
# - **Overlap.** With `overlap_comm` on, all buckets but the last are already on the wire when
#   backward produces its last gradient ("lead" is how much earlier the first bucket left).
#   With it off, none are. The first step is the exception: the engine sends nothing until the
#   end of its first backward, because it is counting how many gradient contributions each
#   parameter receives (more than one under reentrant activation checkpointing; see
#   `ds_lab/runtime/ready.py`). A bucket sent before its last contribution would be wrong.
# - **Step time depends on the hardware.** On a GPU, NCCL runs each collective as a kernel on a
#   few of the GPU's SMs (its channels), on its own stream, *alongside* backward's kernels on the
#   other SMs; the copy engines that serve `cudaMemcpy` are not what moves its data. The two
#   kernels share the GPU, each a little slower, but the network or NVLink transfer proceeds while
#   backward computes, so overlap hides most of the communication. That is why DDP (and ds_lab, and
#   DeepSpeed's ZeRO stages) do it. Here, with gloo on a CPU, "communication" is memory
#   copies and additions done by the same few cores that run backward. With 2 ranks sharing 2
#   cores there is little idle hardware to hide it in. The gap between the two engine runs here
#   is small and changes from run to run, and it can even reverse. Run both on GPUs to see what
#   overlap is for.
#
# ### Why buckets: the α–β model, measured on gloo
#
# The naive loop sent 28 messages per step, the engine 4, the same bytes. The α–β model says the
# difference is (28 − 4) × 2(N−1)α. Measure it directly: 2 ranks all-reduce the same 4Ψ bytes as
# *k* equal messages, for several *k*, and we fit $t = k\,a + b$. Here *a* is the cost of one
# message, 2(N−1)α in the model; on gloo over loopback that is mostly software overhead per call,
# not a wire's latency. *b* is the part every *k* pays: the bandwidth term.

# %%
MESSAGE_COUNTS = (1, 4, 16, 64, 256)
timings = ds_lab.launch(time_all_reduces, 2, PSI, MESSAGE_COUNTS)[0]
per_message, rest = fit_per_message(list(timings), list(timings.values()))
alpha_gloo = per_message / 2                      # 2(N-1) = 2 ring steps per message at N = 2
beta_gloo = (2 * 1 / 2) * GRAD_BYTES / rest if rest > 0 else float("inf")
print(f"fit: {1e6 * per_message:.0f} µs per message (α ≈ {1e6 * alpha_gloo:.0f} µs per ring step), "
      f"b = {1e3 * rest:.2f} ms for {GRAD_BYTES:,} bytes")
print(f"{'messages k':>11}{'measured (ms)':>15}{'model k·a + b (ms)':>20}")
for k, seconds in timings.items():
    print(f"{k:>11}{1e3 * seconds:>15.2f}{1e3 * (k * per_message + rest):>20.2f}")
print(f"\nthe α–β model for this chapter's two step shapes at N = 2: {len(SIZES)} messages "
      f"{1e3 * all_reduce_seconds(GRAD_BYTES, 2, alpha_gloo, beta_gloo, len(SIZES)):.2f} ms, "
      f"{len(BUCKETS)} buckets {1e3 * all_reduce_seconds(GRAD_BYTES, 2, alpha_gloo, beta_gloo, len(BUCKETS)):.2f} ms")

fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot(list(timings), [1e3 * t for t in timings.values()], "o", label="measured (gloo, 2 ranks)")
ax.plot(list(timings), [1e3 * (k * per_message + rest) for k in timings], "--", label="fit k·a + b")
ax.set(xscale="log", yscale="log", xlabel=f"messages k (same {GRAD_BYTES:,} bytes in total)",
       ylabel="all-reduce time (ms)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# The time grows with the number of messages, not with the bytes, which are the same in every
# row: the latency term at work. Each figure is the fastest of 7 tries (other processes on a
# shared machine only ever add time), and they still move from run to run, so the chapter reports
# them and asserts none; the shape, a fixed cost per message on top of a fixed cost for the
# bytes, is the model's.
#
# ### Same answer as one process
#
# Now the claim that matters most. One process trains on the whole global batch of 16 (micro
# batch 16, no accumulation). Two ranks train with micro batch 4 and 2 accumulation steps:
# 4 × 2 × 2 = 16, the same global batch, and the same seed. The loss of a step is the mean over
# its micro-batches and ranks.

# %%
dash = Dashboard("One process, the whole global batch")
single = ds_lab.launch(engine_data_parallel, 1, batches, dashboard=dash)[0]
dash = Dashboard("2 ranks x 2 accumulation steps x micro batch 4", theory=theory(2))
accumulated = ds_lab.launch(engine_data_parallel, 2, batches, accumulation=2,
                            zero={"reduce_bucket_size": BUCKET}, dashboard=dash)

# %%
dp_losses = [statistics.fmean(r["losses"][step] for r in accumulated) for step in range(STEPS)]
relative = [abs(a - b) / abs(b) for a, b in zip(dp_losses, single["losses"])]
print(f"one process:  micro {single['micro_batch']} x accumulation 1 x 1 rank  = {GLOBAL_BATCH}")
print(f"data parallel: micro {accumulated[0]['micro_batch']} x accumulation 2 x 2 ranks = "
      f"{accumulated[0]['micro_batch'] * 2 * 2}")
print(f"largest relative loss difference over {STEPS} steps: {max(relative):.1e}")

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(range(STEPS), single["losses"], "-", lw=4, alpha=0.4, label="1 process, batch 16")
ax.plot(range(STEPS), dp_losses, "o--", label="2 ranks x 2 accumulation x micro 4")
ax.set(xlabel="optimizer step", ylabel="loss (mean over the global batch)",
       title="Data parallel = one process, step for step")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# The two curves lie on top of each other. The only differences are float rounding, because
# summing over ranks adds the same numbers in a different order.
#
# ### Traffic at N = 4
#
# The same engine on 4 ranks (micro batch 16 / 4 = 4) for a few steps. The dashboard's comm panel
# draws the theory as a dashed line: 2(N−1)/N × 4Ψ bytes per step, times the steps run. Its bars
# are ring-model bytes too (each recorded message × 2(N−1)/N; "Compare with theory" measures real
# ones). The solid bar above that line is the broadcast of rank 0's weights at start-up (4Ψ,
# once), which the engine does so that every rank starts from the same weights.

# %%
dash = Dashboard("ds_lab engine, 4 ranks: data parallel", theory=theory(4))
four = ds_lab.launch(engine_data_parallel, 4, batches[:4], zero={"reduce_bucket_size": BUCKET}, dashboard=dash)

# %% [markdown]
# ## Compare with theory

# %%
print(f"{'N':>2}{'grad bytes/step':>17}{'4Ψ':>11}{'ring-model bytes/step':>23}{'2(N-1)/N x 4Ψ':>16}")
for world_size, runs in ((2, overlapped), (4, four)):
    r = runs[0]
    expected_wire = 2 * (world_size - 1) / world_size * GRAD_BYTES
    print(f"{world_size:>2}{r['bytes'][0]:>17,}{GRAD_BYTES:>11,}{r['wire_bytes'][0]:>23,.0f}{expected_wire:>16,.0f}")

memory = four[0]["memory"]
states = {category: memory[category] for category in ("params", "grads", "master_params", "optimizer_states")}
print(f"\nrank 0 of 4 holds {sum(states.values()):,} bytes of model states = "
      f"{sum(states.values()) / PSI:.0f} x Ψ: data parallelism does not divide memory")
print(f"census of the fp32 tensors rank 0 created: {four[0]['census']}")

# %% [markdown]
# The recorded message is the whole gradient, 4Ψ bytes, once per optimizer step. That holds with
# accumulation too: the engine communicates only on the boundary micro-step. The "ring-model
# bytes" column is not a measurement: gloo does not report what it sends, so `ds_lab.comm`
# multiplies the message it recorded by the ring's factor 2(N−1)/N, and it cannot disagree with
# the formula. To measure what a ring really sends, we run one: `ds_lab.comm.ring.ring_all_reduce`
# is a ring all-reduce built from `send`/`recv`, and it returns the sum of the bytes its sends
# carried. Here it all-reduces a gradient-sized tensor (Ψ fp32 elements, whole numbers so that any
# order of addition gives the same sum) at N = 2, 3 and 4, beside gloo's `all_reduce` of the same
# tensor.

# %%
ring_runs = {n: ds_lab.launch(ring_against_gloo, n, PSI) for n in (2, 3, 4)}
print(f"{'N':>2}{'message 4Ψ':>12}{'sent by the ring (measured)':>29}{'2(N-1)/N x 4Ψ':>16}{'= gloo result':>15}")
for n, runs in ring_runs.items():
    print(f"{n:>2}{runs[0]['message']:>12,}{runs[0]['sent']:>29,}{2 * (n - 1) * GRAD_BYTES // n:>16,}"
          f"{str(all(r['equal'] for r in runs)):>15}")

# %% [markdown]
# Each rank sends exactly 2(N−1)/N × 4Ψ bytes (Ψ is divisible by 2, 3 and 4 here, so the N chunks
# are equal), and the ring's sum equals gloo's to the bit: 1× the message at N = 2, 1.5× at N = 4,
# approaching 2× as N grows. Per-rank traffic stays almost constant as you add ranks, which is
# why data parallelism scales. Per-rank memory stays constant too, at 16Ψ, which is why it
# doesn't scale to big models on its own.
#
# ### Assertions: measured vs theory

# %%
# Data parallel gives the same losses as one process on the same global batch (within 1e-5 relative),
# and the hand-written naive version agrees with the engine the same way.
assert single["micro_batch"] == GLOBAL_BATCH and accumulated[0]["micro_batch"] * 2 * 2 == GLOBAL_BATCH
assert max(relative) <= 1e-5, relative
naive_losses = [statistics.fmean(r["losses"][step] for r in naive) for step in range(STEPS)]
engine_losses = [statistics.fmean(r["losses"][step] for r in overlapped) for step in range(STEPS)]
assert max(abs(a - b) / abs(b) for a, b in zip(naive_losses, engine_losses)) <= 1e-5
print(f"data parallel vs one process: max relative loss difference {max(relative):.1e}")

# %%
# The gradient all-reduce messages of an optimizer step add up to the gradient bytes (4Ψ, fp32),
# counted here from the model's parameters: once per step, with or without accumulation, at
# N = 2 and N = 4, on every rank. The naive loop sends the same bytes.
for runs in (naive, overlapped, sequential, accumulated, four):
    for r in runs:
        assert r["bytes"] == [GRAD_BYTES] * len(r["bytes"]), r["bytes"]
print(f"gradient bytes all-reduced per step = {GRAD_BYTES:,} = 4Ψ, in every run")

# %%
# The naive version issues one collective per parameter tensor; the engine one per bucket, and
# its messages are exactly the buckets predicted from the model: several, fewer than the tensors.
n_tensors = len(list(GPT(GPTConfig(**MODEL)).parameters()))
assert all(r["collectives"] == [n_tensors] * STEPS for r in naive)
assert 1 < len(BUCKETS) < n_tensors
for runs in (overlapped, sequential, accumulated, four):
    for r in runs:
        assert r["messages"] == [[4 * b for b in BUCKETS]] * len(r["messages"]), r["messages"][0]
# With overlap_comm on, every bucket but the last is on the wire before backward produces its
# last gradient (from the second step: the first one counts the gradients); with it off, not one is.
assert all(r["sent_early"][1:] == [len(BUCKETS) - 1] * (STEPS - 1) for r in overlapped), \
    [r["sent_early"] for r in overlapped]
assert all(r["sent_early"] == [0] * STEPS for r in sequential)
# Data parallelism does not divide memory: each of 4 ranks holds all 16Ψ bytes of model states
# (fp32: weights 4Ψ + gradients 4Ψ + Adam 8Ψ), by the ledger and by a census of its tensors.
for r in four:
    m = r["memory"]
    assert m["params"] + m["grads"] + m["master_params"] + m["optimizer_states"] == 16 * PSI
    assert r["census"] == {"float32": 16 * PSI}, r["census"]
print(f"naive: {n_tensors} collectives/step; engine: {len(BUCKETS)} (one per bucket)")

# %%
# The bucket count, computed here from the parameter sizes alone (not by the engine, not by
# bucket_sizes): the 4 buckets the text names, within one of ceil(Ψ / reduce_bucket_size), and
# each bucket past reduce_bucket_size by less than its last tensor.
buckets_here, filled = 0, BUCKET
for numel in reversed(SIZES):
    if filled >= BUCKET:
        buckets_here, filled = buckets_here + 1, 0
    filled += numel
assert buckets_here == len(BUCKETS) == 4 and len(SIZES) == n_tensors == 28
assert abs(buckets_here - math.ceil(PSI / BUCKET)) <= 1 and sum(BUCKETS) == PSI
assert all(BUCKET <= b < BUCKET + max(SIZES) for b in BUCKETS[:-1])
# Wire bytes, measured on a ring built from send/recv: exactly 2(N-1)/N x 4Ψ on every rank, and
# the same sum as gloo's all_reduce, bit for bit.
for n, runs in ring_runs.items():
    assert all(r["sent"] * n == 2 * (n - 1) * GRAD_BYTES and r["equal"] for r in runs), runs
# The α–β figures the text quotes for GPT-2 on 512 GPUs: compute 74 ms per GPU, 0.24 s of
# bandwidth term, 580 messages' latency 80 times the compute, 3 buckets' 31 ms.
big = data_parallel_step(GPT2_PSI, GPT2_TOKENS, 512, GPT2_TENSORS, **CLUSTER)
assert round(big["compute"], 3) == 0.074 and round(big["bandwidth"], 2) == 0.24
assert round(big["latency"] / big["compute"]) == 80 and DS_BUCKETS == 3
assert round(data_parallel_step(GPT2_PSI, GPT2_TOKENS, 512, DS_BUCKETS, **CLUSTER)["latency"], 3) == 0.031
print(f"ring: sent = 2(N-1)/N x 4Ψ exactly at N = 2, 3, 4; buckets {BUCKETS} counted from the sizes")

# %% [markdown]
# ## Exercises
#
# Each exercise's code runs as printed in a new cell below this one.
#
# 1. **Bucket size.** Predict the collectives per step, and the buckets sent before the last
#    gradient, for `reduce_bucket_size` 10,000 and 10⁹ (one bucket). Why can a single bucket
#    never overlap with backward?
#    ```python
#    for size in (10_000, 10**9):
#        r = ds_lab.launch(engine_data_parallel, 2, batches[:3], zero={"reduce_bucket_size": size})[0]
#        print(size, len(bucket_sizes(GPT(GPTConfig(**MODEL)), size)), r["collectives"], r["sent_early"])
#    ```
# 2. **Accumulation.** 4 accumulation steps on 2 ranks (micro batch 2). Do the losses still match
#    one process, and does the all-reduce still run once per *optimizer* step?
#    ```python
#    runs = ds_lab.launch(engine_data_parallel, 2, batches, accumulation=4, zero={"reduce_bucket_size": BUCKET})
#    print(runs[0]["micro_batch"], runs[0]["collectives"],
#          max(abs(statistics.fmean(r["losses"][i] for r in runs) / single["losses"][i] - 1) for i in range(STEPS)))
#    ```
# 3. **bf16.** What happens to the gradient bytes per step, and to how closely the losses match
#    one process? (The test suite allows bf16 a few ulps.)
#    ```python
#    from ds_lab.lab import global_losses, zero_train
#    config = {"train_batch_size": GLOBAL_BATCH, "bf16": {"enabled": True},
#              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
#              "zero_optimization": {"stage": 0, "reduce_bucket_size": BUCKET}}
#    runs = ds_lab.launch(zero_train, 2, config, batches, MODEL)
#    print(sum(runs[0]["messages"][0]["grad_allreduce"]), GRAD_BYTES,
#          max(abs(a / b - 1) for a, b in zip(global_losses(runs), single["losses"])))
#    ```
# 4. **An odd world size.** A global batch of 24 on 3 ranks. What does 2(N−1)/N predict for the
#    bytes each rank sends, and what does the ring measure?
#    ```python
#    batches24 = [DistributedLoader(corpus_tokens(), MODEL["block_size"], 24, seed=0).batch(i)["input_ids"]
#                 for i in range(2)]
#    runs = ds_lab.launch(functools.partial(data_parallel_train, model=MODEL, global_batch=24), 3, batches24)
#    print(runs[0]["bytes"], runs[0]["wire_bytes"], [r["sent"] for r in ds_lab.launch(ring_against_gloo, 3, PSI)])
#    ```
# 5. **Why not overlap here?** Time the overlapped and the sequential engine again with more
#    steps. Then explain, from what the cores are doing, why overlap buys little on a 2-core CPU
#    and a lot on GPUs with NCCL.
#    ```python
#    for overlap in (True, False):
#        r = ds_lab.launch(engine_data_parallel, 2, batches * 3,
#                          zero={"reduce_bucket_size": BUCKET, "overlap_comm": overlap})[0]
#        print(overlap, f"{median_ms(r):.1f} ms")
#    ```
# 6. **α at four ranks.** The model says the cost per message grows as 2(N−1)α. Fit it at N = 4
#    and compare with the N = 2 fit above.
#    ```python
#    t4 = ds_lab.launch(time_all_reduces, 4, PSI, MESSAGE_COUNTS)[0]
#    print(f"{1e6 * fit_per_message(list(t4), list(t4.values()))[0]:.0f} µs per message at N = 4")
#    ```
#
# ## Summary
#
# - Data parallelism replicates the model and splits the batch. Averaging the gradients with one
#   all-reduce per optimizer step makes N ranks follow **exactly** the trajectory of one process
#   on the same global batch (micro batch × accumulation × N). We measured losses equal to
#   10⁻⁵ relative or better.
# - The all-reduce moves the whole gradient, 4Ψ bytes in fp32, once per step. Each rank sends
#   2(N−1)/N of that under the ring algorithm, measured on a ring built from send/recv, so
#   per-rank traffic hardly grows with N.
# - The α–β model: 2(N−1)α per message plus 2(N−1)/N·M/β. At a fixed global batch, compute per
#   rank falls as 1/N while neither term does; each message pays the latency term, so sending
#   the gradient in a few buckets instead of one message per tensor matters more as N grows.
# - Naive data parallelism sends one small collective per tensor after backward. ds_lab's engine,
#   like DDP, sends a few large buckets *during* backward. DeepSpeed's stage 0 does neither: it
#   all-reduces 500 M-element flattened buckets after backward.
# - Every rank still holds all 16Ψ bytes of model states, so data parallelism alone cannot train a
#   model that doesn't fit on one GPU. Chapter 3 (ZeRO) partitions those states across the ranks.
