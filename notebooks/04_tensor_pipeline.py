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
# # 4 · Tensor and pipeline parallelism: splitting the model itself
#
# *Source article §2.1 and §4.2. Skeleton: Goal · The idea · Run it · Measure · Compare with
# theory · Exercises · Summary.*
#
# ## Goal
#
# Chapters 2 and 3 split the *batch*: every rank still runs every layer on its own rows. This
# chapter splits the *model*. Tensor parallelism cuts each matrix multiplication across T ranks.
# Pipeline parallelism gives each of P ranks a contiguous run of layers. At the end you can say
# what each one sends, how much and when, why a pipeline sits partly idle and how much, and how the
# two combine with data parallelism on one grid of ranks. Every claim is measured on real processes
# and checked against the formula at the end.

# %% [markdown]
# ## The idea
#
# ### Tensor parallelism: two ways to split a matrix product
#
# Take $C = AB$ with $A$ of shape $(m, k)$ and $B$ of shape $(k, n)$, and T ranks. There are two
# useful ways to split it.
#
# - **Split $B$ by columns**, $B = [B^{(1)} \,|\, \cdots \,|\, B^{(T)}]$. Every rank needs all of $A$.
#   Rank $i$ computes $C^{(i)} = A B^{(i)}$, which is a block of $C$'s *columns*, so
#   $$C = [\,A B^{(1)} \,|\, \cdots \,|\, A B^{(T)}\,]$$
#   is a **concatenation** (an all-gather, if anyone needs the whole $C$).
# - **Split the inner dimension $k$**: $A$ by columns and $B$ by rows,
#   $A = [A_1 \,|\, \cdots \,|\, A_T]$, $B = [B_1; \cdots; B_T]$. Rank $i$ computes $A_i B_i$, which
#   already has the full shape $(m, n)$: it is one *term* of the sum over $k$. So
#   $$C = \sum_{i=1}^{T} A_i B_i$$
#   is a **sum** (an all-reduce).
#
# Megatron-LM chains the two. In a transformer MLP, $Y = \mathrm{GeLU}(XA)\,B$. Split $A$ by columns:
# each rank gets its own block of the hidden units, and GeLU acts on each element alone, so it
# can run on the blocks without any exchange. The output $\mathrm{GeLU}(XA_i)$ is then exactly the
# row-block of the input that $B_i$ (B split by rows) needs. One all-reduce at the end sums the
# ranks' $\mathrm{GeLU}(XA_i)B_i$. Attention works the same way: the q/k/v projection is split by
# heads (columns), each rank attends with its own heads, and the output projection is split by rows.
#
# Megatron writes this with two operators that are each other's transpose:
#
# | operator | forward | backward | where |
# |---|---|---|---|
# | $f$ (`copy_to_region`) | identity | all-reduce | before the column-parallel layer |
# | $g$ (`reduce_from_region`) | all-reduce | identity | after the row-parallel layer |
#
# $$Y = g\big(\,\mathrm{GeLU}(f(X)\,A_i)\,B_i\,\big)$$
#
# $f$ is an identity going forward, because every rank uses all of X. Going backward, each rank
# holds only its term of $\partial L/\partial X$, so they must be summed. $g$ is the reverse. Each
# all-reduce moves one activation of $b \cdot s \cdot h$ elements (batch × sequence × hidden). A
# transformer layer has two such blocks (attention, MLP), so it costs
#
# $$\textbf{2 all-reduces forward and 2 backward per layer, each of } b\,s\,h \textbf{ elements,}$$
#
# whatever T is. That traffic sits on the critical path, between layers, which is why tensor
# parallelism is kept inside a node (NVLink), and T rarely exceeds 8.
#
# **Sequence parallelism** (Megatron-SP) notices that an all-reduce *is* a reduce-scatter followed
# by an all-gather. It moves the two halves apart: $g$ becomes a reduce-scatter over the sequence
# and $f$ an all-gather. In between, the LayerNorms, dropouts and the residual stream hold only
# $s/T$ of the positions on each rank. The same bytes cross the wire, and the activations saved
# there shrink by $1/T$.
#
# ### Pipeline parallelism: layers in stages, micro-batches in flight
#
# Cut the list of layers into P **stages**, one per rank. Stage $s$ sends its output activation to
# stage $s+1$, and later receives that activation's gradient back. That is one point-to-point
# message of $b\,s\,h$ per stage boundary and per micro-batch, each way: much less traffic than
# tensor parallelism. The cost is **idle time**. With the whole batch as one piece, only one stage
# works at a time. So the batch is cut into $m$ **micro-batches**, and the stages work on different
# micro-batches at once. Filling and draining the pipeline still leaves each stage idle for
#
# $$\text{bubble} = \frac{P-1}{m+P-1}$$
#
# of the time, for both classic schedules. **AFAB** (GPipe: all forwards, then all backwards) keeps
# all $m$ micro-batches' activations alive at once. **1F1B** (PipeDream-Flush, DeepSpeed's
# `TrainSchedule`) starts each micro-batch's backward as early as it can, so stage $s$ holds at most
# $P-s$ of them. The bubble is the same, the memory is not. **Interleaved 1F1B** (Megatron) gives
# each rank $v$ smaller chunks of layers ("virtual stages"). The fill and drain shrink $v$-fold,
# to $(P-1)/(v\,m+P-1)$, at the cost of $v$ times more messages.
#
# > **Where the article is wrong or misleading**
# >
# > - **§4.2's formula is wrong.** It splits $A$ by columns and $B$ by rows, has rank $i$ compute
# >   $C_i = A_i B_i$, and then *concatenates*: $C = [C_1\ C_2 \cdots C_P]$. But each $A_i B_i$
# >   already has $C$'s full shape $(m, n)$; it is one term of the sum over the inner dimension.
# >   The right result is $C = \sum_i A_i B_i$, an **all-reduce**. The concatenation has shape
# >   $(m, nP)$, which is not even the right shape. A concatenation *is* correct for the other split,
# >   $B$ by columns with all of $A$ on every rank: $C = [AB^{(1)} \cdots AB^{(P)}]$. Both are
# >   checked numerically, and then on real ranks, below.
# > - §4.2 never says what the split costs. The all-reduce of the row split is the price of tensor
# >   parallelism: 4 all-reduces of $b\,s\,h$ per transformer layer per step, which we count in the
# >   comm log.
# > - §2.1 describes pipeline parallelism as "each GPU computes some of the layers". Done that way,
# >   one GPU works while P−1 wait. What makes a pipeline useful is splitting the batch into
# >   micro-batches. Even then, $(P-1)/(m+P-1)$ of the time is idle. The article mentions neither.
# > - §2.1 lists data parallelism as a kind of model parallelism (see chapter 2): it replicates the
# >   model. Here the three are what they are, three axes of one grid: pipe × data × model.

