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
# # 1 · Why training a large language model is hard
#
# *Source article §1 (background). Every chapter follows one skeleton: Goal · The idea · Run it ·
# Measure · Compare with theory · Exercises · Summary.*
#
# ## Goal
#
# By the end of this chapter you can say, byte by byte, what one training step of a GPT keeps in
# memory, and why no single GPU can hold what it takes to train GPT-3 (175 billion parameters).
# Every number comes from a real run, and each one is set beside the formula that predicts it.

# %% [markdown]
# ## The idea
#
# ### §1.1 How big the models got, and when
#
# The article's §1.1 says the models grew "from GPT-3 to Megatron, and now PaLM and LaMDA". That
# list is muddled. Megatron is NVIDIA's *framework* for training with tensor (and later pipeline)
# parallelism; the model trained with it in 2019, Megatron-LM, had 8.3 B parameters, the year before
# GPT-3's 175 B. And LaMDA (137 B) is smaller than GPT-3. The dated record, by announcement:

# %%
from ds_lab.lab.background import GPU_MEMORY, MODEL_GROWTH, gib, growth_table

print(growth_table())

# %% [markdown]
# In four years the largest model in the table grew about 1,600-fold (0.34 B to 540 B). Two of these
# models, Turing-NLG and MT-NLG, were trained with DeepSpeed.
#
# ### §1.3 What DeepSpeed offers, and where this course runs it
#
# §1.3 lists three things; here is what each is in DeepSpeed's code, and the chapter that runs it:
#
# - **"Model parallelism"**: DeepSpeed's own is *pipeline* parallelism (`deepspeed.pipe`). Tensor
#   parallelism comes from Megatron (handed to DeepSpeed as `mpu`) or from AutoTP. Chapter 4.
# - **The ZeRO optimizer**: it partitions optimizer states, gradients and parameters across the
#   data-parallel ranks (plus offload to CPU memory). Chapter 3.
# - **Efficient communication**: bucketed, overlapped gradient reduction (chapter 2, with the
#   details of what DeepSpeed does and doesn't do at stage 0) and compression (1-bit Adam,
#   chapter 5).
#
# ### §1.2 Memory: the weights are the smallest part
#
# The article (§1.2) names three challenges: compute, memory and communication. It describes the
# memory problem as "the model has a huge number of parameters". That undersells it. **While a
# model trains, its weights are the smallest part of what each GPU has to hold.** Adam in mixed
# precision (bf16 or fp16 compute, fp32 master weights) keeps, for every parameter:
#
# | state | bytes per parameter | why it exists |
# |---|---|---|
# | `params` (bf16) | 2 | the weights forward and backward compute with |
# | `grads` (bf16) | 2 | what backward produces |
# | `master_params` (fp32) | 4 | the optimizer updates an fp32 copy, because a bf16 weight cannot absorb a small update |
# | `optimizer_states` (fp32) | 8 | Adam's two moments, *m* and *v* |
# | **model states** | **16** | the ZeRO paper's 16Ψ, for Ψ parameters |
#
# Plain fp32 training also adds up to 16: 4 (params) + 4 (grads) + 8 (Adam), with no master copy.
# Either way the weights alone are at most a quarter of the model states, and in mixed precision
# only an eighth.
#
# On top of the model states come the **activations**: the tensors forward saves so that backward
# can compute gradients. For one transformer layer of hidden size *h* with *a* heads, Korthikanti
# et al. (2022) count $s\,b\,h\,(34 + 5\,a\,s/h)$ bytes in 16-bit, so *L* layers keep about
# $34\,s\,b\,h\,L$ bytes: they grow with the micro-batch size *b* and the sequence length *s*, and
# with the width *h* and depth *L*. Those two also set the size of the model (Ψ ≈ 12·*L*·*h*²), so
# activations are *not* independent of Ψ: at a fixed *b*·*s* they grow like *L*·*h*. The
# $a\,s^2$ part is the attention score matrix, which fused attention kernels don't keep.
#
# This chapter measures both on a small GPT, checks the formulas against the measurement, and
# then uses the formulas to scale up to GPT-3. It also measures what a step computes (FLOP/s
# against 6·Ψ·tokens), the article's first challenge. Communication, the third challenge, is the subject
# of chapters 2 and 5.

