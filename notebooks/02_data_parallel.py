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
# same global batch. Measure what that costs on the wire. Then see why DeepSpeed (like PyTorch's
# DDP) sends gradients in a few large buckets *while backward is still running*, instead of one
# tensor at a time after it.

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
# >   registers its own gradient hooks and reduces the gradients itself: a bucketed all-reduce
# >   without ZeRO, a reduce-scatter with it. That is what `ds_lab/runtime/data_parallel.py`
# >   re-implements and what you run below. Its model parallelism is tensor parallelism
# >   (Megatron-style, passed in as `mpu`) and pipeline parallelism (`deepspeed.pipe.PipelineModule`),
# >   and neither one is DDP. The entry point is `deepspeed.initialize(...)`, which the article's
# >   own code block calls. There is no `deepspeed.init()`.
# > - §3.1's `engine.zero.Init(module=model)` is not a DeepSpeed call either. `deepspeed.zero.Init`
# >   is a ZeRO-3 context manager that you *build the model inside*
# >   (`with deepspeed.zero.Init(...): model = Model()`), before `initialize`, so that no rank
# >   ever materializes the whole model. ZeRO itself is switched on by the config's
# >   `zero_optimization.stage`.

# %%
# %matplotlib inline
import functools
import statistics
import time

import torch
import matplotlib.pyplot as plt

import ds_lab
from ds_lab import comm
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.lab import bucket_sizes, data_parallel_train, rows_of
from ds_lab.models import GPT, GPTConfig
from ds_lab.monitor import Dashboard, events
from ds_lab.monitor.memory import ledger, optimizer_state_tensors
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
    return {"memory": memory, "comm": {"per_step_bytes": per_step, "label": "ring all-reduce 2(N-1)/N x 4Ψ"}}


print(f"Ψ = {PSI:,} parameters, gradient bytes 4Ψ = {GRAD_BYTES:,}")


# %% [markdown]
# ## Run it
#
# ### 1. Naive data parallelism, written by hand
#
# Plain PyTorch with one addition: after `loss.backward()`, all-reduce each parameter's gradient
# and divide by N. Every collective goes through `ds_lab.comm`, which records it (op, bytes,
# seconds, tag). The engine publishes its memory, loss and timeline events by itself. This
# hand-written loop publishes the same events explicitly, so that the dashboard can draw it too.

