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
# # 3 · ZeRO: partitioning the model states
#
# *Source article §2.2, §3.1, §3.2 and §4.3. Skeleton: Goal · The idea · Run it · Measure ·
# Compare with theory · Exercises · Summary.*
#
# ## Goal
#
# Chapter 2 ended with every data-parallel rank holding all 16Ψ bytes of model states. By the end
# of this chapter you can say what each ZeRO stage takes off a rank: how many bytes, which
# collectives replace the all-reduce, and what that costs on the wire. You will have measured all
# three stages on real processes against the paper's formulas. You will also know how to build a
# model that never exists whole on any rank (`zero.Init`), and how to look at or change a
# partitioned weight (`GatheredParameters`).

# %% [markdown]
# ## The idea
#
# ZeRO ("Zero Redundancy Optimizer", Rajbhandari et al. 2019) starts from one observation. In data
# parallelism the N ranks hold N identical copies of the model states, and they all do the same
# optimizer step on them. The optimizer states are used by nothing else, so each rank could keep
# and update just **1/N** of them. The same goes, with more communication, for the gradients and
# the weights: each rank keeps 1/N of a state, and the ranks pass the pieces around only when
# they are needed. In mixed precision with Adam (chapter 1), Ψ parameters cost 2Ψ (bf16
# weights) + 2Ψ (bf16 gradients) + KΨ, where K = 12 is the fp32 master weights, Adam's *m* and
# Adam's *v* (4 bytes each). Each stage partitions one more of the three:
#
# | stage | partitioned over N ranks | bytes per rank | Ψ = 7.5B, N = 64 (paper, Figure 1) |
# |---|---|---|---|
# | 0 (data parallel) | nothing | 2Ψ + 2Ψ + 12Ψ = 16Ψ | 120 GB |
# | 1 ($P_{os}$) | optimizer states (master, *m*, *v*) | 2Ψ + 2Ψ + 12Ψ/N | 31.4 GB |
# | 2 ($P_{os+g}$) | + gradients | 2Ψ + (2 + 12)Ψ/N | 16.6 GB |
# | 3 ($P_{os+g+p}$) | + parameters | (2 + 2 + 12)Ψ/N = 16Ψ/N | 1.9 GB |
#
# The stages are cumulative: stage 2 also partitions the optimizer states, and stage 3 also
# partitions the gradients. As N grows, stage 1 tends to 4Ψ (a 4× cut) and stage 2 to 2Ψ (8×).
# Only stage 3 keeps falling with N.
#
# **What crosses the wire.** An all-reduce *is* a reduce-scatter followed by an all-gather; with
# the ring algorithm each of the two sends (N−1)/N of the message per rank. ZeRO splits the
# all-reduce into its two halves and puts the optimizer step between them:
#
# - **stages 1 and 2**: reduce-scatter the gradients, so rank *r* receives the average of
#   *its* chunk only. Step the optimizer on that chunk. All-gather the updated chunks, so every
#   rank again has the whole bf16 model. Per rank that is 2(N−1)/N × 2Ψ bytes, exactly what data
#   parallelism's all-reduce sends. Memory saved at no extra traffic. (Stage 1 still accumulates
#   the whole gradient locally; stage 2 frees each gradient bucket as soon as it is
#   reduce-scattered.) That is the paper's design, and ds_lab's. **DeepSpeed's own stages 1 and 2
#   do not do this by default**: with `use_multi_rank_bucket_allreduce: true` (the default in
#   `deepspeed/runtime/zero/config.py`), `average_tensor` in `deepspeed/runtime/zero/stage_1_and_2.py`
#   sends each gradient bucket through `allreduce_and_scatter`, an **all-reduce** (every rank receives
#   the whole averaged bucket and keeps its part), and `step` then all-gathers the updated 16-bit
#   parameters (`all_gather_dp_groups`): 2(N−1)/N + (N−1)/N, **1.5×** data parallelism's bytes, as
#   much as stage 3. With the key false it sends each rank's slices to their owner with `reduce`
#   instead. ds_lab follows the paper (1×); we measure ds_lab's below.
# - **stage 3**: the whole parameters of a module exist only while that module runs. A forward
#   pre-hook all-gathers its parameters, and a post-hook frees them. Backward needs them again,
#   so they are all-gathered a second time. Then the gradients are reduce-scattered. After the
#   step each rank simply keeps its updated chunk: no all-gather. That is 3(N−1)/N × 2Ψ, **1.5×**
#   data parallelism (the paper's 3Ψ vs 2Ψ). DeepSpeed (and ds_lab) can skip some of the second
#   gathers: `stage3_max_reuse_distance` keeps a module's parameters gathered when they will be
#   used again soon, and its default, 10⁹ elements, is larger than this whole model, so by default
#   a small model sends less than 1.5×. To see the paper's "gathered twice" we set it to **0** in
#   every run of this chapter, and measure the default at the end.
#
# What the article gets wrong about all this is collected after the measurements.

# %%
# %matplotlib inline
import inspect
import statistics

import torch
import matplotlib.pyplot as plt

import ds_lab
import ds_lab.zero
from ds_lab import comm
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.lab import (STATES, ConstructionProbe, bucket_sizes, global_losses, model_states,
                        own_parameter_counts, padded, padded_sizes, states_vs_formula_table, zero_train)
from ds_lab.lab.zero_by_hand import engine_stage1, one_process, zero1_by_hand
from ds_lab.models import GPT, GPTConfig
from ds_lab.monitor import Dashboard
from ds_lab.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from ds_lab.zero import GatheredParameters
from ds_lab.zero.estimate import (estimate_ledger, estimate_model_states, format_table, format_what_fits,
                                  formula, what_fits)

# A GPT of about 1.9M parameters. Untied: lm_head has its own matrix (why: see stage 3 below).
MODEL = dict(n_layer=4, n_head=4, n_embd=192, block_size=64, tie_weights=False)
WORLD = 4                  # data-parallel ranks, N
GLOBAL_BATCH = 8           # sequences per optimizer step, 2 per rank
STEPS = 4
# reduce_bucket_size in elements (stages 0-2 reduce bucket by bucket). DeepSpeed's default, 5e8,
# is larger than every model in this course: one bucket, nothing to overlap, nothing to free early
# at stage 2. 100,000 cuts this model into 13 buckets, as 5e8 cuts a model of billions.
BUCKET = 100_000
PSI = GPT(GPTConfig(**MODEL)).num_parameters()
TAGS = ["grad_allreduce", "grad_reduce_scatter", "param_allgather"]  # the collectives ZeRO changes

# Padding, predicted from the model: every partitioned unit is padded to a multiple of N. Stages
# 1-2 partition gradient buckets, stage 3 each module's own parameters.
BUCKETS = bucket_sizes(GPT(GPTConfig(**MODEL)), BUCKET)   # elements per bucket, in sending order
PADDED = padded_sizes(GPT(GPTConfig(**MODEL)), WORLD)     # {module: its own parameters, padded}
PSI_PADDED = {0: PSI, 1: sum(padded(b, WORLD) for b in BUCKETS), 3: sum(PADDED.values())}
PSI_PADDED[2] = PSI_PADDED[1]

# The global batches, drawn once: every run below trains on exactly these.
loader = DistributedLoader(corpus_tokens(), MODEL["block_size"], GLOBAL_BATCH, seed=0)
batches = [loader.batch(i)["input_ids"] for i in range(STEPS)]


def traffic(stage, world_size=WORLD, precision="bf16"):
    """Bytes one rank sends per optimizer step (ring algorithm). The message is all Ψ gradients or
    all Ψ parameters in the model's dtype: stages 0-2 move it twice, (N-1)/N each time; stage 3 three times."""
    message = (2 if precision == "bf16" else 4) * PSI
    passes = 3 if stage == 3 else 2
    return passes * (world_size - 1) / world_size * message