# %%
# %matplotlib inline
import statistics

import torch
import matplotlib.pyplot as plt

import ds_lab
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.lab import STATES, census_since, states_table, tensor_census
from ds_lab.lab.background import count_step_flops, matmul_parameters, step_allocations, timed_steps
from ds_lab.models import GPT, GPTConfig
from ds_lab.monitor import Dashboard
from ds_lab.zero.estimate import (estimate_activations, estimate_ledger, estimate_model_states,
                                  format_bytes, what_fits)

# A GPT small enough to train on one CPU core in seconds. Byte vocabulary: 256 tokens.
MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=128)
PSI = GPT(GPTConfig(**MODEL)).num_parameters()
print(f"Ψ = {PSI:,} parameters")


# %% [markdown]
# ## Run it
#
# One rank runs a few Adam steps. Then we ask the engine what it holds: `engine.memory_report()`
# reads the **memory ledger**, which counts the bytes of tensors that really exist on the rank
# (each storage once), and the **activation tracker**, which counts what autograd saves for
# backward through saved-tensor hooks. Nothing in the ledger is estimated.
#
# The ledger is the engine's own account, though. To check it from outside, the worker also takes
# a **census** (`ds_lab.lab.tensor_census`): the garbage collector lists every tensor alive in the
# rank's process, and we add up their storages by dtype. A buffer the ledger forgot would show up
# there.
#
# `ds_lab.launch(worker, 1, ...)` runs the worker in a real child process (a world of size 1),
# the same way chapter 2 runs it on 2 and 4 processes. Launching keeps the notebook process out of
# any process group. If you called `ds_lab.initialize` right here, the notebook itself would
# become a world of size 1. The dashboard draws the rank's memory (solid) next to the formula's
# bytes (hatched).

# %%
def make_engine(precision, micro_batch, model=MODEL):
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": micro_batch,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "bf16": {"enabled": precision == "bf16"}}
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**model)), config=config)
    engine.track_activations = True  # measure every step's activations and peak ledger
    return engine


def train_and_measure(precision, steps=4, micro_batch=4, seq_len=128):
    """Runs on the launched rank: a few Adam steps, then the memory ledger and a census of the
    bf16 and fp32 tensors the rank created (a forked rank inherits this notebook's own tensors:
    the census taken at the start subtracts them)."""
    inherited = tensor_census((torch.bfloat16, torch.float32))
    engine = make_engine(precision, micro_batch)
    data = DistributedLoader(corpus_tokens(), seq_len, micro_batch, seed=0)
    for step in range(steps):
        loss = engine(**data.batch(step)).loss
        engine.backward(loss)
        engine.step()
    del loss  # count what training keeps, not the last loss
    memory = engine.memory_report()
    census = census_since(inherited, (torch.bfloat16, torch.float32))
    # one more step, under torch's profiler: what the step allocates that the ledger does not hold
    allocations = step_allocations(engine, data.batch(steps))
    return dict(memory=memory, num_parameters=engine.num_parameters(), census=census, allocations=allocations,
                device=next(engine.module.parameters()).device.type)


def states_theory(precision):
    """The formula's bytes per category for one rank (stage 0 = no ZeRO partitioning)."""
    expected = estimate_ledger(PSI, world_size=1, stage=0, precision=precision)
    return {category: expected[category] for category in STATES}


dash = Dashboard("Chapter 1: one rank, bf16 mixed precision", theory={"memory": states_theory("bf16")})
bf16_run = ds_lab.launch(train_and_measure, 1, "bf16", dashboard=dash)[0]


# %% [markdown]
# ## Measure
#
# ### Model states

# %%
print(states_table("bf16 mixed precision", bf16_run["memory"], bf16_run["num_parameters"]))
print(f"census: {bf16_run['census']}")

# %% [markdown]
# The same model in plain fp32: the weights and gradients double, the master copy disappears, and
# the total stays at 16 bytes per parameter.

# %%
dash = Dashboard("Chapter 1: one rank, fp32", theory={"memory": states_theory("fp32")})
fp32_run = ds_lab.launch(train_and_measure, 1, "fp32", dashboard=dash)[0]
print(states_table("fp32", fp32_run["memory"], fp32_run["num_parameters"]))
print(f"census: {fp32_run['census']}")