# %%
# %matplotlib inline
import math
from collections import Counter

import matplotlib.pyplot as plt
import torch

import ds_lab
from ds_lab.comm.topology import ProcessTopology
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.lab import (draw_gantt, draw_topology, gantt_legend, pipeline_reference, pipeline_train,
                        planned_spans, split_matmul, tensor_parallel_mlp, tensor_parallel_traffic,
                        tensor_parallel_train)
from ds_lab.monitor import Dashboard
from ds_lab.pipe import bubble_fraction, make_schedule, theoretical_bubble, timeline
from ds_lab.pipe.bubble import bubble_worker, measured_bubble

# Tensor parallel: a GPT whose heads (4), hidden size (64) and vocabulary (256) divide by T = 2
TP_MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=32)
T = 2
TP_BATCH = 4                 # sequences per step; tensor partners see the same ones
STEPS = 3
SGD = (0.05, 0.9)            # lr, momentum. SGD, not Adam: Adam hides a gradient off by a constant factor
TP_CONFIG = {"train_batch_size": TP_BATCH, "gradient_clipping": 1.0}

# Pipeline: the same kind of GPT, as a list of 8 layers (embedding, positions, 4 blocks, LayerNorm, head)
PP_MODEL = dict(n_layer=4, n_head=2, n_embd=32, block_size=16)
P = 2
M = 4                        # micro-batches per batch (gradient_accumulation_steps)
MICRO = 2                    # sequences per micro-batch
PP_CONFIG = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 1.0}

loader = DistributedLoader(corpus_tokens(), TP_MODEL["block_size"], TP_BATCH, seed=0)
tp_batches = [loader.batch(i)["input_ids"] for i in range(STEPS)]
# pipeline rows carry s + 1 tokens: inputs are the first s, labels the last s
loader = DistributedLoader(corpus_tokens(), PP_MODEL["block_size"] + 1, M * MICRO, seed=1)
pp_batches = [loader.batch(i)["input_ids"] for i in range(STEPS)]
print(f"tensor parallel: T = {T}, batch {TP_BATCH} x {TP_MODEL['block_size']} tokens, hidden {TP_MODEL['n_embd']}")
print(f"pipeline: P = {P} stages, m = {M} micro-batches of {MICRO} x {PP_MODEL['block_size']} tokens")

# %% [markdown]
# ## Run it
#
# ### 1. The matrix product, split two ways, in one process
#
# First plain arithmetic, no processes: $A$ is $4 \times 6$, $B$ is $6 \times 5$, T = 2.

# %%
torch.manual_seed(0)
A, B = torch.randn(4, 6), torch.randn(6, 5)
C = A @ B
A_cols, B_rows = A.chunk(T, dim=1), B.chunk(T, dim=0)   # the inner dimension k = 6, split in two
B_cols = B.chunk(T, dim=1)                              # B's columns (n = 5: 3 + 2, uneven is fine here)

row_terms = [A_i @ B_i for A_i, B_i in zip(A_cols, B_rows)]
row_split = sum(row_terms)                              # C = sum_i A_i B_i
column_split = torch.cat([A @ B_j for B_j in B_cols], dim=1)   # C = [A B^(1) | A B^(2)]
article = torch.cat(row_terms, dim=1)                   # §4.2: C = [C_1 C_2], with C_i = A_i B_i

print(f"C = A B: shape {tuple(C.shape)}")
print(f"row split    (A by columns, B by rows):  each A_i B_i has shape {tuple(row_terms[0].shape)}")
print(f"  sum_i A_i B_i           max |error| = {(row_split - C).abs().max():.1e}")
print(f"column split (B by columns, A whole):    each A B^(j) has shape "
      f"{[tuple((A @ B_j).shape) for B_j in B_cols]}")
print(f"  [A B^(1) | A B^(2)]     max |error| = {(column_split - C).abs().max():.1e}")
print(f"the article's [A_1 B_1 | A_2 B_2]:       shape {tuple(article.shape)}, not {tuple(C.shape)}; "
      f"and neither half is C (max |A_1 B_1 - C| = {(row_terms[0] - C).abs().max():.2f})")

# %% [markdown]
# ### 2. The same on two real ranks, with the comm log
#
# `ds_lab.lab.split_matmul` runs on every rank and uses the engine's own operators from
# `ds_lab/parallel/mappings.py`. `scatter_to_region` keeps this rank's columns of A, and
# `reduce_from_region` ($g$) sums the partial products. For the column split,
# `gather_from_region` concatenates the ranks' column blocks. The comm log records each collective
# with its tag: `tp_allreduce` for the sum, `tp_allgather` for the concatenation.