def theory(stage, world_size=WORLD, precision="bf16"):
    """What the paper says one rank holds and sends, for the dashboard (drawn beside the measurement)."""
    memory = estimate_ledger(PSI, world_size, stage, precision)
    memory.pop("total")
    what = {0: "all-reduce", 3: "2 all-gathers + reduce-scatter"}.get(stage, "reduce-scatter + all-gather")
    width = 2 if precision == "bf16" else 4
    label = f"{what}, {3 if stage == 3 else 2}(N-1)/N x {width}Ψ"
    return {"memory": memory, "comm": {"per_step_bytes": traffic(stage, world_size, precision), "label": label}}


def config(stage, precision="bf16", **zero):
    """The DeepSpeed config of every run: only the stage (and a few ZeRO keys) change."""
    return {"train_batch_size": GLOBAL_BATCH,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "bf16": {"enabled": precision == "bf16"},
            # persistence threshold 0: stage 3 partitions every parameter, even a LayerNorm's
            # (DeepSpeed's default keeps tensors under 100,000 elements whole on every rank);
            # reuse distance 0: stage 3 releases every module after use, so backward gathers it
            # again (DeepSpeed's default, 1e9, keeps what is reused soon: the last section)
            "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET,
                                  "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                                  **zero}}


print(f"Ψ = {PSI:,} parameters, N = {WORLD} ranks, global batch {GLOBAL_BATCH} x {MODEL['block_size']} tokens")
print(f"{len(BUCKETS)} gradient buckets, {len(PADDED)} modules with parameters; padded Ψ: {PSI_PADDED}")


# %% [markdown]
# ## Run it
#
# One worker runs every stage: `ds_lab.lab.zero_train` (read it in `ds_lab/lab/workers.py`). It
# builds the GPT (the same seed on every rank), wraps it with `ds_lab.initialize`, and trains
# `STEPS` optimizer steps on the same global batches. Only `zero_optimization.stage` changes from
# run to run. The worker records, per step, which collectives ran (`ds_lab.comm` tags each
# record: `grad_allreduce`, `grad_reduce_scatter`, `param_allgather`), the size of each message,
# and every other collective of the step, untagged ones included. At the end it reads the engine's memory ledger, which counts the
# tensors the engine holds, each storage once, and it takes a **census**: every bf16 and fp32
# tensor alive in the rank's process, found by the garbage collector, whether the engine knows
# about it or not.
#
# Each run has its own dashboard. Its memory panel draws each rank's bytes (solid) beside
# `estimate_ledger(Ψ, N, stage)` (hatched), and its comm panel draws the ring-model bytes sent beside the
# theory's bytes per step (dashed) times the steps run. Watch the memory bars shrink from stage
# to stage. In the comm panel, the `broadcast` above the dashed line is sent once, at start-up:
# `initialize` broadcasts rank 0's fp32 weights (4Ψ) so that every rank starts from the same
# model.

# %%
runs = {}  # stage -> every rank's result (bf16)

# %% [markdown]
# ### Stage 0: plain data parallelism, the baseline
#
# What chapter 2 built: every rank holds all 16Ψ bytes, and the gradients are averaged by
# bucketed all-reduces.

# %%
dash = Dashboard("Stage 0 (data parallel), 4 ranks, bf16", theory=theory(0))
runs[0] = ds_lab.launch(zero_train, WORLD, config(0), batches, MODEL, dashboard=dash)

# %% [markdown]
# ### ZeRO-1 by hand, before the engine's
#
# Stage 1 is small enough to write out. Every rank runs the same function: a forward and backward
# on its micro-batch, as in data parallelism; then the flat fp32 vector of all gradients goes
# through a **reduce-scatter**, so this rank receives its chunk of the average and nothing else;
# **Adam steps on that chunk alone** (so its *m* and *v* are Ψ/N long); an **all-gather** of the
# updated chunks gives every rank the whole model again. The vector is padded to a multiple of N,
# so every chunk has the same length. This is the function (`ds_lab/lab/zero_by_hand.py`):

# %%
print(inspect.getsource(zero1_by_hand))

# %% [markdown]
# We run it on 2 ranks in fp32, then the engine's stage 1 on the same model and batches
# (`engine_stage1`: `"zero_optimization": {"stage": 1}`, gradient clipping off, since DeepSpeed's
# default clips at 1.0 and the hand version does not), then one process on the whole global batch
# with torch's Adam (`one_process`).

# %%
HAND_RANKS = 2
hand = ds_lab.launch(zero1_by_hand, HAND_RANKS, batches, MODEL)
by_engine = ds_lab.launch(engine_stage1, HAND_RANKS, batches, MODEL)
alone = ds_lab.launch(one_process, 1, batches, MODEL)[0]   # in a process of its own, like the others
chunk = hand[0]["chunk"]
print(f"Adam's state on each rank: {hand[0]['adam_state_elements']:,} elements = 2 x {chunk:,} (m and v of Ψ/N), "
      f"not 2Ψ = {2 * PSI:,}")
print(f"per step, rank 0 handed to the collectives: {hand[0]['records'][:2]} (bytes): the padded fp32 vector, "
      f"4 x {HAND_RANKS} x {chunk:,}")
print(f"weights after {STEPS} steps: by hand == engine's stage 1, bit for bit: "
      f"{torch.equal(hand[0]['weights'], by_engine[0]['weights'])}; "
      f"largest difference to one process: {(hand[0]['weights'] - alone['weights']).abs().max():.1e}")
# exact where it can be: the same arithmetic as the engine, in the same order
assert all(torch.equal(h["weights"], e["weights"]) for h, e in zip(hand, by_engine))
assert all(h["losses"] == e["losses"] for h, e in zip(hand, by_engine))
assert hand[0]["adam_state_elements"] == 2 * chunk and chunk * HAND_RANKS == padded(PSI, HAND_RANKS)
assert hand[0]["records"] == [("reduce_scatter", 4 * HAND_RANKS * chunk), ("all_gather", 4 * HAND_RANKS * chunk)] * STEPS
# one process adds the two halves of the batch in another order: equal to fp32 rounding
assert (hand[0]["weights"] - alone["weights"]).abs().max() < 1e-4
# free the weights received from the ranks: the zero.Init measurement below samples every fp32
# tensor of a rank forked from this process, and these would be inherited by it
del hand, by_engine, alone

# %% [markdown]
# The engine's stage 1 is this loop, organised: the flat vector is cut into buckets that are
# reduce-scattered while backward is still running, the weights and gradients are views into
# them, the optimizer's state is counted in the memory ledger, and mixed precision keeps an fp32
# master chunk beside bf16 weights. The arithmetic is the same, to the bit.

# %% [markdown]
# ### Stage 1: partition the optimizer states
#
# Each rank keeps the fp32 master weights and Adam's *m* and *v* for its own quarter of the
# parameters (12Ψ/N). The all-reduce becomes a reduce-scatter of the gradients and an all-gather
# of the updated bf16 weights.

# %%
dash = Dashboard("Stage 1 (optimizer states partitioned), 4 ranks, bf16", theory=theory(1))
runs[1] = ds_lab.launch(zero_train, WORLD, config(1), batches, MODEL, dashboard=dash)

# %% [markdown]
# ### Stage 2: partition the gradients too
#
# The same collectives as stage 1. The difference is what happens to a gradient bucket once it has
# been reduce-scattered: stage 2 frees it and keeps only this rank's averaged chunk (2Ψ/N).

# %%
dash = Dashboard("Stage 2 (+ gradients partitioned), 4 ranks, bf16", theory=theory(2))
runs[2] = ds_lab.launch(zero_train, WORLD, config(2), batches, MODEL, dashboard=dash)

# %% [markdown]
# ### Stage 3: partition the parameters too
#
# Now even the bf16 weights are chunks: 16Ψ/N in all. Every module with parameters is one *unit*.
# It is all-gathered just before its forward and freed right after. It is gathered again just
# before its backward, and its gradients are reduce-scattered as soon as they exist.
#
# The model is **untied** (`tie_weights=False`). With tied weights `lm_head` reads the token
# embedding's matrix, which belongs to the embedding's unit. In forward that unit is gathered
# twice: for the embedding (first module) and again for the head (last), released in between.
# In backward it is gathered only once: the head's backward gathers it, and it stays gathered
# until its gradient is complete, which is after the embedding's backward (the last one). So a
# tied model pays **one extra forward gather of the embedding**, V·h elements, and no more: we
# measure it below.

# %%
dash = Dashboard("Stage 3 (+ parameters partitioned), 4 ranks, bf16", theory=theory(3))
runs[3] = ds_lab.launch(zero_train, WORLD, config(3), batches, MODEL, dashboard=dash)

# %% [markdown]
# ### zero.Init: never build the whole model
#
# Stage 3 keeps 16Ψ/N bytes per rank *while training*. But in the runs above every rank first
# built the whole GPT in fp32 (4Ψ bytes) and only then handed it to the engine to cut up. For a
# model that doesn't fit on one GPU, that first step already fails. `zero.Init` is a context
# manager. Every module built inside it is partitioned **the moment its own `__init__`
# returns**: rank 0's freshly initialized values are broadcast, each rank keeps its chunk, and
# `param.data` becomes an empty tensor. At any moment the whole values of only one module exist.
#
# First, the article's §3.1 code. It calls Init on a model that already exists, after
# `initialize` (the worker tries it when `article_call=True`):
#
# ```python
# engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, ...)
# engine.zero.Init(module=model)      # article §3.1
# ```
#
# `engine.zero` does not exist. In DeepSpeed, `zero` is the package `deepspeed.zero`, not an
# attribute of the engine, so the line fails with `AttributeError: 'DeepSpeedEngine' object has no
# attribute 'zero'`, and ds_lab fails the same way (its ZeRO optimizer is `engine.zero_optimizer`);
# we print what happened below. The call the article probably meant, `zero.Init(module=model)`, exists in
# DeepSpeed. There it converts an *already built* model to partitioned parameters, which is what
# DeepSpeed's stage-3 engine does by itself anyway, and it saves no peak memory, because the whole
# model has already been built on every rank. ds_lab does the same (a GPT built first and
# converted afterwards keeps only its chunks: shown after the measurements below).

# %% [markdown]
# The right way: build the model *inside* the context, before `initialize`:
#
# ```python
# with ds_lab.zero.Init():                 # deepspeed.zero.Init(config_dict_or_path=...) in DeepSpeed
#     model = GPT(GPTConfig(**MODEL))      # each module partitioned as soon as it is built
# engine, *_ = ds_lab.initialize(model=model, config={..., "zero_optimization": {"stage": 3}})
# ```
#
# The worker does exactly that when `use_init=True`. To see what construction costs without asking
# Init, rank 0 samples the census of fp32 tensors each time a module registers a parameter
# (`ds_lab.lab.ConstructionProbe`). We also turn stage 3's **prefetch** off
# (`stage3_prefetch_bucket_size: 0`). Prefetching starts the all-gather of the next modules
# before they run, to hide the wait. That trades memory for speed, and the default budget of 50M
# elements is larger than our whole model, so it would gather everything ahead of time. With
# prefetch off we can see the minimum: the whole parameters of one module at a time.

# %%
dash = Dashboard("zero.Init: the model built partitioned, then ZeRO-3 (prefetch off), 4 ranks, bf16",
                 theory=theory(3))
init_run = ds_lab.launch(zero_train, WORLD, config(3, stage3_prefetch_bucket_size=0), batches, MODEL,
                         use_init=True, article_call=True, dashboard=dash)

# %%
built = init_run[0]["built"]
shape_now, real_shape = built["example"]
print(f"after construction: the parameters hold {built['param_elements']} elements "
      f"(their real shapes add up to Ψ = {built['real_elements']:,})")
print(f"  e.g. lm_head.weight.shape = {shape_now}, its real shape {real_shape}")
print(f"  rank 0 keeps {built['kept_bytes']:,} bytes of fp32 tensors (census): its chunks, 4Ψ/N; "
      f"the whole model would be {4 * PSI:,}")

# Each module's own parameters, from a model built the ordinary way (here in the notebook, no
# ranks): Init pads each module's flat vector, and ZeRO-3 each unit, to a multiple of N.
own = own_parameter_counts(GPT(GPTConfig(**MODEL)))
largest_module = max(own, key=own.get)
LARGEST_PADDED = PADDED[largest_module]
with ConstructionProbe() as whole_build:   # the same census, sampled while building the whole model here
    GPT(GPTConfig(**MODEL))
print(f"construction peak (fp32 census, sampled at every parameter): {built['peak_bytes']:,} bytes under "
      f"zero.Init, {whole_build.peak:,} built whole (4Ψ = {4 * PSI:,})")
print(f"  one module whole, {largest_module} ({own[largest_module]:,} parameters): {4 * LARGEST_PADDED:,} bytes")

r3, r3_init = runs[3][0], init_run[0]
print(f"ZeRO-3 whole parameters in use (our own hooks): peak {r3_init['peak_whole']:,} bytes with prefetch off, "
      f"{r3['peak_whole']:,} with the default prefetch; one module is {2 * LARGEST_PADDED:,} (bf16)")
print(f"all-gathered before the first module had run (last step): prefetch off "
      f"{r3_init['gathered_by_first_module'][-1]:,} bytes, default prefetch {r3['gathered_by_first_module'][-1]:,}"
      f" (the whole model, 2Ψ = {2 * PSI:,})")
print(f"\nthe article's `engine.zero.Init(module=model)` after initialize: {r3_init['article_call']}")


# %%
def convert_a_built_model():
    model = GPT(GPTConfig(**MODEL))            # built whole on every rank: the peak is already paid
    whole = sum(p.numel() for p in model.parameters())
    ds_lab.zero.Init(module=model)             # then partitioned, as if built inside the context
    return whole, sum(p.numel() for p in model.parameters()), sum(torch.Size(p.ds_shape).numel() for p in model.parameters())


converted = ds_lab.launch(convert_a_built_model, 2)
for rank, (whole, left, shapes) in enumerate(converted):
    print(f"rank {rank}: {whole:,} elements built whole, {left:,} left in the module after Init(module=...), "
          f"{shapes:,} described by ds_shape")


# %% [markdown]
# Built whole, the model's fp32 tensors reach 4Ψ; under Init the samples stay at the chunks kept
# so far (at most 4Ψ/N) plus the module being built. The samples fall between parameters, so
# they miss one moment: when a module is done, Init holds its flat vector beside its fresh
# tensors, about one module more. Still one module, not the model. Our own hooks tell the same
# story while training with prefetch off: only the running module's parameters are whole. With
# the default prefetch budget (50M elements, more than this model), the engine starts gathering
# every module as soon as the first one runs: the comm log shows the whole model requested before
# the first module has finished. Training then goes on as usual from the partitioned model. The
# assertions check that its losses are exactly those of the stage-3 run that built the model
# whole.
#
# ### GatheredParameters: look at, or change, a partitioned weight
#
# Under stage 3 a parameter outside its module's forward is an empty tensor. To read it, or to
# change it (load a pretrained row, re-initialize a layer), gather it for the duration of a
# block. With `modifier_rank=r`, rank *r*'s values are broadcast on exit and partitioned again.
# Without it, the block is read-only.
#
# Here ds_lab and DeepSpeed differ, and ds_lab is the better of the two:
#
# - **The fp32 master.** DeepSpeed's `GatheredParameters._exit`
#   (`deepspeed/runtime/zero/partition_parameters.py`) broadcasts the 16-bit parameter and
#   re-partitions *it*. The optimizer's fp32 master chunk is not refreshed, so the next
#   `engine.step()` writes the old master over the edit (a known DeepSpeed issue). DeepSpeed's
#   documented route to change a trained weight is `deepspeed.utils.safe_set_full_fp32_param`
#   (with `safe_get_full_fp32_param`, `safe_get_full_optimizer_state`,
#   `safe_set_full_optimizer_state`, `safe_get_full_grad`). ds_lab refreshes the fp32 master
#   chunks on exit, so the edit survives the step, and it also provides the same functions as
#   `ds_lab.utils.safe_*` (the demo reads the master with one, and writes a row with another).
# - **A change without `modifier_rank`.** DeepSpeed 0.19.8 detects the in-place change (one
#   all-reduce of a flag), drops it on every rank and raises a `RuntimeError` ("Use
#   modifier_rank=<rank> to broadcast updates across ranks"). ds_lab does the same (rank 1 tries below).

# %%
def gathered_parameters_demo():
    """Runs on every rank: rank 0 changes one row of lm_head.weight; every rank sees it."""
    rank = comm.get_rank()
    torch.manual_seed(0)
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**MODEL)), config=config(3))
    weight = engine.module.lm_head.weight
    out = dict(outside=tuple(weight.shape))
    with GatheredParameters(weight, modifier_rank=0):
        out["inside"] = tuple(weight.shape)
        if rank == 0:
            with torch.no_grad():
                weight[0].fill_(1.0)           # changed on rank 0 only: broadcast on exit
    try:
        with GatheredParameters(weight):       # no modifier_rank: look only; a change is dropped, and raises
            out["row0"] = weight[0].float().clone()
            out["row1_before"] = weight[1].float().clone()
            if rank == 1:
                with torch.no_grad():
                    weight[1].fill_(1.0)
    except RuntimeError as error:              # on every rank, not only rank 1
        out["no_modifier_error"] = str(error)
    with GatheredParameters(weight):
        out["row1_after"] = weight[1].float().clone()
    out["master_row0"] = safe_get_full_fp32_param(weight)[0]   # the fp32 master followed (collective)
    safe_set_full_fp32_param(weight, torch.full(out["inside"], 2.0))  # DeepSpeed's route: every rank, same value
    with GatheredParameters(weight):
        out["after_safe_set"] = weight.float().unique().tolist()
    out["after"] = tuple(weight.shape)
    return out