# %% [markdown]
# ### Between steps, and inside a step
#
# The ledger above is the state **between** steps: what a rank keeps from one step to the next.
# Inside a step it holds more. `engine.memory_report()["peak"]` is the ledger sampled at the
# moments of a step where memory can peak (end of backward, inside the optimizer step): in bf16
# the optimizer needs fp32 gradients, so the step makes an fp32 copy of each (4Ψ) beside the bf16
# ones. And some tensors no ledger holds: Adam's update computes $\sqrt{v}$ into a temporary
# (4Ψ in fp32 on torch's `_foreach` path; the fused GPU kernel needs none), allocated and freed
# inside one call. We read those from torch's profiler, which records every allocation with the op
# that made it (`ds_lab.lab.background.step_allocations`).

# %%
for name, run in (("bf16", bf16_run), ("fp32", fp32_run)):
    peak = run["memory"]["peak"]
    between = sum(run["memory"][c] for c in STATES)
    inside = sum(peak[c] for c in STATES)
    print(f"{name}: between steps {between / PSI:4.1f} x Ψ; peak ledger {inside / PSI:4.1f} x Ψ "
          f"(at '{peak['total_at']}': grads {peak['grads'] / PSI:.0f} x Ψ); "
          f"+ allocated inside the step, by op: { {op: f'{b / PSI:.3f} x Ψ' for op, b in run['allocations'].items()} }")

# %% [markdown]
# So in bf16 a step peaks at 20Ψ in the ledger (the fp32 gradient copies), and at 24Ψ for the
# instant Adam's $\sqrt{v}$ exists (`aten::sqrt`; `aten::empty_strided` is the fp32 gradient
# copies again, seen by the profiler). In fp32 the gradients need no copy: 16Ψ + 4Ψ.
#
# What neither count sees, on a GPU: the **CUDA context** (a few hundred MB per process, before any
# tensor), the **caching allocator**'s reserve and fragmentation (`torch.cuda.memory_reserved()`
# exceeds `memory_allocated()`; on a GPU `memory_report()` adds an `allocator` entry with both),
# workspaces of cuBLAS and NCCL's buffers. Plan for them on top of the formulas.


# %% [markdown]
# ### Activations grow with batch size and sequence length
#
# One forward and one backward pass for each shape (micro-batch *b*, sequence length *s*). We
# read the activation tracker's **peak**: the most bytes autograd held at once. These are bf16
# activations.

# %%
def activation_sweep(shapes, model=MODEL, precision="bf16"):
    """Runs on the launched rank: one forward + backward per (micro_batch, seq_len)."""
    peaks = {}
    for micro_batch, seq_len in shapes:
        engine = make_engine(precision, micro_batch, model)
        batch = DistributedLoader(corpus_tokens(), seq_len, micro_batch, seed=1).batch(0)
        engine.backward(engine(**batch).loss)
        peaks[(micro_batch, seq_len)] = engine.memory_report()["activations_peak"]
    return peaks


BATCH_SIZES, SEQ_LENS = [1, 2, 4, 8], [32, 64, 128]
shapes = [(b, 128) for b in BATCH_SIZES] + [(4, s) for s in SEQ_LENS if s != 128]
dash = Dashboard("Chapter 1: activation sweep, one forward + backward per shape")
peaks = ds_lab.launch(activation_sweep, 1, shapes, dashboard=dash)[0]

# %%
h, layers = MODEL["n_embd"], MODEL["n_layer"]


def activation_formula(b, s, h=h, layers=layers):
    # ds_lab's GPT has no dropout, and its attention (torch's scaled_dot_product_attention)
    # keeps no s x s score matrix: num_heads=None drops the 5·a·s/h term.
    return estimate_activations(b, s, h, layers, num_heads=None, vocab_size=256,
                                bytes_per_element=2, dropout=False)["total"]


print(f"{'b':>3}{'s':>6}{'measured peak':>16}{'per token':>12}{'formula':>12}{'measured / formula':>20}")
for (b, s), peak in sorted(peaks.items()):
    print(f"{b:>3}{s:>6}{peak:>16,}{peak / (b * s):>12,.0f}{activation_formula(b, s):>12,}"
          f"{peak / activation_formula(b, s):>20.3f}")