# %%
split_ranks = ds_lab.launch(split_matmul, T, A, B[:, :4])      # n = 4, so B's columns split evenly over 2 ranks
C4 = A @ B[:, :4]
for rank, r in enumerate(split_ranks):
    print(f"rank {rank}: holds A_i {r['shapes']['A_i']}, B_i {r['shapes']['B_i']}; its A_i B_i is "
          f"{tuple(r['partial'].shape)}")
    print(f"   row split:    {r['row_log']}  -> max |error| {(r['row_split'] - C4).abs().max():.1e}")
    print(f"   column split: {r['column_log']}  -> max |error| {(r['column_split'] - C4).abs().max():.1e}")
print(f"the article's concatenation of the partial products: shape {tuple(split_ranks[0]['article'].shape)}, "
      f"C is {tuple(C4.shape)}")

# %% [markdown]
# Each record is (op, tag, message bytes, bytes this rank sent). The sum is an all-reduce of the
# whole $4 \times 4$ fp32 result (64 bytes): a ring sends $2\frac{T-1}{T}$ of it, 64 bytes at T = 2.
# The concatenation is an all-gather whose message is the whole result too, of which each rank sends
# $\frac{T-1}{T}$, 32 bytes.
#
# ### 3. Megatron's MLP: $f$, column, GeLU, row, $g$
#
# `ds_lab.lab.tensor_parallel_mlp` builds two `nn.Linear` layers (h → 4h → h) with the same seed on
# every rank. It shards them with `ColumnParallelLinear.from_full` and `RowParallelLinear.from_full`,
# runs forward and backward, and compares the output, the input gradient and the gathered weight
# gradients with the unsharded layers. It also records which collectives forward and backward ran.

# %%
B_, S_, H_ = 2, 8, 16
mlp = ds_lab.launch(tensor_parallel_mlp, T, H_, B_, S_)
for rank, r in enumerate(mlp):
    print(f"rank {rank}: shards {r['shards']}  max |error| vs one process: "
          + ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items()))
    print(f"   forward:  {r['forward']}")
    print(f"   backward: {r['backward']}")
print(f"b·s·h = {B_}·{S_}·{H_} = {B_ * S_ * H_} elements = {4 * B_ * S_ * H_} bytes in fp32")

# %% [markdown]
# One all-reduce forward ($g$, after the row layer) and one backward ($f$, before the column layer),
# each of one $b\,s\,h$ activation. Between the two layers nothing is exchanged.
#
# ### 4. The whole GPT on T = 2 ranks, trained through the engine
#
# `GPTTP` (`ds_lab/models/gpt_tp.py`) is the ds_lab GPT with every block's attention and MLP built
# from those two layers. It also splits the token embedding and the LM head over the vocabulary
# (`VocabParallelEmbedding`), and computes the loss without ever gathering the logits
# (`vocab_parallel_cross_entropy`). `tensor_parallel_train` calls
# `initialize_model_parallel(tensor_model_parallel_size=2)` and trains it through
# `ds_lab.initialize`. The same function with `tensor_size=0` trains the plain GPT on one process,
# which is the reference. The dashboard shows the run live. Its comm panel draws the
# tensor-parallel all-reduces beside Megatron's count (dashed).

# %%
L, H = TP_MODEL["n_layer"], TP_MODEL["n_embd"]
BSH_BYTES = TP_BATCH * TP_MODEL["block_size"] * H * 4          # one fp32 activation, b·s·h elements
MEGATRON_ALLREDUCES = 4 * L + 2                                # per step: 2 + 2 per layer, + embedding and head
tp_theory = {"comm": {"per_step_bytes": MEGATRON_ALLREDUCES * 2 * (T - 1) / T * BSH_BYTES,
                      "label": "(4L+2) all-reduces of b·s·h, 2(T-1)/T"}}
one = ds_lab.launch(tensor_parallel_train, 1, 0, TP_CONFIG, tp_batches, TP_MODEL, momentum_sgd=SGD)[0]
dash = Dashboard(f"Tensor parallel GPT, T = {T}", theory=tp_theory)
tp = ds_lab.launch(tensor_parallel_train, T, T, TP_CONFIG, tp_batches, TP_MODEL, momentum_sgd=SGD, dashboard=dash)

# %%
tp_loss_diff = max(abs(a - b) / abs(b) for r in tp for a, b in zip(r["losses"], one["losses"]))
tp_weight_diff = max(((tp[0]["weights"][k] - v).abs().max() / v.abs().max()).item() for k, v in one["weights"].items())
print(f"one process: losses {[round(x, 5) for x in one['losses']]}, {one['num_parameters']:,} parameters")
for rank, r in enumerate(tp):
    print(f"rank {rank}:      losses {[round(x, 5) for x in r['losses']]}, {r['num_parameters']:,} parameters here")
print(f"largest relative difference: losses {tp_loss_diff:.1e}, gathered weights {tp_weight_diff:.1e}")
tp_step = Counter((op, tag, nbytes) for op, tag, nbytes, _ in tp[0]["traffic"][0])
print("\ncollectives of one training step on rank 0 (op, tag, message bytes): count")
for key, count in sorted(tp_step.items()):
    print(f"  {key}: {count}")

# %% [markdown]
# The tensor-parallel GPT learns what one process learns. On the wire, one step has $4L + 2 = 10$
# all-reduces of exactly $b\,s\,h$ fp32 values. That is 2 per layer forward and 2 backward, plus
# the vocabulary-parallel embedding's $g$ (forward) and the head's $f$ (backward).
# The rest is small: `vocab_parallel_cross_entropy`'s three all-reduces of one number per token
# (the max, the target logit, the sum of exponentials), and the global gradient norm for clipping.
# (In the dashboard, the all-gathers after the last step are `full_state_dict()` gathering the
# shards for this comparison, not training traffic.)
#
# **AutoTP.** The engine can also do the sharding itself, on a model you did not write: the
# config key `"tensor_parallel": {"autotp_size": T}` (DeepSpeed's AutoTP training) finds the plain
# GPT's column/row pairs by name and swaps them for their shards (`ds_lab/parallel/autotp.py`).
# Only the blocks are sharded; the embedding and head stay whole, so a step has exactly $4L$
# all-reduces:

# %%
AUTOTP_CONFIG = {**TP_CONFIG, "tensor_parallel": {"autotp_size": T}}
autotp = ds_lab.launch(tensor_parallel_train, T, 0, AUTOTP_CONFIG, tp_batches, TP_MODEL, momentum_sgd=SGD)
autotp_loss_diff = max(abs(a - b) / abs(b) for r in autotp for a, b in zip(r["losses"], one["losses"]))
autotp_allreduces = sum(1 for op, tag, nbytes, _ in autotp[0]["traffic"][0] if tag == "tp_allreduce")
print(f"AutoTP, T = {T}: losses {[round(x, 5) for x in autotp[0]['losses']]} (largest relative difference "
      f"{autotp_loss_diff:.1e}); {autotp_allreduces} tensor-parallel all-reduces per step = 4L = {4 * L}")

# %% [markdown]
# ### 5. Sequence parallelism
#
# The same GPT with `sequence_parallel=True`: each $f$ becomes an all-gather over the sequence,
# and each $g$ a reduce-scatter. `tensor_parallel_traffic` runs one forward and backward and
# records the comm log. An `ActivationTracker` counts the bytes autograd saves for backward, and our
# own hooks count the share saved inside the LayerNorms, the region that sequence parallelism splits.

# %%
x = tp_batches[0]
plain_tp = ds_lab.launch(tensor_parallel_traffic, T, T, False, TP_MODEL, x)
seq_tp = ds_lab.launch(tensor_parallel_traffic, T, T, True, TP_MODEL, x)


def by_op(run, size=BSH_BYTES):
    """{(op, tag): count} of the b·s·h-sized collectives of forward + backward, and the bytes this rank sent."""
    records = [rec for rec in run["forward"] + run["backward"] if rec[2] == size]
    return Counter((op, tag) for op, tag, *_ in records), sum(rec[3] for rec in records)


for name, runs in (("tensor parallel", plain_tp), ("+ sequence parallel", seq_tp)):
    counts, sent = by_op(runs[0])
    print(f"{name:<20} loss {runs[0]['loss']:.6f}  b·s·h collectives {dict(counts)}  sent {sent:,.0f} bytes")
    print(f"{'':<20} saved in the LayerNorms {runs[0]['layernorm_bytes']:,} bytes; "
          f"all saved activations (peak) {runs[0]['activations_peak']:,} bytes")
ln_ratio = seq_tp[0]["layernorm_bytes"] / plain_tp[0]["layernorm_bytes"]
peak_ratio = seq_tp[0]["activations_peak"] / plain_tp[0]["activations_peak"]
print(f"\nLayerNorm activations with / without sequence parallel: {ln_ratio:.3f} (1/T = {1 / T}); "
      f"all saved activations: {peak_ratio:.3f}")

# %% [markdown]
# The same loss, and the same bytes on the wire: each all-reduce became a reduce-scatter plus an
# all-gather of the same message. The LayerNorms now save exactly $1/T$ of what they saved before.
# The whole peak falls less, because the attention and MLP interiors were already split over T
# (their heads and hidden units) and sequence parallelism does not change them. In Megatron's
# accounting ("Reducing Activation Recomputation in Large Transformer Models", 2022) these
# LayerNorm and dropout regions are the $10\,s\,b\,h$ bytes per layer (16-bit activations) that
# tensor parallelism alone leaves whole on every rank. Sequence parallelism divides them by T too.
#
# ### 6. Pipeline schedules are data
#
# A pipeline schedule is decided before anything runs: a list of instructions per stage, with
# DeepSpeed's names (`LoadMicroBatch`, `ForwardPass`, `SendActivation`, `RecvGrad`, …). Here is
# 1F1B for P = 2, m = 4. Stage 0 warms up with $P - s - 1 = 1$ extra forward and then alternates.

# %%
for stage in range(P):
    print(make_schedule("1f1b", M, P, stage))
print()
print(make_schedule("afab", M, P, 0))

# %% [markdown]
# Because the lists are data, we can simulate them before any process starts. `timeline`
# plays the instruction lists against each other (a receive waits for its send), given a forward
# and a backward time; here backward = 2 × forward, as in a real network. Below, P = 4 and m = 8:
# first the plan, then the same three schedules **run** by the pipeline engine on 4 processes.
# `bubble_worker`'s layers
# *sleep* instead of computing: 20 ms forward and 40 ms backward per stage and micro-batch (in the
# interleaved schedule, half of that in each of the stage's two chunks). That way the chart shows the
# schedule, not how 4 processes share 2 CPU cores. Each schedule runs 3 measured batches, and we keep
# the least idle one: other processes on the machine can only add idle time. The spans are the
# engine's own timestamps (`engine.timeline`).

# %%
GANTT_P, GANTT_M = 4, 8
WAIT = (0.02, 0.04)   # seconds of forward and backward per stage and micro-batch
REPEATS = 3
SCHEDULES = {"AFAB (GPipe)": ("afab", 1), "1F1B": ("1f1b", 1), "interleaved 1F1B, v = 2": ("interleaved", 2)}
planned = {name: timeline([make_schedule(kind, GANTT_M, GANTT_P, s, v) for s in range(GANTT_P)], *WAIT)
           for name, (kind, v) in SCHEDULES.items()}