gathered = ds_lab.launch(gathered_parameters_demo, WORLD)
for rank, r in enumerate(gathered):
    print(f"rank {rank}: shape outside {r['outside']}, inside {r['inside']}, after {r['after']}; "
          f"row 0 = {r['row0'].unique().tolist()}, fp32 master row 0 = {r['master_row0'].unique().tolist()}; "
          f"rank 1's change kept: {torch.equal(r['row1_after'], torch.ones_like(r['row1_after']))} "
          f"({r['no_modifier_error'][:60]}...); "
          f"after safe_set_full_fp32_param(weight, 2.0): {r['after_safe_set']}")


# %% [markdown]
# ### Offload: the optimizer's share in host memory
#
# When even 2Ψ + 14Ψ/N does not fit, ZeRO-Offload moves the optimizer's part of the model states
# to the host: `"offload_optimizer": {"device": "cpu"}`. The fp32 master shard, Adam's two moments
# and an fp32 copy of the averaged gradient shard live in host memory (larger than a GPU's, and
# slower to reach), and the optimizer step runs there, on the CPU. The device keeps the 16-bit
# weights and gradients. Each step the gradient shard crosses to the host once (after the last
# reduce-scatter), and the updated weights come back once (before the all-gather). At stage 2 the
# device then holds 2Ψ + 2Ψ/N, and the host 16Ψ/N: 4Ψ/N master, 8Ψ/N moments, and 4Ψ/N for the fp32
# gradient copy, which is the price of the move. The other price is time: that traffic, and an
# optimizer step at CPU speed (`ds_lab/zero/offload.py`).
#
# This machine has no GPU, so "device" and "host" are the same memory here and nothing physically
# moves. The code path is the real one, though (explicit copies between host buffers and device
# buffers), and the ledger files each tensor under where the engine designates it to live
# (`memory_report()["placement"]`). Stage 2, the same batches, the optimizer offloaded:

# %%
offloaded = ds_lab.launch(zero_train, WORLD, config(2, offload_optimizer={"device": "cpu", "pin_memory": True}),
                          batches, MODEL)
placement = offloaded[0]["memory"]["placement"]
print(f"{'rank 0, bytes':18s} {'host':>12s} {'device':>12s}   (stage 2, N = {WORLD}, Ψ = {PSI:,})")
for category, where in placement.items():
    print(f"{category:18s} {where['host']:>12,} {where['device']:>12,}")
host = sum(where["host"] for where in placement.values())
device = sum(where["device"] for where in placement.values())
print(f"{'total':18s} {host:>12,} {device:>12,}   host = {host / PSI:.2f}Ψ, device = {device / PSI:.2f}Ψ "
      f"(without offload: {sum(model_states(runs[2][0]['memory']).values()) / PSI:.2f}Ψ on the device)")
print("same losses as stage 2 without offload, bit for bit:",
      [r["losses"] for r in offloaded] == [r["losses"] for r in runs[2]])


# %% [markdown]
# ## Measure
#
# ### Memory per rank
#
# The ledger of rank 0 after the last step (all ranks hold the same bytes: every rank's chunk has
# the same size), beside `estimate_ledger`. In each stage's second row, `formula` is the paper's
# expression (`ds_lab.zero.estimate.formula(stage)`).

# %%
def states(run):
    return model_states(run["memory"])


rows = {stage: (states(results[0]), estimate_ledger(PSI, WORLD, stage, "bf16"), formula(stage))
        for stage, results in runs.items()}
print(states_vs_formula_table(rows, PSI, f"model states per rank, bytes (Ψ = {PSI:,}, N = {WORLD}, bf16)"))
print("\ncensus of rank 0 (bytes by dtype)  vs  formula: bf16 = params + grads, fp32 = master + Adam")
for stage, results in runs.items():
    expected = estimate_ledger(PSI_PADDED[stage], WORLD, stage, "bf16")
    print(f"stage {stage}: {results[0]['census']}   formula: bf16 {expected['params'] + expected['grads']:,}, "
          f"fp32 {expected['master_params'] + expected['optimizer_states']:,}")

from ds_lab.monitor.plots import MEMORY_COLORS as colors  # the dashboard's colours

fig, ax = plt.subplots(figsize=(8, 3.8))
for stage, results in runs.items():
    measured, expected = states(results[0]), estimate_ledger(PSI, WORLD, stage, "bf16")
    bottom_m = bottom_f = 0
    for c in STATES:
        ax.bar(stage - 0.2, measured[c] / 2**20, 0.38, bottom=bottom_m, color=colors[c],
               label=c if stage == 0 else None)
        ax.bar(stage + 0.2, expected[c] / 2**20, 0.38, bottom=bottom_f, facecolor=colors[c], alpha=0.35,
               edgecolor=colors[c], hatch="//")
        bottom_m, bottom_f = bottom_m + measured[c] / 2**20, bottom_f + expected[c] / 2**20
    ax.text(stage + 0.2, bottom_f, formula(stage), ha="center", va="bottom", fontsize=7, style="italic")
ax.set_xticks(range(4), [f"stage {s}\nmeasured | formula" for s in range(4)], fontsize=8)
ax.set(ylabel="model states per rank (MiB)", title=f"Each stage partitions one more state (N = {WORLD})")
ax.legend(fontsize=8, frameon=False)
plt.show()


# %% [markdown]
# The ledger, the census and the formula agree to the byte. The only possible difference is
# padding: every unit is padded to a multiple of N elements, so a rank can hold up to N−1 extra
# elements per unit, and the formula then holds for the padded Ψ. Here every bucket and every
# module happens to divide by 4, so the padded Ψ is Ψ (the assertions use the padded Ψ anyway:
# change `MODEL` and they still hold to the byte). At N = 4, stage 1 keeps 7Ψ (16 → 4 + 12/4),
# stage 2 keeps 5.5Ψ, and stage 3 keeps exactly 4Ψ = 16Ψ/N.
#
# ### Traffic and time per step
#
# The collectives of the last step on rank 0. What `ds_lab.comm` measures is each **message**: the
# tensor handed to a collective, in bytes (the nccl-tests size: the whole input of a
# reduce-scatter, the whole output of an all-gather). gloo does not report what it sends, so the
# bytes one rank puts on the wire are a model: **ring-model bytes** = message bytes × (N−1)/N for
# a reduce-scatter or all-gather, × 2(N−1)/N for an all-reduce (`CommRecord.wire_bytes`). Chapter 2
# checked that model against a ring all-reduce built from `send`/`recv`
# (`ds_lab.comm.ring.ring_all_reduce`), which counts what it really sends. The assertions below
# check the messages, which are measured. Step times are the median over steps 2 to 4.