# %%
def naive_data_parallel(batches, lr=1e-3):
    """Runs on every rank: plain PyTorch, plus one all-reduce per parameter after backward."""
    rank, world_size = comm.get_rank(), comm.get_world_size()
    torch.manual_seed(0)  # the same seed on every rank: identical starting weights
    model = GPT(GPTConfig(**MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    out = dict(losses=[], step_seconds=[], collectives=[], bytes=[],
               tensors=len(list(model.parameters())))
    for step, batch in enumerate(batches):
        events.current_step = step  # stamps this step on the comm spans in the timeline
        mark = comm.record_count()
        t0 = time.time()
        x = rows_of(batch, rank, world_size)
        loss = model(input_ids=x, labels=x).loss
        t1 = time.time()
        loss.backward()
        t2 = time.time()
        for p in model.parameters():  # after backward, one tensor at a time
            comm.all_reduce(p.grad)   # sum over ranks...
            p.grad /= world_size      # ...then the mean: the gradient of the global batch
        t3 = time.time()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the engine does (gradient_clipping 1.0)
        optimizer.step()
        held = ledger({"params": model.parameters(), "grads": [p.grad for p in model.parameters()],
                       "optimizer_states": optimizer_state_tensors(optimizer)})
        optimizer.zero_grad()
        t4 = time.time()
        # What the engine publishes by itself, published by hand for the dashboard (the
        # all-reduces between t2 and t3 publish their own spans, through ds_lab.comm)
        for name, start, end in (("forward", t0, t1), ("backward", t1, t2), ("step", t3, t4)):
            events.span(name, "compute", start, end, step)
        events.publish("loss", dict(step=step, loss=loss.item()))
        events.publish("memory", dict(step=step, phase="step", time=t4, bytes=held))
        records = comm.get_log(since=mark)
        out["losses"].append(loss.item())
        out["step_seconds"].append(t4 - t0)
        out["collectives"].append(len(records))
        out["bytes"].append(sum(r.bytes for r in records))
    out["summary"] = comm.summarize()
    return out


# %%
dash = Dashboard("Naive data parallel, 2 ranks: one all-reduce per tensor, after backward", theory=theory(2))
naive = ds_lab.launch(naive_data_parallel, 2, batches, dashboard=dash)

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
# `ds_lab/runtime/data_parallel.py` and works like DDP and DeepSpeed's stage 0:
#
# - all gradients live in **one flat buffer**, laid out in *reverse* parameter order because
#   backward produces the last layer's gradients first, and each `param.grad` is a view into it;
# - the buffer is cut into **buckets** of `reduce_bucket_size` elements;
# - a hook fires as each gradient is ready. When a bucket is complete, its all-reduce starts
#   **asynchronously**, while backward goes on computing the earlier layers
#   (`overlap_comm: true`).
#
# Same model, same data, `reduce_bucket_size` = 100,000 elements. We run it twice: overlap on and
# overlap off. The worker is `ds_lab.lab.data_parallel_train` (read it in `ds_lab/lab/workers.py`:
# the naive loop above, with the engine's three calls in place of the all-reduce loop). It also
# records when backward produced its last gradient, so we can count how many buckets were already
# on the wire by then.
#
# The bucket sizes follow from the rule above, so we can predict them from the model alone
# (`ds_lab.lab.bucket_sizes`): walk the parameters in reverse and close a bucket once it holds
# `reduce_bucket_size` elements.

# %%
engine_data_parallel = functools.partial(data_parallel_train, model=MODEL, global_batch=GLOBAL_BATCH)
BUCKETS = bucket_sizes(GPT(GPTConfig(**MODEL)), BUCKET)   # elements per bucket, in sending order
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
# - **Step time depends on the hardware.** On a GPU, NCCL moves the data with its own engines and
#   the network while the GPU keeps computing, so overlap hides communication behind backward.
#   That is why DDP and DeepSpeed do it. Here, with gloo on a CPU, "communication" is memory
#   copies and additions done by the same few cores that run backward. With 2 ranks sharing 2
#   cores there is little idle hardware to hide it in. The gap between the two engine runs here
#   is small and changes from run to run, and it can even reverse. Run both on GPUs to see what
#   overlap is for.
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
# draws the theory as a dashed line: 2(N−1)/N × 4Ψ bytes per step, times the steps run. The
# solid bar above that line is the broadcast of rank 0's weights at start-up (4Ψ, once), which
# the engine does so that every rank starts from the same weights.

# %%
dash = Dashboard("ds_lab engine, 4 ranks: data parallel", theory=theory(4))
four = ds_lab.launch(engine_data_parallel, 4, batches[:4], zero={"reduce_bucket_size": BUCKET}, dashboard=dash)

# %% [markdown]
# ## Compare with theory

# %%
print(f"{'N':>2}{'grad bytes/step':>17}{'4Ψ':>11}{'wire bytes/step':>17}{'2(N-1)/N x 4Ψ':>16}")
for world_size, runs in ((2, overlapped), (4, four)):
    r = runs[0]
    expected_wire = 2 * (world_size - 1) / world_size * GRAD_BYTES
    print(f"{world_size:>2}{r['bytes'][0]:>17,}{GRAD_BYTES:>11,}{r['wire_bytes'][0]:>17,.0f}{expected_wire:>16,.0f}")

memory = four[0]["memory"]
states = {category: memory[category] for category in ("params", "grads", "master_params", "optimizer_states")}
print(f"\nrank 0 of 4 holds {sum(states.values()):,} bytes of model states = "
      f"{sum(states.values()) / PSI:.0f} x Ψ: data parallelism does not divide memory")
print(f"census of the fp32 tensors rank 0 created: {four[0]['census']}")

# %% [markdown]
# The recorded message is the whole gradient, 4Ψ bytes, once per optimizer step. That holds with
# accumulation too: the engine communicates only on the boundary micro-step. The bytes each rank
# actually sends under the ring algorithm are 2(N−1)/N of that: 1× at N = 2 and 1.5× at N = 4,
# approaching 2× as N grows. (gloo does not report what it sends: `wire_bytes` is that factor,
# applied by `ds_lab.comm` to the message it measured. The assertions check the messages.) Per-rank traffic stays almost constant as you add ranks, which is
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

# %% [markdown]
# ## Exercises
#
# 1. **Bucket size.** Run the engine with `reduce_bucket_size` of 10,000 and of 10⁹ (one bucket).
#    Count the collectives and the buckets sent before the last gradient. Why can a single
#    bucket never overlap with backward?
# 2. **Accumulation.** Use 4 accumulation steps on 2 ranks (micro batch 2). Check that the losses
#    still match one process and that the all-reduce still runs once per *optimizer* step.
# 3. **bf16.** Add `"bf16": {"enabled": True}` to the engine's config. What happens to the
#    gradient bytes per step, and to how closely the losses match one process? (The test suite
#    allows bf16 a few ulps.)
# 4. **An odd world size.** Set `GLOBAL_BATCH = 24` and run on 3 ranks. What does 2(N−1)/N
#    predict, and what do you measure?
# 5. **Why not overlap here?** Time the overlapped and the sequential engine again with more steps.
#    Then explain, from what the cores are doing, why overlap buys little on a 2-core CPU and a
#    lot on GPUs with NCCL.
#
# ## Summary
#
# - Data parallelism replicates the model and splits the batch. Averaging the gradients with one
#   all-reduce per optimizer step makes N ranks follow **exactly** the trajectory of one process
#   on the same global batch (micro batch × accumulation × N). We measured losses equal to
#   10⁻⁵ relative or better.
# - The all-reduce moves the whole gradient, 4Ψ bytes in fp32, once per step. Each rank sends
#   2(N−1)/N of that under the ring algorithm, so per-rank traffic hardly grows with N.
# - Naive data parallelism sends one small collective per tensor after backward. The engine, like
#   DeepSpeed and DDP, sends a few large buckets *during* backward.
# - Every rank still holds all 16Ψ bytes of model states, so data parallelism alone cannot train a
#   model that doesn't fit on one GPU. Chapter 3 (ZeRO) partitions those states across the ranks.