fig, (ax_b, ax_s) = plt.subplots(1, 2, figsize=(10, 3.4))
ax_b.plot(BATCH_SIZES, [peaks[(b, 128)] / 2**20 for b in BATCH_SIZES], "o-", label="measured")
ax_b.plot(BATCH_SIZES, [activation_formula(b, 128) / 2**20 for b in BATCH_SIZES], "--", label="formula")
ax_b.set(xlabel="micro-batch size b (s = 128)", ylabel="activations, peak (MiB)")
ax_s.plot(SEQ_LENS, [peaks[(4, s)] / 2**20 for s in SEQ_LENS], "o-", label="measured")
ax_s.plot(SEQ_LENS, [activation_formula(4, s) / 2**20 for s in SEQ_LENS], "--", label="formula")
ax_s.set(xlabel="sequence length s (b = 4)", ylabel="activations, peak (MiB)")
for ax in (ax_b, ax_s):
    ax.grid(alpha=0.3)
    ax.legend()
plt.show()

# %% [markdown]
# The bytes per token stay the same in every row, so the activations are linear in *b* and, for
# this attention, linear in *s* too. Double the batch, double the activations. At *b* = 4,
# *s* = 128 this tiny model already keeps more bytes of activations than of model states. In a
# big model the model states dominate at small batches, and activations take over as *b* and *s*
# grow.
#
# Now the model's shape, at *b* = 4, *s* = 128: twice the layers, and twice the width. Each
# layer keeps 16·*s*·*b*·*h* elements (2 bytes each here), so the difference between 4 and 2
# layers is two layers' worth, and doubling *h* doubles what the layers keep.

# %%
WIDE, DEEP = dict(MODEL, n_embd=2 * h), dict(MODEL, n_layer=2 * layers)
shape_peaks = {name: ds_lab.launch(activation_sweep, 1, [(4, 128)], model)[0][(4, 128)]
               for name, model in (("deep", DEEP), ("wide", WIDE))}
per_layer_measured = (shape_peaks["deep"] - peaks[(4, 128)]) / layers       # 2 more layers
per_layer_formula = estimate_activations(4, 128, h, 1, bytes_per_element=2, dropout=False)["per_layer"]
print(f"one layer, measured (L=4 minus L=2, over 2): {per_layer_measured:,.0f} bytes; "
      f"16·s·b·h·2 = {per_layer_formula:,}: ratio {per_layer_measured / per_layer_formula:.3f}")
for name, (b_, s_, h_, l_) in (("base", (4, 128, h, layers)), ("deep", (4, 128, h, 2 * layers)),
                               ("wide", (4, 128, 2 * h, layers))):
    measured = peaks[(4, 128)] if name == "base" else shape_peaks[name]
    print(f"{name}: h={h_:>3} L={l_}  measured {measured:>10,}  formula {activation_formula(b_, s_, h_, l_):>10,}"
          f"  ratio {measured / activation_formula(b_, s_, h_, l_):.3f}")

# %% [markdown]
# ## Compare with theory
#
# **Model states.** `ds_lab.zero.estimate.estimate_ledger` implements the ZeRO paper's
# arithmetic. The measured ledger and the formula agree to the byte, and so does the census: in
# bf16 the bf16 tensors are the weights and gradients (2Ψ + 2Ψ) and the fp32 tensors the master
# copy and Adam's moments (4Ψ + 8Ψ). One rank has no partitioning, so there is no padding either.
# The assertion cells at the end check all of this exactly.

# %%
for name, run, precision in (("bf16", bf16_run, "bf16"), ("fp32", fp32_run, "fp32")):
    measured = {category: run["memory"][category] for category in STATES}
    print(f"{name}: ledger   {measured}")
    print(f"{'':6}formula  {states_theory(precision)}")
    print(f"{'':6}census   {run['census']}")

# %% [markdown]
# **Activations.** The formula covers the transformer layers (16·*s*·*b*·*h* elements each, for
# this model) and the logits (*s*·*b*·*V*). The measured peak is about 7 % higher at every
# (*b*, *s*) of this model (measured / formula between 1.06 and 1.08; 1.04 with 4 layers). The extra bytes are tensors outside the layers: the input of the final LayerNorm and the
# input of the output head (2·*s*·*b*·*h* elements), the token ids (int64). There are also small
# per-token statistics the kernels keep: LayerNorm's mean and inverse standard deviation, and
# attention's log-sum-exp in fp32. In a deep model the layers dominate and the gap shrinks.
#
# ### Scaling up: GPT-3, 175 billion parameters
#
# The measured model states match the formula exactly, and they are a fixed number of bytes per
# parameter, so we can scale the measurement to where we can't measure:

# %%
GPT3_PARAMS = 175e9
gpt3 = estimate_model_states(GPT3_PARAMS, world_size=1, stage=0, precision="mixed")
for category, nbytes in gpt3.items():
    print(f"{category:<18}{format_bytes(nbytes):>10}   ({nbytes / GPT3_PARAMS:.0f} bytes per parameter)")

# Nominal memory of common data-center GPUs, GB = 1e9 bytes (as the ZeRO paper computes), and in GiB
GPUS = GPU_MEMORY
print()
for name, memory in GPUS.items():
    largest = what_fits(memory, world_size=1, precision="mixed")[0]
    print(f"{name:<18} = {gib(memory):5.1f} GiB: GPT-3's model states fill {gpt3['total'] / memory:5.1f} of these GPUs; "
          f"one GPU trains at most {largest / 1e9:4.1f}B parameters (model states only)")

# %% [markdown]
# **GB and GiB.** Tools count memory in binary units: nvidia-smi in MiB, `torch.cuda` in bytes
# that people divide by 2³⁰. Read as 10⁹ bytes, "80 GB" is 74.5 GiB. Real cards are a little
# bigger than that reading: an A100 80 GB reports 81,920 MiB (80 GiB) in nvidia-smi, and
# `torch.cuda.get_device_properties(0).total_memory` a little less, after what the driver keeps.
# This chapter computes with 10⁹ bytes per GB, as the ZeRO paper does: that errs on the safe
# side by about 6 %.
#
# The model states alone need 2.8 TB: the memory of 35 GPUs of 80 GB, or 20 of the 141 GB ones.
# Even the bf16 weights by themselves (350 GB) are too big for any one of them. Activations come on top. Here is the same
# formula for one GPT-3 sequence (*s* = 2048, *h* = 12288, 96 layers, 96 heads, *V* = 50257,
# 16-bit, with dropout):

# %%
gpt3_shape = dict(batch_size=1, seq_len=2048, hidden_size=12288, num_layers=96, vocab_size=50257)
variants = {
    "attention scores kept (as in 2020)": dict(num_heads=96),
    "fused attention, no s x s scores": dict(num_heads=None),
    "full activation checkpointing": dict(num_heads=96, checkpointing=True),
}
for name, options in variants.items():
    total = estimate_activations(**gpt3_shape, **options)["total"]
    print(f"{name:<38}{format_bytes(total):>10} per sequence")

# %% [markdown]
# **Compute**, the article's first challenge, follows from the same sizes. Training costs about
# 6·Ψ·*D* floating-point operations for *D* tokens: 2 per parameter per token in forward, 4 in
# backward (Kaplan et al. 2020). GPT-3 saw about 300B tokens.

# %% [markdown]
# First on our tiny model, measured. One rank counts the FLOPs of a forward and backward with
# torch's `FlopCounterMode` (op by op), then times training steps. 6·Ψ·*D* is an approximation:
# the products involve only the matrix weights (Linear layers, the tied output head), 6 FLOPs per
# such weight per token; biases, LayerNorms and the position embedding are in Ψ but multiply
# nothing. The attention's own products (QKᵀ and the weighted sum, about 6·*L*·*s*·*h* FLOPs per
# token) come on top; torch's counter does not count the CPU attention kernel.

# %%
def compute_rate(precision, steps=6, micro_batch=4, seq_len=128):
    """Runs on the launched rank: counted FLOPs of one step, and the seconds of a few steps."""
    torch.manual_seed(0)
    data = DistributedLoader(corpus_tokens(), seq_len, micro_batch, seed=0)
    model = GPT(GPTConfig(**MODEL))
    counted = count_step_flops(model, data.batch(0))
    engine = make_engine(precision, micro_batch)
    seconds = timed_steps(engine, [data.batch(step) for step in range(steps)])
    return dict(counted=counted, seconds=seconds, matmul_parameters=matmul_parameters(model))