measured_runs = {}
for name, (kind, v) in SCHEDULES.items():
    results = ds_lab.launch(bubble_worker, GANTT_P, [GANTT_M], kind, v, *WAIT, repeats=REPEATS, timeout=60)
    batches_run = [[r[0][k] for r in results] for k in range(REPEATS)]   # per batch: every stage's spans
    measured_runs[name] = min(batches_run, key=measured_bubble)

fig, axes = plt.subplots(2, 3, figsize=(15, 5.5), sharex=True)
durations = []
for col, name in enumerate(SCHEDULES):
    v = SCHEDULES[name][1]
    durations.append(draw_gantt(axes[0, col], planned_spans(planned[name]),
                                f"{name}: planned, bubble {bubble_fraction(planned[name]):.3f}", chunks=v))
    durations.append(draw_gantt(axes[1, col], measured_runs[name],
                                f"{name}: measured, idle {measured_bubble(measured_runs[name]):.3f}", chunks=v))
    axes[1, col].set_xlabel("seconds")
axes[0, 0].set_xlim(0, max(durations))   # one time axis for all six charts
gantt_legend(fig)
fig.suptitle(f"P = {GANTT_P} stages, m = {GANTT_M} micro-batches (number = micro-batch; lighter = second chunk)")
fig.tight_layout()
plt.show()

# %% [markdown]
# AFAB and 1F1B take the same time and leave the same idle triangles: the fill at the start and
# the drain at the end. 1F1B only reorders the work so that each backward comes as early as it can.
# The interleaved schedule's triangles are about half as wide. The planned idle share is
# $(P-1)/(v\,m+P-1)$ exactly; the measured one adds a few milliseconds of per-instruction overhead
# (Python, send/recv).

# %% [markdown]
# ### 7. A GPT as a `PipelineModule`, trained with `train_batch`
#
# Now real layers. `ds_lab.lab.gpt_pipeline_layers` writes the GPT as a list of DeepSpeed
# `LayerSpec`s: the token embedding, positions, 4 blocks, the final LayerNorm and the LM head. The
# embedding and the head are one `TiedLayerSpec("embed", ...)`, so the embedding matrix lives on the
# first *and* the last stage. After each batch its two gradients are summed over the tie group.
# `PipelineModule(layers, num_stages=2, loss_fn=...)` cuts the list by parameter count and builds
# only the local stage's layers. `ds_lab.initialize` returns a pipeline engine, and one
# `engine.train_batch(data_iter)` pulls m = 4 `(inputs, labels)` micro-batches, runs the schedule,
# and steps. We train it with each schedule and compare with the same layers in one process. The
# dashboard shows the 1F1B run live, with its timeline of forward and backward spans per stage.

# %%
STAGE_BOUNDARY_BYTES = MICRO * PP_MODEL["block_size"] * PP_MODEL["n_embd"] * 4   # one activation, b·s·h
pp_theory = {"comm": {"per_step_bytes": M * STAGE_BOUNDARY_BYTES,
                      "label": "m activations (stage 0) or their gradients (stage 1)"}}
reference = pipeline_reference(PP_CONFIG, pp_batches, PP_MODEL, M, SGD)
pipe_runs = {}
dash = Dashboard(f"Pipeline GPT, P = {P}, m = {M}, 1F1B", theory=pp_theory)
pipe_runs["1f1b"] = ds_lab.launch(pipeline_train, P, "1f1b", M, PP_CONFIG, pp_batches, PP_MODEL, SGD, dashboard=dash)
pipe_runs["afab"] = ds_lab.launch(pipeline_train, P, "afab", M, PP_CONFIG, pp_batches, PP_MODEL, SGD)
pipe_runs["interleaved"] = ds_lab.launch(pipeline_train, P, "interleaved", M, PP_CONFIG, pp_batches, PP_MODEL, SGD,
                                         virtual_stages=2)

# %%
def merged_state(stages):
    """The whole model from its stages: each parameter from the stage holding it (a tied one from both)."""
    merged = {}
    for r in stages:
        for name, value in r["state"].items():
            if name in merged:
                assert torch.equal(value, merged[name]), name  # the tied copies agree exactly
            merged[name] = value
    return merged


pipe_diff = {}
print(f"where the 8 layers are cut (module.parts): {pipe_runs['1f1b'][0]['parts']}")
print(f"one process:  losses {[round(x, 5) for x in reference['losses']]}")
for name, stages in pipe_runs.items():
    state = merged_state(stages)
    weights = max(((state[k] - v).abs().max() / v.abs().max()).item() for k, v in reference["state"].items())
    losses = max(abs(a - b) / abs(b) for r in stages for a, b in zip(r["losses"], reference["losses"]))
    pipe_diff[name] = dict(losses=losses, weights=weights, names=state.keys() == reference["state"].keys())
    print(f"{name:<12}  losses {[round(x, 5) for x in stages[0]['losses']]}  largest relative difference: "
          f"losses {losses:.1e}, weights {weights:.1e}")
for r in pipe_runs["1f1b"]:
    print(f"stage {r['stage']} sent: " + ", ".join(f"{tag} {n:,} B" for tag, n in sorted(r["sent"].items())))
print(f"one activation b·s·h = {STAGE_BOUNDARY_BYTES:,} bytes; x m = {M} micro-batches x {STEPS} batches = "
      f"{STEPS * M * STAGE_BOUNDARY_BYTES:,}")

# %% [markdown]
# Every schedule trains the same weights as one process: a schedule changes *when* each micro-batch
# runs, never *what* is computed. Stage 0 sent each micro-batch's activation forward once
# (`pipe_activation`), and stage 1 sent its gradient back once (`pipe_grad`): $b\,s\,h$ each, per
# micro-batch and boundary. `pipe_meta` is the shape header, sent once when the pipeline starts.
# In the dashboard's comm panel, the all-reduce is `tied_grad_allreduce`, which sums the embedding's
# gradient over stages 0 and 1 once per batch. The broadcasts are the tied weight at start-up and
# the loss, sent from the last stage so that every rank returns the same value, as in DeepSpeed.