# %%
def median_ms(results):
    return 1e3 * statistics.median(results[0]["step_seconds"][1:])  # skip the first (warm-up) step


wire = {stage: sum(results[0]["wire"][-1].values()) for stage, results in runs.items()}  # ring-model bytes
print(f"{'stage':<7}{'collectives per step (calls)':<58}{'ring-model B':>13}{'/ stage 0':>10}"
      f"{'formula':>12}{'step (ms)':>11}")
for stage, results in runs.items():
    calls = ", ".join(f"{tag} {n}" for tag, n in results[0]["calls"][-1].items() if n)
    print(f"{stage:<7}{calls:<58}{wire[stage]:>13,.0f}{wire[stage] / wire[0]:>10.3f}"
          f"{traffic(stage):>12,.0f}{median_ms(results):>11.1f}")

by_tag = r3["wire"][-1]
print(f"\nstage 3: {len(PADDED)} units (one per module with parameters); per step "
      f"{r3['calls'][-1]['param_allgather']} all-gathers and {r3['calls'][-1]['grad_reduce_scatter']} "
      f"reduce-scatters (prefetch off: {r3_init['calls'][-1]['param_allgather']} and "
      f"{r3_init['calls'][-1]['grad_reduce_scatter']})")
print(f"  all-gather {by_tag['param_allgather']:,.0f} B = 2 x (N-1)/N x 2Ψ,   "
      f"reduce-scatter {by_tag['grad_reduce_scatter']:,.0f} B = (N-1)/N x 2Ψ   (ring-model bytes)")

# %% [markdown]
# Those are the three collectives ZeRO changes. To show that nothing else travels (no optimizer
# state, ever), we add up **every** collective of a step, tagged or not, and list what is left.

# %%
for stage, results in runs.items():
    r = results[0]
    tagged = sum(sum(sizes) for sizes in r["messages"][-1].values())
    print(f"stage {stage}: every collective of the step {r['all_bytes'][-1]:,} message bytes = the three above "
          f"{tagged:,} + the rest {r['others'][-1]}")

# %% [markdown]
# What is left is one 8-byte scalar at stages 1 to 3: the partial sums of squares of the gradient
# shards, all-reduced in float64, for the global gradient norm (gradient clipping is on at 1.0,
# DeepSpeed's default). In fp16 an overflow flag would join it. At stage 0 every rank holds every
# gradient, so the norm needs no collective. The optimizer states (12Ψ bytes, or 12Ψ/N per rank)
# never appear: each rank updates its own chunk where it lives.
#
# **Tied weights.** The prediction from the text above (one extra forward gather of the
# embedding, V·h elements), checked on a tied GPT for two steps:

# %%
TIED = {**MODEL, "tie_weights": True}
PSI_TIED = GPT(GPTConfig(**TIED)).num_parameters()
PADDED_TIED = padded_sizes(GPT(GPTConfig(**TIED)), WORLD)
del PADDED_TIED["lm_head"]   # the head registers the embedding's matrix, but it belongs to its first owner
assert sum(own_parameter_counts(GPT(GPTConfig(**TIED))).values()) - PSI_TIED == GPTConfig(**TIED).vocab_size * TIED["n_embd"]
tied_run = ds_lab.launch(zero_train, WORLD, config(3), batches[:2], TIED)
EMBEDDING = PADDED_TIED["wte"]                                  # V x h, padded
tied_expected = {"grad_allreduce": 0, "grad_reduce_scatter": 2 * sum(PADDED_TIED.values()),
                 "param_allgather": 2 * 2 * sum(PADDED_TIED.values()) + 2 * EMBEDDING}
tied_ratio = sum(tied_run[0]["wire"][-1].values()) / (2 * (WORLD - 1) / WORLD * 2 * PSI_TIED)  # / data parallel
predicted_ratio = 1.5 + EMBEDDING / (2 * PSI_TIED)   # (3Ψ + Vh) / 2Ψ
print(f"tied GPT, Ψ = {PSI_TIED:,}: messages per step {[{t: sum(v) for t, v in m.items()} for m in tied_run[0]['messages']]}")
print(f"  predicted {tied_expected}; ring-model bytes / data parallel {tied_ratio:.4f}, "
      f"predicted 1.5 + Vh/2Ψ = {predicted_ratio:.4f}")

# %% [markdown]
# - **Stages 1 and 2 send exactly what stage 0 sends**: one reduce-scatter and one all-gather per
#   bucket instead of one all-reduce. Same bytes, 12Ψ/N or 14Ψ/N instead of 12Ψ or 14Ψ of memory.
# - **Stage 3 sends 1.5×** (with `stage3_max_reuse_distance: 0`): each module's parameters are
#   gathered twice, once in forward and once in backward, and nothing is gathered after the step.
#   A tied model sends exactly one embedding more: 1.5 + Vh/2Ψ.
# - **Nothing else travels** but one scalar per step, the gradient norm: the optimizer states stay
#   where they are updated.
# - **Step times** on this machine: gloo, 4 ranks on 2 shared CPU cores, tiny messages. They move
#   by tens of percent from run to run, so don't read much into stages 0 to 2. Without prefetch,
#   stage 3 issues one all-gather per module per pass, so its fixed per-call cost shows. On GPUs
#   with NCCL the gathers overlap with compute (that is what prefetch is for). Timings are
#   reported here, never asserted.
# - **Stage 3's live parameters.** With the default prefetch budget the whole model was requested
#   at once, as soon as the first module ran (2Ψ bytes, because our model is smaller than the
#   budget). With prefetch off (the zero.Init run) only the running module was gathered.
#   `stage3_prefetch_bucket_size` is the knob between the two. DeepSpeed also caps the total with `stage3_max_live_parameters`, which
#   ds_lab accepts but does not enforce yet.
#
# ## Compare with theory
#
# ### Same losses at every stage
#
# Partitioning changes *where* the states live, not the arithmetic. Every stage trains on the
# same global batches from the same weights, so the losses should match. The losses above are
# bf16 numbers (8 significant bits), which can only tell us so much.
#
# In bf16 we compare the ZeRO stages with each other, not with stage 0, and that is DeepSpeed's
# doing: its stage-0 mixed-precision optimizer runs one Adam step with zero gradients when it is
# built (`FP16_Optimizer.initialize_optimizer_states` in `deepspeed/runtime/fp16/fused_optimizer.py`),
# so its step counter, and with it Adam's bias correction, runs one step ahead of ZeRO's (whose
# `initialize_optimizer_states` takes no step). ds_lab does the same, so that a DeepSpeed script gives
# DeepSpeed's losses bit for bit (`tests/test_examples.py`). Stage 0 meets the others in fp32 below,
# where neither takes that step.

# %%
bf16_losses = {stage: global_losses(results) for stage, results in runs.items()}
bf16_diff = {stage: max(abs(a - b) / abs(b) for a, b in zip(bf16_losses[stage], bf16_losses[1]))
             for stage in runs if stage > 0}
for stage in runs:
    print(f"stage {stage}: losses {[round(x, 4) for x in bf16_losses[stage]]}   " +
          (f"max relative difference to stage 1: {bf16_diff[stage]:.1e}" if stage > 0 else
           "(Adam's step counter one ahead: DeepSpeed's stage-0 initial step)"))
print(f"zero.Init + stage 3:  {[round(x, 4) for x in global_losses(init_run)]}")