TOKENS = 4 * 128                                     # tokens per step: micro-batch x sequence length
rates = {p: ds_lab.launch(compute_rate, 1, p)[0] for p in ("fp32", "bf16")}
for precision, rate in rates.items():
    step_seconds = statistics.median(rate["seconds"][1:])    # skip the first (warm-up) step
    print(f"{precision}: 6·Ψ·tokens = {6 * PSI * TOKENS:,} FLOPs per step; counted {rate['counted']:,} "
          f"= 6 x {rate['matmul_parameters']:,} matrix weights x {TOKENS} tokens; "
          f"step {1e3 * step_seconds:.1f} ms -> {6 * PSI * TOKENS / step_seconds / 1e9:.1f} GFLOP/s achieved")

# %% [markdown]
# Tens of GFLOP/s on a CPU core: a GPU does hundreds of TFLOP/s, about 10⁴ times more, and
# GPT-3 still takes this long (the 40 % utilization below is our assumption, typical of large
# runs, not a measurement):

# %%
flops = 6 * GPT3_PARAMS * 300e9
a100_bf16_peak, utilization = 312e12, 0.4
gpu_seconds = flops / (a100_bf16_peak * utilization)
print(f"{flops:.2e} FLOPs = {gpu_seconds / (365 * 86400):.0f} A100-years at {utilization:.0%} of peak"
      f" = {gpu_seconds / 1024 / 86400:.0f} days on 1024 A100s")

# %% [markdown]
# So one GPU cannot even *hold* the training state, and it would need decades to do the work.
# Training has to be spread over many GPUs, and that creates the third challenge: every GPU must
# exchange gradients (and with ZeRO also parameters) with the others at every step. The rest of
# the course is about spreading the work and the memory without drowning in communication:
#
# - **data parallelism** (chapter 2) splits the *batch*: N times the compute, but every GPU still
#   holds all 16Ψ bytes;
# - **ZeRO** (chapter 3) splits the *model states* across the data-parallel GPUs: 16Ψ/N each at
#   stage 3;
# - **tensor and pipeline parallelism** (chapter 4) split the *layers* themselves, and with them
#   the activations.
#
# ### Assertions: measured vs theory

# %%
# Model states are exactly 16 bytes per parameter: 2 + 2 + 4 + 8 in bf16, 4 + 4 + 0 + 8 in fp32,
# byte for byte what the ZeRO formula says. Measured twice: by the engine's ledger, and by a
# census of every tensor the rank created (by dtype), which does not ask the engine.
for run, precision, split in ((bf16_run, "bf16", (2, 2, 4, 8)), (fp32_run, "fp32", (4, 4, 0, 8))):
    memory, census = run["memory"], run["census"]
    assert run["num_parameters"] == PSI  # Ψ counted on the rank = Ψ counted here from a fresh model
    assert [memory[category] for category in STATES] == [k * PSI for k in split], memory
    assert {category: memory[category] for category in STATES} == states_theory(precision)
assert bf16_run["census"] == {"bfloat16": (2 + 2) * PSI, "float32": (4 + 8) * PSI}, bf16_run["census"]
assert fp32_run["census"] == {"float32": (4 + 4 + 8) * PSI}, fp32_run["census"]
print("model states = 16 Ψ exactly, in bf16 and in fp32:", 16 * PSI, "bytes (ledger and census)")

# %%
# Activations grow linearly with the micro-batch (and with the sequence length): the bytes per
# token vary by less than 1% across all shapes, and 8x the batch gives 8x the bytes (within 1%).
per_token = [peaks[(b, s)] / (b * s) for (b, s) in shapes]
assert max(per_token) / min(per_token) < 1.01, per_token
assert abs(peaks[(8, 128)] / peaks[(1, 128)] / 8 - 1) < 0.01
assert all(peaks[(b1, 128)] < peaks[(b2, 128)] for b1, b2 in zip(BATCH_SIZES, BATCH_SIZES[1:]))
# ...and the formula accounts for all but about 7 % of them (it leaves out the tensors outside
# the layers, so it is the lower of the two): measured / formula between 1.06 and 1.08 at every shape.
assert all(1.06 <= peaks[shape] / activation_formula(*shape) <= 1.08 for shape in shapes)
print(f"bytes per token: {min(per_token):,.0f} to {max(per_token):,.0f}; "
      f"8x batch -> {peaks[(8, 128)] / peaks[(1, 128)]:.3f}x activations")