# %% [markdown]
# ### 8. Three axes, one grid
#
# DeepSpeed and Megatron put every rank on a grid `arange(world).view(pipe, data, model)`
# (`ds_lab.comm.topology.ProcessTopology`). The model axis varies fastest, so tensor partners are
# neighbouring ranks (on one node, over NVLink). Data replicas come next, and stages are the
# slowest: $\text{rank} = (p \cdot D + d) \cdot T + t$. The ranks that differ only in one
# coordinate form that axis's group: tensor parallelism all-reduces within a **model** group,
# gradients are averaged within a **data** group, and activations pass along a **pipe** group.
# Drawing the grid needs no processes. Here is world 8 = 2 × 2 × 2, the 3D case that
# `tests/test_pipe_engine.py` trains against one process:

# %%
grid = ProcessTopology(pipe=2, data=2, model=2)
draw_topology(grid)
plt.show()
for rank in range(grid.world_size):
    c = grid.get_coord(rank)
    print(f"rank {rank}: pipe {c['pipe']}, data {c['data']}, model {c['model']}")
for axis in ("model", "data", "pipe"):
    print(f"{axis:>5} groups: {grid.axis_groups(axis)}")

# %% [markdown]
# ## Measure
#
# ### The bubble against m
#
# The measurement of section 6 (P = 4 stages that sleep 20 + 40 ms per micro-batch, the least idle
# of 3 batches) with 1F1B for $m \in \{1, 2, 4, 8\}$, against $(P-1)/(m+P-1)$. The AFAB and
# interleaved runs of section 6 are the points at m = 8.

# %%
BUBBLE_M = [1, 2, 4, 8]
results = ds_lab.launch(bubble_worker, GANTT_P, BUBBLE_M, "1f1b", 1, *WAIT, repeats=REPEATS, timeout=60)
bubble = {m: min(measured_bubble([r[i][k] for r in results]) for k in range(REPEATS)) for i, m in enumerate(BUBBLE_M)}
interleaved_idle = measured_bubble(measured_runs["interleaved 1F1B, v = 2"])
afab_idle = measured_bubble(measured_runs["AFAB (GPipe)"])

ms = torch.linspace(1, 8, 50).tolist()
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(ms, [theoretical_bubble(GANTT_P, m) for m in ms], "-", color="gray", label="(P-1)/(m+P-1)")
ax.plot(ms, [theoretical_bubble(GANTT_P, m, 2) for m in ms], ":", color="gray", label="(P-1)/(vm+P-1), v = 2")
ax.plot(BUBBLE_M, [bubble[m] for m in BUBBLE_M], "o", color="#4C72B0", label="1F1B, measured")
ax.plot([GANTT_M], [afab_idle], "s", color="#DD8452", label="AFAB, measured")
ax.plot([GANTT_M], [interleaved_idle], "^", color="#55A868", label="interleaved, measured")
ax.set(xlabel="micro-batches m", ylabel="idle share of each stage", title=f"Pipeline bubble, P = {GANTT_P}")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
for m in BUBBLE_M:
    print(f"m = {m}: measured {bubble[m]:.3f}, formula {theoretical_bubble(GANTT_P, m):.3f}")
print(f"m = 8: AFAB {afab_idle:.3f}; interleaved (v = 2) {interleaved_idle:.3f}, "
      f"formula {theoretical_bubble(GANTT_P, 8, 2):.3f}")

# %% [markdown]
# At m = 1 three of the four stages wait at any moment: the "each GPU computes some layers"
# pipeline of the article's §2.1. Only m ≫ P makes a pipeline efficient. That is why pipeline runs
# use many micro-batches (DeepSpeed's `gradient_accumulation_steps`), and why the global batch size
# limits how deep a pipeline can usefully be.

# %% [markdown]
# ### What each schedule keeps alive
#
# In the three runs of section 7, the engine's ledger counted the bytes autograd saved for
# backward, at their peak over the batch (`memory_report()["activations_peak"]`). The engine also
# recorded the most micro-batches forwarded but not yet backwarded ("live"). That count can be
# predicted before anything runs, by walking each stage's instruction list (`planned_live`).

# %%
def planned_live(kind, stage, virtual_stages=1):
    """The most forwards not yet backwarded, read off the stage's instruction list (no process needed)."""
    live = peak = 0
    for cmd in make_schedule(kind, M, P, stage, virtual_stages).instructions():
        live += {"ForwardPass": 1, "BackwardPass": -1}.get(cmd.name, 0)
        peak = max(peak, live)
    return peak


print(f"{'schedule':<12}{'stage':>6}{'live (planned)':>16}{'live (run)':>12}{'activations peak':>18}{'/ AFAB':>8}")
for name, stages in pipe_runs.items():
    for r in stages:
        afab = pipe_runs["afab"][r["stage"]]["activations_peak"]
        planned_peak = planned_live(name, r["stage"], 2 if name == "interleaved" else 1)
        print(f"{name:<12}{r['stage']:>6}{planned_peak:>16}{r['live_micro_batches']:>12}"
              f"{r['activations_peak']:>18,}{r['activations_peak'] / afab:>8.2f}")

# %% [markdown]
# AFAB keeps all m = 4 micro-batches' activations on every stage. 1F1B keeps $P - s$ of them: 2 on
# stage 0 and 1 on stage 1, so its peak is $(P-s)/m$ of AFAB's. With m = 64 micro-batches that is
# the difference between 64 and at most P stored micro-batches. The interleaved schedule counts
# *chunks* (each half a stage). Its longer warm-up keeps more of them alive, so its peak is above
# 1F1B's. That extra memory, and $v$ times the messages, are what its smaller bubble costs.