# %% [markdown]
# For a sharp check we run the four stages again in **fp32**, where data parallelism already
# matched one process to 10⁻⁵ (chapter 2). Note the memory panels: in fp32 the paper's
# formula has no master copy (K = 8: *m* and *v*), but ds_lab, like DeepSpeed, runs the optimizer
# on a separate flat fp32 copy of the rank's chunk even when the model itself is fp32, at stages 1
# and 2, where the whole fp32 parameters stay on every rank. Those stages therefore hold 4Ψ/N
# bytes more `master_params` than the hatched bar. At stage 3 the rank's parameter chunk *is* its
# master chunk (nothing else of the parameters is kept), so the bar meets the formula, 16Ψ/N.

# %%
fp32_runs = {}
for stage in range(4):
    dash = Dashboard(f"Stage {stage}, fp32, 4 ranks: the equivalence run", theory=theory(stage, precision="fp32"))
    fp32_runs[stage] = ds_lab.launch(zero_train, WORLD, config(stage, "fp32"), batches, MODEL, dashboard=dash)

# %%
fp32_losses = {stage: global_losses(results) for stage, results in fp32_runs.items()}
fp32_diff = {stage: max(abs(a - b) / abs(b) for a, b in zip(fp32_losses[stage], fp32_losses[0]))
             for stage in fp32_runs}
for stage in fp32_runs:
    print(f"stage {stage}: {[f'{x:.6f}' for x in fp32_losses[stage]]}   max relative difference to stage 0: "
          f"{fp32_diff[stage]:.1e}")

fig, ax = plt.subplots(figsize=(7, 3.2))
for stage, losses in fp32_losses.items():
    ax.plot(range(STEPS), losses, "o-" if stage == 0 else "x--", lw=4 if stage == 0 else 1.5,
            alpha=0.4 if stage == 0 else 1, label=f"stage {stage}")
ax.set(xlabel="optimizer step", ylabel="loss (global batch)", title="fp32: every stage, the same trajectory")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ### The estimator: the paper's Figure 1, and what fits on your GPU
#
# We measured the formula on a 1.9M-parameter model, so we can trust it where we can't run it.
# `format_table` prints the paper's Figure 1: Ψ = 7.5B on N = 64 GPUs (GB = 10⁹ bytes, as in the
# paper).

# %%
print(format_table(7.5e9, world_size=64))
FIGURE_1 = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}   # GB per GPU, as printed in the paper
figure_1 = {stage: estimate_model_states(7.5e9, 64, stage)["total"] / 1e9 for stage in range(4)}
print("\n" + ", ".join(f"stage {s}: {figure_1[s]:.3f} GB (paper {FIGURE_1[s]})" for s in range(4)))

# %% [markdown]
# Turned around: the largest model whose model states fit in 80 GB per GPU, at 8 GPUs (one node)
# and at 64. Activations, communication buffers and fragmentation need room too, so read these as
# upper bounds.

# %%
for world_size in (8, 64):
    print(format_what_fits(80e9, world_size=world_size))
fits = {n: what_fits(80e9, world_size=n) for n in (8, 64, 1024)}
print(f"\nstage 1 tends to 80 GB / 4 B = 20B and stage 2 to 80 GB / 2 B = 40B as N grows;"
      f" stage 3 grows with N: {fits[1024][3] / 1e12:.1f}T parameters on 1024 GPUs")

# %% [markdown]
# ### Assertions: measured vs theory

# %%
# Model states per rank equal the paper's formula to the byte, at every stage and on every rank,
# with Ψ padded as each unit is (to a multiple of N; PSI_PADDED, predicted from the model).
# Measured twice: the engine's ledger by category, and the census of the rank's tensors by dtype
# (bf16 = weights + gradients, fp32 = master + Adam m, v), which does not ask the engine.
for stage, results in runs.items():
    expected = estimate_ledger(PSI_PADDED[stage], WORLD, stage, "bf16")
    for r in results:
        assert r["num_parameters"] == PSI
        assert states(r) == {c: expected[c] for c in STATES}, (stage, states(r), expected)
        assert r["census"] == {"bfloat16": expected["params"] + expected["grads"],
                               "float32": expected["master_params"] + expected["optimizer_states"]}, (stage, r["census"])
# ... and they shrink: 16Ψ > 4Ψ + 12Ψ/N > 2Ψ + 14Ψ/N > 16Ψ/N
totals = [sum(states(runs[s][0]).values()) for s in range(4)]
assert totals == sorted(totals, reverse=True) and totals[0] == 16 * PSI
print("model states per rank / Ψ:", [round(t / PSI, 3) for t in totals])

# %%
# Traffic per step, from the messages handed to each collective (bf16, so 2 bytes per element),
# against the model's sizes: stage 0 all-reduces every bucket (2Ψ in all); stages 1 and 2
# reduce-scatter and then all-gather every padded bucket (2Ψ_p each); stage 3 all-gathers every
# padded module twice, in forward and in backward (2 x 2Ψ_p), and reduce-scatters it once (2Ψ_p).
# On every rank and every step.
expected_messages = {
    0: dict(grad_allreduce=[2 * b for b in BUCKETS], grad_reduce_scatter=[], param_allgather=[]),
    1: dict(grad_allreduce=[], grad_reduce_scatter=[2 * padded(b, WORLD) for b in BUCKETS],
            param_allgather=[2 * padded(b, WORLD) for b in BUCKETS]),
    3: dict(grad_allreduce=0, grad_reduce_scatter=2 * PSI_PADDED[3], param_allgather=2 * 2 * PSI_PADDED[3]),
}
expected_messages[2] = expected_messages[1]
for stage, results in runs.items():
    for r in results:
        for step in r["messages"]:
            if stage == 3:  # how many messages is the engine's choice (prefetch, buckets): their sum is not
                step = {tag: sum(sizes) for tag, sizes in step.items()}
                assert step == expected_messages[3], step
            else:
                assert step == expected_messages[stage], (stage, step)
# Every collective of every step, tagged or not: the three above plus, at stages 1-3, one float64
# scalar (the gradient norm's sum of squares). No optimizer state ever travels.
for stage, results in runs.items():
    for r in results:
        for messages, others, every in zip(r["messages"], r["others"], r["all_bytes"]):
            assert others == ([] if stage == 0 else [("all_reduce", "grad_norm", 8)]), (stage, others)
            assert every == sum(sum(sizes) for sizes in messages.values()) + (0 if stage == 0 else 8)
# Counts, from the model alone: one message per bucket at stages 0-2 (checked above, message by
# message); with prefetch off, stage 3 gathers each unit once in forward and once in backward.
assert all(c["param_allgather"] == 2 * len(PADDED) for r in init_run for c in r["calls"])
# So, with the ring algorithm's (N-1)/N per reduce-scatter or all-gather and 2(N-1)/N per
# all-reduce, stages 1 and 2 send what stage 0 sends (2Ψ_p = 2Ψ here) and stage 3 sends 1.5x,
# in ring-model bytes, exactly.
assert PSI_PADDED == {0: PSI, 1: PSI, 2: PSI, 3: PSI}   # no padding in this model: exactly 1 and 1.5
assert wire[1] == wire[2] == wire[0] == traffic(0) and wire[3] == 1.5 * wire[0]
# Tied weights: exactly one more forward gather of the embedding's unit, every step, every rank
for r in tied_run:
    assert all({t: sum(v) for t, v in m.items()} == tied_expected for m in r["messages"]), r["messages"]
    assert all(others == [("all_reduce", "grad_norm", 8)] for others in r["others"])
assert sum(PADDED_TIED.values()) == PSI_TIED and abs(tied_ratio - predicted_ratio) < 1e-12  # 1.5133, not 1.5
assert round(tied_ratio, 4) == 1.5133
print(f"ring-model bytes per step / stage 0: {[round(wire[s] / wire[0], 4) for s in range(4)]}; "
      f"tied stage 3: {tied_ratio:.4f}")

# %%
# Same losses at every stage. bf16: the first step's loss is bit-identical (same bf16 weights, same
# forward), and later steps agree within one bf16 rounding step, 2**-7 relative (bf16 keeps 8
# significant bits; reductions in a different order may round differently). fp32: within 1e-5.
BF16_TOLERANCE = 2 ** -7
for stage in runs:
    assert bf16_losses[stage][0] == bf16_losses[0][0]
