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
# can compute gradients. They don't depend on Ψ. They grow with the micro-batch size *b* and
# the sequence length *s*. For one transformer layer of hidden size *h* with *a* heads, Korthikanti
# et al. (2022) count $s\,b\,h\,(34 + 5\,a\,s/h)$ bytes in 16-bit. The $a\,s^2$ part is the
# attention score matrix, which fused attention kernels don't keep.
#
# This chapter measures both on a small GPT, checks the formulas against the measurement, and
# then uses the formulas to scale up to GPT-3. Communication, the third challenge, is the subject
# of chapters 2 and 5.

# %%
# %matplotlib inline
import torch
import matplotlib.pyplot as plt

import ds_lab
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.lab import STATES, census_since, states_table, tensor_census
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
def make_engine(precision, micro_batch):
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": micro_batch,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "bf16": {"enabled": precision == "bf16"}}
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**MODEL)), config=config)
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
    return dict(memory=engine.memory_report(), num_parameters=engine.num_parameters(),
                census=census_since(inherited, (torch.bfloat16, torch.float32)))


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
# ### Activations grow with batch size and sequence length
#
# One forward and one backward pass for each shape (micro-batch *b*, sequence length *s*). We
# read the activation tracker's **peak**: the most bytes autograd held at once. These are bf16
# activations.

# %%
def activation_sweep(shapes, precision="bf16"):
    """Runs on the launched rank: one forward + backward per (micro_batch, seq_len)."""
    peaks = {}
    for micro_batch, seq_len in shapes:
        engine = make_engine(precision, micro_batch)
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


def activation_formula(b, s):
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
# this model) and the logits (*s*·*b*·*V*). The measured peak is about 7% higher, at every
# shape. The extra bytes are tensors outside the layers: the input of the final LayerNorm and the
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

# Nominal memory of common data-center GPUs (GB = 1e9 bytes, as in the ZeRO paper)
GPUS = {"V100 32 GB": 32e9, "A100 40 GB": 40e9, "A100 / H100 80 GB": 80e9, "H200 141 GB": 141e9}
print()
for name, memory in GPUS.items():
    largest = what_fits(memory, world_size=1, precision="mixed")[0]
    print(f"{name:<18} GPT-3's model states fill {gpt3['total'] / memory:5.1f} of these GPUs; "
          f"one GPU trains at most {largest / 1e9:4.1f}B parameters (model states only)")

# %% [markdown]
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
# backward (Kaplan et al. 2020). GPT-3 saw about 300B tokens. The 40% utilization below is our
# assumption. It is typical of large runs, not a measurement.

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
# ...and the formula accounts for all but about 7% of them (it leaves out the tensors outside
# the layers, so it is the lower of the two): measured / formula between 1.0 and 1.1 at every shape.
assert all(1.0 <= peaks[shape] / activation_formula(*shape) <= 1.1 for shape in shapes)
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

# %% [markdown]
# ## Exercises
#
# 1. **Another optimizer.** In `make_engine`, pass a client optimizer:
#    `ds_lab.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), config=...)`
#    (and drop `"optimizer"` from the config). Predict the bytes per parameter in fp32 and in
#    bf16 before you run it. (Hint: K, the bytes of optimizer state plus master copy, changes.)
# 2. **Width.** Double `n_embd` to 128. By what factor do the model states grow, and by what
#    factor do the activations? Why are the factors different?
# 3. **Attention scores.** Compute `estimate_activations(..., num_heads=4)` for *s* = 128 and
#    *s* = 1024. At what sequence length would keeping the *s*×*s* scores cost as much as the
#    rest of the layer? Check it against $5as/h = 34$.
# 4. **How many GPUs?** Use `what_fits(80e9, world_size=N, stage=...)` to find the smallest N
#    that holds GPT-3's model states at ZeRO stage 3. (Chapter 3 runs ZeRO for real.)
# 5. **The article's framing.** §1.2 says the memory bottleneck is the number of parameters.
#    Rewrite that sentence with the three numbers this chapter measured: weights, model states,
#    and activations for one sequence.
#
# ## Summary
#
# - Training with Adam keeps **16 bytes per parameter** of model states (2 + 2 + 4 + 8 in mixed
#   precision, 4 + 4 + 8 in fp32). We measured it byte for byte on a real run, and the weights
#   are only an eighth of it.
# - **Activations** grow linearly with micro-batch and sequence length (plus an *s*² term when
#   the attention scores are kept). The Korthikanti formula predicts them to within a few percent.
# - **GPT-3** needs 2.8 TB of model states and hundreds of GB of activations per sequence, and
#   about 3·10²³ FLOPs. No single GPU can hold or compute it, so the work has to be spread, and
#   that is what data parallelism, ZeRO and model parallelism do in the next chapters.