# %% [markdown]
# ## Compare with theory
#
# ### Assertions: measured vs theory

# %%
# The matrix product: the row split's partial products SUM to C (an all-reduce); the column split's
# blocks CONCATENATE to C (an all-gather); the article's concatenation of the row split's partial
# products has the wrong shape, and no partial product alone is C.
assert torch.allclose(row_split, C, atol=1e-6) and torch.allclose(column_split, C, atol=1e-6)
assert article.shape == (4, 10) != C.shape and all((t - C).abs().max() > 0.1 for t in row_terms)
for r in split_ranks:
    assert torch.allclose(r["row_split"], C4, atol=1e-6) and torch.allclose(r["column_split"], C4, atol=1e-6)
    assert r["row_log"] == [("all_reduce", "tp_allreduce", 4 * 4 * 4, 4 * 4 * 4 * 2 * (T - 1) / T)]
    assert r["column_log"] == [("all_gather", "tp_allgather", 4 * 4 * 4, 4 * 4 * 4 * (T - 1) / T)]
    assert r["article"].shape == (4, 4 * T) != C4.shape
assert split_ranks[0]["partial"].shape == C4.shape and not torch.allclose(split_ranks[0]["partial"], C4, atol=0.1)
print("matrix product: row split -> sum (all-reduce), column split -> concatenation (all-gather)")