for stage in bf16_diff:  # the ZeRO stages against stage 1 (stage 0 differs by DeepSpeed's initial step)
    assert bf16_diff[stage] <= BF16_TOLERANCE, (stage, bf16_diff[stage])
    assert fp32_diff[stage] <= 1e-5, (stage, fp32_diff[stage])
# fp32 memory, by the census (every tensor is fp32 now): the paper's fp32 formula to the byte,
# plus the flat fp32 master copy of the chunk (4Ψ_p/N) at stages 1 and 2 (at stage 3 the
# parameter chunk is the master chunk)
for stage, results in fp32_runs.items():
    expected = estimate_ledger(PSI_PADDED[stage], WORLD, stage, "fp32")["total"]
    expected += 4 * PSI_PADDED[stage] // WORLD if stage in (1, 2) else 0
    for r in results:
        assert r["census"] == {"float32": expected}, (stage, r["census"], expected)
print(f"largest relative loss difference: bf16 (to stage 1) {max(bf16_diff.values()):.1e} "
      f"(tolerance {BF16_TOLERANCE:.1e}), fp32 (to stage 0) {max(fp32_diff.values()):.1e} (tolerance 1e-5)")

# %%
# zero.Init: after construction the parameters hold nothing, and the census of rank 0 finds its
# chunks only: 4Ψ_p/N bytes of fp32, to the byte (each module padded to a multiple of N). While
# the model was built, the census never held more than those chunks plus one whole module (the
# largest, padded); built whole, it reaches 4Ψ.
built = init_run[0]["built"]
assert built["param_elements"] == 0 and built["real_elements"] == PSI
assert built["kept_bytes"] == 4 * PSI_PADDED[3] // WORLD, built
assert built["peak_bytes"] <= 4 * PSI_PADDED[3] // WORLD + 4 * LARGEST_PADDED < 4 * PSI / 3, built
assert whole_build.peak == 4 * PSI, whole_build.peak
# the model built partitioned trains exactly like the one built whole (same bf16 losses, every rank)
assert [r["losses"] for r in init_run] == [r["losses"] for r in runs[3]]
# While training with prefetch off, our hooks saw the whole parameters of one module at a time:
# the largest module, padded, in bf16.
assert all(r["peak_whole"] == 2 * LARGEST_PADDED for r in init_run), [r["peak_whole"] for r in init_run]
# Prefetch: with it off, only the first module's own unit is requested before that module has run.
# With the default budget (50M elements, more than the model) the whole model is, 2Ψ_p bytes, from
# the second step on (the first step records the order the modules run in).
first = 2 * PADDED[next(iter(PADDED))]   # the token embedding, the first module forward runs
assert all(r["gathered_by_first_module"] == [first] * STEPS for r in init_run)
assert all(r["gathered_by_first_module"] == [first] + [2 * PSI_PADDED[3]] * (STEPS - 1) for r in runs[3])
# the article's call fails exactly as it does in DeepSpeed (the engine has no `zero`)
assert init_run[0]["article_call"] == "AttributeError: 'DeepSpeedEngine' object has no attribute 'zero'"
assert all(whole == shapes == PSI and left == 0 for whole, left, shapes in converted)  # Init(module=) partitions
# GatheredParameters(modifier_rank=0): rank 0's change reaches every rank and the fp32 master;
# a change made without modifier_rank is dropped on every rank, and every rank raises DeepSpeed's error
for r in gathered:
    assert "Use modifier_rank=<rank> to broadcast updates across ranks" in r["no_modifier_error"]
    assert r["outside"] == r["after"] == (0,)
    assert r["inside"] == (GPTConfig(**MODEL).vocab_size, MODEL["n_embd"])
    assert torch.all(r["row0"] == 1.0) and torch.all(r["master_row0"] == 1.0)
    assert torch.equal(r["row1_after"], r["row1_before"]) and not torch.all(r["row1_after"] == 1.0)
    assert r["after_safe_set"] == [2.0]   # safe_set_full_fp32_param reached the model's own bf16 chunks
print(f"construction peak {built['peak_bytes']:,} bytes under Init vs {whole_build.peak:,} built whole; "
      f"whole parameters in use at once: {init_run[0]['peak_whole']:,} bytes")