# %%
# GPT-3: the bytes per parameter measured above, scaled to 175e9 parameters, are the estimator's
# figures (2.8 TB of model states, 350 GB of bf16 weights), and exceed every GPU in the table.
measured_per_parameter = {c: bf16_run["memory"][c] / PSI for c in ("params", "grads")}
measured_per_parameter["optimizer_states"] = (bf16_run["memory"]["master_params"]
                                              + bf16_run["memory"]["optimizer_states"]) / PSI  # K = 12
scaled = {c: b * GPT3_PARAMS for c, b in measured_per_parameter.items()}
assert scaled == {c: gpt3[c] for c in scaled}, (scaled, gpt3)
assert sum(scaled.values()) == gpt3["total"] == 2.8e12 and scaled["params"] == 350e9
assert scaled["params"] > max(GPUS.values())
print(f"GPT-3 model states, measured bytes per parameter x 175e9: {format_bytes(sum(scaled.values()))}")

# %%
# Inside a step: the peak ledger of bf16 holds the fp32 gradient copies on top of the bf16
# gradients (grads 2Ψ + 4Ψ, total 20Ψ, in the optimizer step); fp32 needs no copy (16Ψ). Adam's
# sqrt(v) temporary is exactly 4Ψ bytes (fp32), seen only by the profiler, in both.
bf16_peak, fp32_peak = bf16_run["memory"]["peak"], fp32_run["memory"]["peak"]
assert [bf16_peak[c] for c in STATES] == [2 * PSI, 6 * PSI, 4 * PSI, 8 * PSI], bf16_peak
assert bf16_peak["total"] == 20 * PSI and bf16_peak["total_at"].startswith("step"), bf16_peak
assert [fp32_peak[c] for c in STATES] == [4 * PSI, 4 * PSI, 0, 8 * PSI], fp32_peak
if bf16_run["device"] == "cpu":  # on a GPU the profiler reports device memory apart, and fused Adam has no sqrt(v)
    for run in (bf16_run, fp32_run):
        assert run["allocations"]["aten::sqrt"] == 4 * PSI, run["allocations"]
    assert bf16_run["allocations"]["aten::empty_strided"] >= 4 * PSI  # the fp32 gradient copies
    assert fp32_run["allocations"].get("aten::empty_strided", 0) < PSI  # fp32: no gradient copies
print("peak: bf16 20Ψ in the ledger + 4Ψ of sqrt(v); fp32 16Ψ + 4Ψ")

# %%
# §1.1 as the table has it: Megatron-LM came before GPT-3, LaMDA is smaller than GPT-3, and the
# largest model grew about 1,600-fold from 2018 to 2022. GB are not GiB: 80 GB = 74.5 GiB.
growth = {name: (billions, year) for name, billions, year, _, _ in MODEL_GROWTH}
assert growth["Megatron-LM 8.3B"][1] < growth["GPT-3"][1] and growth["LaMDA"][0] < growth["GPT-3"][0]
assert round(growth["PaLM"][0] / growth["BERT-Large"][0], -2) == 1600
assert round(gib(GPUS["A100 / H100 80 GB"]), 1) == 74.5

# %%
# Activations grow with the layers and the width as the formula says: one more layer adds
# 16·s·b·h·2 bytes (measured / formula between 1.00 and 1.02, the per-token statistics of
# LayerNorm and attention), and the whole ratio is about 7 % at every (b, s) of this model and at
# twice the width (1.06 to 1.08), 1.04 at twice the depth (1.03 to 1.05).
assert 1.0 <= per_layer_measured / per_layer_formula <= 1.02
assert all(1.06 <= peaks[shape] / activation_formula(*shape) <= 1.08 for shape in shapes)
assert 1.06 <= shape_peaks["wide"] / activation_formula(4, 128, 2 * h, layers) <= 1.08
assert 1.03 <= shape_peaks["deep"] / activation_formula(4, 128, h, 2 * layers) <= 1.05
# FLOPs: torch's counter finds exactly 6 FLOPs per matrix weight per token, and the matrix
# weights are 12·L·h² (qkv 3h², projection h², MLP 8h²) + V·h (the tied head), counted here from
# the shape; 6·Ψ over-counts them by the parameters that multiply nothing.
matrix_weights = 12 * layers * h * h + 256 * h
for rate in rates.values():
    assert rate["matmul_parameters"] == matrix_weights
    assert rate["counted"] == 6 * matrix_weights * TOKENS, rate["counted"]