# %%
# Megatron's MLP on 2 ranks equals the unsharded layers (fp32, 1e-5), forward and backward, with
# exactly one all-reduce of b·s·h fp32 values in forward (g) and one in backward (f).
mlp_bsh = 4 * B_ * S_ * H_
for r in mlp:
    assert max(r["errors"].values()) <= 1e-5, r["errors"]
    assert [rec[:3] for rec in r["forward"]] == [("all_reduce", "tp_allreduce", mlp_bsh)]
    assert [rec[:3] for rec in r["backward"]] == [("all_reduce", "tp_allreduce", mlp_bsh)]
    assert r["shards"] == {"A (column)": (4 * H_ // T, H_), "B (row)": (H_, 4 * H_ // T)}
# The GPT at T = 2 trains like one process (SGD with momentum, clipping): losses and the gathered
# weights within 1e-5 relative. Each step: 4L + 2 all-reduces of exactly b·s·h fp32 values.
assert tp_loss_diff <= 1e-5 and tp_weight_diff <= 1e-5, (tp_loss_diff, tp_weight_diff)
for r in tp:
    for step in r["traffic"]:
        big = [(op, tag) for op, tag, nbytes, _ in step if nbytes == BSH_BYTES]
        assert big == [("all_reduce", "tp_allreduce")] * MEGATRON_ALLREDUCES, Counter(big)
        # nothing else of that size or larger: the logits (b·s·V) are never gathered
        assert all(nbytes < BSH_BYTES for op, tag, nbytes, _ in step if nbytes != BSH_BYTES)
# AutoTP: the unmodified GPT, sharded by the config key, trains like one process: 4L all-reduces per step
assert autotp_loss_diff <= 1e-5 and autotp_allreduces == 4 * L
print(f"tensor parallel: equal to one process (losses {tp_loss_diff:.1e}, weights {tp_weight_diff:.1e}); "
      f"{MEGATRON_ALLREDUCES} all-reduces of b·s·h per step")

# %%
# Sequence parallel: the same loss; the 4L + 2 all-reduces become as many reduce-scatters and
# all-gathers of the same b·s·h message, so the same bytes leave each rank (all-reduce 2(T-1)/T =
# reduce-scatter (T-1)/T + all-gather (T-1)/T); the LayerNorms save exactly 1/T of their activations.
seq_sent = by_op(seq_tp[0])[1]
for a, b in zip(plain_tp, seq_tp):
    assert abs(b["loss"] - a["loss"]) <= 1e-5 * abs(a["loss"])
    assert by_op(a)[0] == {("all_reduce", "tp_allreduce"): 4 * L + 2}
    assert by_op(b)[0] == {("reduce_scatter", "tp_reduce_scatter"): 4 * L + 2,
                           ("all_gather", "tp_allgather"): 4 * L + 2}
    assert by_op(b)[1] == by_op(a)[1]
    assert b["layernorm_bytes"] * T == a["layernorm_bytes"]
    assert b["activations_peak"] < a["activations_peak"]
print(f"sequence parallel: same bytes ({seq_sent:,.0f}), LayerNorm activations x {ln_ratio}")

# %%
# Schedules as data: the simulated idle share is the formula, exactly (AFAB and 1F1B (P-1)/(m+P-1),
# interleaved (P-1)/(vm+P-1)).
for name, (kind, v) in SCHEDULES.items():
    assert math.isclose(bubble_fraction(planned[name]), theoretical_bubble(GANTT_P, GANTT_M, v), abs_tol=1e-9)
# Measured on 4 processes: within [-0.02, +0.08] of the formula (the per-instruction overhead, Python
# and send/recv, only adds idle time: a few ms against 60 ms of work per micro-batch), and falling with m.
# Interleaving measures below what 1F1B's formula allows at all.
for m, idle in bubble.items():
    assert theoretical_bubble(GANTT_P, m) - 0.02 <= idle <= theoretical_bubble(GANTT_P, m) + 0.08, (m, idle)
assert bubble[1] > bubble[2] > bubble[4] > bubble[8]
assert theoretical_bubble(GANTT_P, 8) - 0.02 <= afab_idle <= theoretical_bubble(GANTT_P, 8) + 0.08, afab_idle
assert interleaved_idle < theoretical_bubble(GANTT_P, 8)
assert interleaved_idle <= theoretical_bubble(GANTT_P, 8, 2) + 0.1, interleaved_idle
print(f"bubble: measured {[round(bubble[m], 3) for m in BUBBLE_M]} vs formula "
      f"{[round(theoretical_bubble(GANTT_P, m), 3) for m in BUBBLE_M]}")

# %%
# The pipelined GPT (P = 2, m = 4, tied embedding across stages) trains like one process under every
# schedule: losses (every rank the same) and weights within 1e-5 relative.
for name, diff in pipe_diff.items():
    assert diff["names"] and diff["losses"] <= 1e-5 and diff["weights"] <= 1e-5, (name, diff)
    assert len({tuple(r["losses"]) for r in pipe_runs[name]}) == 1
# Point-to-point traffic: one b·s·h activation forward and one gradient back per micro-batch and boundary.
stage0, stage1 = pipe_runs["1f1b"]
assert stage0["sent"]["pipe_activation"] == STEPS * M * STAGE_BOUNDARY_BYTES and "pipe_grad" not in stage0["sent"]
assert stage1["sent"]["pipe_grad"] == STEPS * M * STAGE_BOUNDARY_BYTES and "pipe_activation" not in stage1["sent"]
# Activations kept: AFAB all m micro-batches, 1F1B P - s of them (planned from the instruction lists
# and counted in the run); so peak_1F1B / peak_AFAB = (P - s)/m by the ledger (within 2%: the token ids
# are views of one batch tensor, counted once whatever m is). Interleaved keeps more than 1F1B.
for afab, flat, inter in zip(pipe_runs["afab"], pipe_runs["1f1b"], pipe_runs["interleaved"]):
    s = flat["stage"]
    assert planned_live("afab", s) == afab["live_micro_batches"] == M
    assert planned_live("1f1b", s) == flat["live_micro_batches"] == P - s
    assert planned_live("interleaved", s, 2) == inter["live_micro_batches"]
    assert math.isclose(flat["activations_peak"] / afab["activations_peak"], (P - s) / M, rel_tol=0.02)
    assert flat["activations_peak"] < inter["activations_peak"] < afab["activations_peak"]
print("pipeline: equal to one process under AFAB, 1F1B and interleaved; 1F1B keeps P - s micro-batches")

# %%
# The grid: rank = (p·D + d)·T + t; each axis's groups are the ranks differing only in that coordinate.
for rank in range(grid.world_size):
    c = grid.get_coord(rank)
    assert rank == (c["pipe"] * 2 + c["data"]) * 2 + c["model"]
assert grid.axis_groups("model") == [[0, 1], [2, 3], [4, 5], [6, 7]]
assert grid.axis_groups("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
assert grid.axis_groups("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
print("grid: tensor partners are neighbours, data replicas 2 apart, stages 4 apart")

# %% [markdown]
# ## Exercises
#
# 1. **T = 4.** Run the tensor-parallel GPT on 4 ranks (`tensor_parallel_train` with world 4 and
#    `tensor_size=4`). Predict first: how many all-reduces per step, of how many bytes, and how
#    many bytes each rank sends, $2\frac{T-1}{T}\,b\,s\,h$ each? What happens with `n_head=2`?
# 2. **Where the bubble goes.** With `bubble_worker`, measure P = 2 and P = 4 at m = 4. Predict
#    both from $(P-1)/(m+P-1)$. Then make the last stage's layers twice as slow (an unbalanced
#    partition). Which stages wait now, and for whom?
# 3. **The memory of 1F1B.** Train the pipelined GPT with m = 8 under AFAB and 1F1B, and predict
#    each stage's `live_micro_batches` and activation peak before you look.
# 4. **Activation checkpointing.** Train the pipelined GPT with `checkpoint_interval=1` (the
#    `PipelineModule`'s `activation_checkpoint_interval`) and compare the activation peaks and the
#    step time with the run above. What is recomputed, and when?
# 5. **3D.** On 8 ranks, which groups does one step of (pipe 2, data 2, model 2) use, and how many
#    bytes does each carry? Check your answer against the 3D case in `tests/test_pipe_engine.py`.
#
# ## Summary
#
# - A matrix product can be split two ways. Splitting the *output columns* ends in a
#   concatenation, splitting the *inner dimension* in a **sum**. The article's §4.2 concatenates
#   where it must sum. We showed the difference in one process and on two ranks.
# - Megatron's tensor parallelism pairs a column-parallel layer with a row-parallel one, joined by
#   the conjugate operators $f$ and $g$. Per transformer layer that is **2 all-reduces forward and
#   2 backward of $b\,s\,h$**, which we counted in the comm log. The GPT at T = 2 trains like one
#   process, whether written with Megatron's layers (`GPTTP`) or sharded by AutoTP from a config key.
# - Sequence parallelism splits each all-reduce into a reduce-scatter and an all-gather: the same
#   bytes, and the LayerNorm regions keep $1/T$ of their activations.
# - A pipeline sends only one activation per micro-batch and stage boundary, but each stage idles
#   $(P-1)/(m+P-1)$ of the time. We measured that on 4 processes for m = 1 … 8. AFAB and 1F1B have
#   the same bubble, but 1F1B keeps $P - s$ micro-batches alive instead of $m$. Interleaving shrinks
#   the bubble $v$-fold, for more messages and more memory.
# - Pipeline schedules are data, printable and drawable before anything runs, and every schedule
#   trains the same weights as one process.
# - The three kinds of parallelism are three axes of one grid, `arange(world).view(pipe, data, model)`.
#   Chapter 5 looks at what flows along those axes and how DeepSpeed makes it cheaper: overlap,
#   compression (1-bit Adam) and topology-aware groups.