# %%
# Offload (stage 2, optimizer in host memory): the device keeps 2Ψ + 2Ψ/N (the bf16 weights and this
# rank's bf16 gradient shard), the host 16Ψ/N (fp32 master, Adam's m and v, the fp32 gradient shard),
# to the byte, in the ledger and in the census; and the run is the same run: its losses equal stage 2's bit for bit on every rank.
psi_2 = PSI_PADDED[2]
for r in offloaded:
    where = r["memory"]["placement"]
    assert {c: w["device"] for c, w in where.items() if w["device"]} == {"params": 2 * PSI, "grads": 2 * psi_2 // WORLD}
    assert {c: w["host"] for c, w in where.items() if w["host"]} == {
        "master_params": 4 * psi_2 // WORLD, "optimizer_states": 8 * psi_2 // WORLD, "grads": 4 * psi_2 // WORLD}
    # the census (every tensor alive in the rank, by dtype, not asking the engine) agrees: bf16 is the
    # device's 2Ψ + 2Ψ/N, fp32 the host's 16Ψ/N
    assert r["census"] == {"bfloat16": 2 * PSI + 2 * psi_2 // WORLD, "float32": 16 * psi_2 // WORLD}, r["census"]
assert [r["losses"] for r in offloaded] == [r["losses"] for r in runs[2]]
print("offload: device", sum(w["device"] for w in placement.values()) / PSI, "Ψ, host",
      sum(w["host"] for w in placement.values()) / PSI, "Ψ")

# %%
# The estimator reproduces the paper's Figure 1 (Ψ = 7.5B, N = 64): 120, 31.4, 16.6, 1.9 GB.
assert {stage: round(gb, 1) for stage, gb in figure_1.items()} == FIGURE_1
# What fits in 80 GB: stage 0 is N-independent (5B); stages 1 and 2 approach 20B and 40B; stage 3 grows with N.
assert fits[8][0] == fits[64][0] == 5e9
assert fits[8][1] < fits[64][1] < 20e9 and fits[8][2] < fits[64][2] < 40e9
assert abs(fits[64][3] / fits[8][3] - 8) < 1e-6   # 16Ψ/N per rank: 8x the ranks, 8x the model
assert fits[1024][3] >= 5e12 and all(fits[n][0] < fits[n][1] < fits[n][2] < fits[n][3] for n in (8, 64, 1024))
print({n: {s: f"{p / 1e9:.1f}B" for s, p in f.items()} for n, f in fits.items()})

# %% [markdown]
# ### Stage 3's traffic against `stage3_max_reuse_distance`
#
# Every stage-3 run above set `stage3_max_reuse_distance` to 0: release each module as soon as it
# has run, so backward gathers everything again. DeepSpeed's default is 10⁹ elements: after a
# module's forward, its parameters stay gathered if fewer than D elements of parameters are used
# before its next use (`PartitionedParameterCoordinator.__params_to_release` in
# `deepspeed/runtime/zero/partitioned_param_coordinator.py`, using the trace of module calls that
# the first step records). The last modules of forward are the first of backward, so with a
# large D they are never gathered twice, and a model smaller than D (ours) is gathered only once
# per step: 1×, the traffic of data parallelism, and the whole model is gathered from the end of
# forward until backward releases each unit (stage 3's memory saving then holds between steps and
# during forward only). `ds_lab.lab.zero_reuse` runs real ranks at
# three distances (2 ranks, the chapter's model; last step of two, since the first records the
# trace) and predicts the all-gathered bytes apart: it walks the module order of one forward on
# this process, with the modules' own sizes, without asking the engine.

# %%
from ds_lab.lab.zero_reuse import last_block_distance, traffic_by_reuse_distance

DISTANCES = [0, last_block_distance(MODEL), 10**9]   # release all; keep only the last block; DeepSpeed's default
reuse = traffic_by_reuse_distance(DISTANCES, world_size=2, model=MODEL)
print(f"{'stage3_max_reuse_distance':>26}{'all-gather B measured':>23}{'predicted':>12}{'/ data parallel':>17}")
for distance, row in reuse.items():
    print(f"{distance:>26,}{row['allgather_bytes']:>23,}{row['predicted_allgather_bytes']:>12,}{row['ratio_to_dp']:>17.4f}")
# measured == predicted, to the byte; the two ends are the paper's 1.5x and data parallel's 1x
assert all(row["allgather_bytes"] == row["predicted_allgather_bytes"] for row in reuse.values())
assert reuse[0]["allgather_bytes"] == 2 * 2 * PSI and reuse[10**9]["allgather_bytes"] == 2 * PSI
assert reuse[0]["ratio_to_dp"] == 1.5 and reuse[10**9]["ratio_to_dp"] == 1.0
assert 1.0 < reuse[DISTANCES[1]]["ratio_to_dp"] < 1.5
# where the parameters stay gathered changes no arithmetic: the same losses at every distance
assert reuse[0]["losses"] == reuse[DISTANCES[1]]["losses"] == reuse[10**9]["losses"]

# %% [markdown]
# So "stage 3 costs 1.5×" is the paper's accounting, with every module released after use. Run
# with DeepSpeed's defaults, a model whose parameters fit under the reuse distance sends 1×; a
# large model keeps only its last layers gathered across the turn from forward to backward, and
# its traffic is a little under 1.5×. The knob trades memory (whole parameters kept) for traffic.

# %% [markdown]
# ## What the article gets wrong, now that we have measured
#
# > **Where the article is wrong or misleading**
# >
# > - §2.2 calls ZeRO "an optimizer". It is a way of *storing* any optimizer's state, partitioned
# >   over the data-parallel ranks. Adam's arithmetic is unchanged: ZeRO-1 by hand gave the
# >   engine's weights bit for bit, and every stage trained to the same losses as plain data
# >   parallelism.
# > - §2.2 says ZeRO removes "redundant gradient and parameter storage", and lists stage 2 as
# >   partitioning the gradients and stage 3 the parameters, as if each stage did one thing. The
# >   largest redundancy is the optimizer state (12 of the 16 bytes per parameter), which stage 1
# >   removes. The stages are cumulative.
# > - §4.3 says that with P GPUs stage 1 leaves each GPU "1/P of the optimizer states". True, but
# >   the GPU still holds 4Ψ of weights and gradients, so its memory is 4Ψ + 12Ψ/P, and the cut is
# >   at most 4×, not P×. The 12 includes the fp32 master copy of the weights, which the article
# >   never mentions.
# > - §3.2 lists parameters, then gradients, then optimizer states, the reverse of the stages. Its
# >   item 4 says ZeRO "transmits only the necessary parameters, gradients and optimizer states,
# >   avoiding redundant communication". ZeRO never sends optimizer states: we summed every
# >   collective of a step, and besides gradients and parameters only one 8-byte norm travels.
# >   ds_lab's stages 1 and 2 send exactly what data parallelism sends; DeepSpeed's stages 1 and 2
# >   (by default) and stage 3 with every module released send 1.5×. ZeRO buys memory with (at most
# >   1.5×) communication. It does not reduce communication.
# >
# >   The item's grain of truth lies in ZeRO's later work, not in the stages: **ZeRO-R**, the
# >   second half of the same paper, partitions *activations* across model-parallel ranks
# >   (partitioned activation checkpointing: `activation_checkpointing.partition_activations`),
# >   removing a redundancy that is not a model state; and **ZeRO++** (Wang et al. 2023) really
# >   does cut ZeRO-3's traffic, by quantizing the weights it all-gathers (qwZ), keeping a
# >   secondary copy of the parameters inside each node so backward's all-gather stays in the
# >   node (hpZ), and quantizing the gradients it reduce-scatters (qgZ): 4× less across nodes.
# > - §3.1's `engine.zero.Init(module=model)` after `initialize` is not how Init works. We ran it
# >   above: it fails in ds_lab exactly as in DeepSpeed (the engine has no attribute `zero`).
# >   `deepspeed.zero.Init(module=model)` exists, but it partitions a model already built whole;
# >   `with zero.Init(): model = ...` is what saves the construction peak.

# %% [markdown]
# ## Exercises
#
# 1. **Tied weights.** The tied GPT above sent one extra forward gather of the embedding at stage 3.
#    Predict what tying changes at stages 0 to 2 (hint: one gradient, one bucket), then run them
#    on `TIED`. At stage 3 with `stage3_prefetch_bucket_size: 0`, count the all-gathers per step:
#    how many more than 2 × the units, and in which pass?
# 2. **Persistence threshold.** Run stage 3 with DeepSpeed's default
#    `stage3_param_persistence_threshold` of 100,000 elements. Which units stay whole on every
#    rank, by how much does `params` per rank grow, and what happens to the all-gathers after the
#    step?
# 3. **Gradient accumulation.** Use 2 accumulation steps (micro batch 1; give the worker a loop
#    over micro-batches, as in chapter 2). ds_lab, like DeepSpeed, reduce-scatters at *every*
#    micro-step in stages 2 and 3 (they keep no full gradient to accumulate into), but only at
#    the boundary in stages 0 and 1. Predict each stage's bytes per optimizer step, then measure
#    them.
# 4. **Prefetch.** Run stage 3 with `stage3_prefetch_bucket_size` of 0, 150,000 and the default,
#    and compare `peak_live` with the size of one module and of the whole model. Is the budget a
#    bound on what is gathered at once? (Read `_prefetch` in `ds_lab/zero/stage3.py`.)
# 5. **DeepSpeed's own estimator.** Call
#    `ds_lab.zero.estimate.estimate_zero3_model_states_mem_needs_all_cold(7.5e9, largest_layer_params=...,
#    num_gpus_per_node=8, num_nodes=8)` for the Figure 1 model. Explain why its per-GPU number is
#    higher than 1.9 GB: which extra buffers does it count?
#
# ## Summary
#
# - ZeRO removes the N-fold copies of the model states in data parallelism. We measured, byte for
#   byte on 4 ranks, 16Ψ → 4Ψ + 12Ψ/N → 2Ψ + 14Ψ/N → 16Ψ/N per rank, as the paper says.
# - Stages 1 and 2 replace the all-reduce with its two halves, a reduce-scatter and an all-gather,
#   with the optimizer step in between: **the same bytes on the wire** as data parallelism. Twenty
#   lines by hand do it, and give the engine's weights bit for bit. (DeepSpeed's own stages 1 and 2
#   all-reduce by default, then all-gather: 1.5×.)
#   Stage 3 gathers each module's parameters in forward and again in backward: **1.5×**, unless
#   `stage3_max_reuse_distance` keeps them gathered. Nothing else travels but a scalar norm.
# - Every stage trains to the same losses as data parallelism (bit-identical first step in
#   bf16, within 10⁻⁵ in fp32): ZeRO changes where the states live, not the math.
# - Offload moves the optimizer's share (master weights, Adam's moments, an fp32 gradient copy:
#   16Ψ/N) to host memory: at stage 2 the device keeps 2Ψ + 2Ψ/N, and the losses do not change.
# - `zero.Init` builds a model already partitioned (one module whole at a time), so a model that
#   doesn't fit on one GPU can still be built. `GatheredParameters` gathers a weight on purpose;
#   `modifier_rank` makes a change stick. The article's `engine.zero.Init(module=model)` is neither.
# - The estimator reproduces the paper's Figure 1 and answers "what fits": in 80 GB, stage 3 on
#   1024 GPUs holds the model states of trillions of parameters.
# - ZeRO does not split the *activations*, nor the work of one layer: every rank still runs the
#   whole model on its micro-batch. Chapter 4 splits the layers themselves, with tensor and
#   pipeline parallelism.