print(f"counted FLOPs = 6 x {matrix_weights:,} x {TOKENS} tokens; 6Ψ is {PSI / matrix_weights:.3f}x that")

# %% [markdown]
# ## Exercises
#
# Each exercise's code runs as printed in a new cell below this one.
#
# 1. **Another optimizer.** Predict the bytes per parameter in fp32 and in bf16 with SGD with
#    momentum (one fp32 buffer per parameter) before you run it. (Hint: K, the bytes of optimizer
#    state plus master copy, changes.)
#    ```python
#    def sgd_states(precision):
#        torch.manual_seed(0)
#        model = GPT(GPTConfig(**MODEL))
#        engine, _, _, _ = ds_lab.initialize(
#            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
#            config={"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": precision == "bf16"}})
#        batch = DistributedLoader(corpus_tokens(), 128, 4, seed=0).batch(0)
#        engine.backward(engine(**batch).loss)
#        engine.step()
#        return {c: engine.memory_report()[c] / PSI for c in STATES}
#    print({p: ds_lab.launch(sgd_states, 1, p)[0] for p in ("fp32", "bf16")})
#    ```
# 2. **Width.** Double `n_embd` to 128. By what factor do the model states grow, and by what
#    factor do the activations? Why are the factors different?
#    ```python
#    wide = dict(MODEL, n_embd=128)
#    print(GPT(GPTConfig(**wide)).num_parameters() / PSI,
#          ds_lab.launch(activation_sweep, 1, [(4, 128)], wide)[0][(4, 128)] / peaks[(4, 128)])
#    ```
# 3. **Attention scores.** At what sequence length would keeping the *s*×*s* scores cost as
#    much as the rest of the layer? Check it against $5as/h = 34$.
#    ```python
#    for s in (128, 1024):
#        kept = estimate_activations(1, s, 64, 1, num_heads=4)["per_layer"]
#        fused = estimate_activations(1, s, 64, 1, num_heads=None)["per_layer"]
#        print(s, kept / fused)
#    ```
# 4. **How many GPUs?** `what_fits(gpu_bytes, world_size)` returns, for each ZeRO stage, the
#    largest Ψ whose model states fit. Find the smallest N that holds GPT-3's model states on
#    80 GB GPUs at ZeRO stage 3. (Chapter 3 runs ZeRO for real.)
#    ```python
#    print(next(n for n in range(1, 256) if what_fits(80e9, world_size=n)[3] >= GPT3_PARAMS))
#    ```
# 5. **The article's framing.** §1.2 says the memory bottleneck is the number of parameters.
#    Rewrite that sentence with the three numbers this chapter measured: weights, model states,
#    and activations for one sequence.
#
# ## Summary
#
# - Training with Adam keeps **16 bytes per parameter** of model states (2 + 2 + 4 + 8 in mixed
#   precision, 4 + 4 + 8 in fp32). We measured it byte for byte on a real run, and the weights
#   are only an eighth of it.
# - That is the state **between** steps. Inside a step a bf16 rank peaks higher: 20Ψ in the
#   ledger (fp32 gradient copies), 24Ψ counting Adam's $\sqrt{v}$ temporary, before the CUDA
#   context and the allocator's reserve, which no ledger sees.
# - **Activations** grow linearly with micro-batch, sequence length, width and depth,
#   *s*·*b*·*h*·*L* (plus an *s*² term when the attention scores are kept), so they grow with the
#   model too. The Korthikanti formula predicts them to within about 7 % here.
# - A training step costs about 6·Ψ FLOPs per token (exactly 6 per matrix weight, plus
#   attention); our CPU rank does tens of GFLOP/s of it.
# - **GPT-3** needs 2.8 TB of model states and hundreds of GB of activations per sequence, and
#   about 3·10²³ FLOPs. No single GPU can hold or compute it, so the work has to be spread, and
#   that is what data parallelism, ZeRO and model parallelism do in the next chapters.
