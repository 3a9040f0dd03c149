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
# # 11 · FAQ: choose a config, watch a run, read an error
#
# *Source article §9. Skeleton: Goal · The idea · Run it · Measure · Compare with theory · Exercises · Summary.*
#
# ## Goal
#
# The article's appendix asks three questions: how to choose a DeepSpeed config (§9.1), how to
# monitor training (§9.2), and how to fix common errors (§9.3). It answers each by pointing
# elsewhere: the official examples, TensorBoard, the GitHub FAQ. This chapter answers them with
# code. A **config advisor** turns (model size, GPUs, memory per GPU) into a config, and a real run
# on 2 ranks checks it. We watch that run on the dashboard, the CSV monitor and the comm log.
# Then we cause five common failures on real ranks and read the message each one gives.

# %% [markdown]
# ## The idea
#
# **Choosing a config is arithmetic first.** Model states take $16\Psi$ bytes in mixed precision
# (chapter 3). ZeRO stage $k$ divides more of them by $N$. Activations grow with the micro batch $b$
# (chapter 1). The advisor (`ds_lab/lab/advisor.py`) applies five rules, each checked by the
# estimator:
#
# 1. **Precision:** bf16 where the hardware has it, else fp16 with loss scaling.
# 2. **Budget:** memory × (1 − reserve), 20 % by default. The reserve is for buckets, gathered
#    layers and fragmentation: the ZeRO paper's measured model sizes sit about that far below its
#    theory (Rajbhandari et al. 2020, Table 2: 6.2 B measured against 7.6 B for $P_{os}$ at 64 GPUs).
# 3. **ZeRO stage:** the *lowest* stage whose states plus one micro batch of activations fit.
#    Lower stages send fewer bytes: stage 3 sends up to 1.5× stages 0–2.
# 4. **Offload:** never chosen. It trades GPU memory for PCIe traffic and a host-side step, so it
#    is the last resort (`offload_optimizer` exists in ds_lab). When nothing fits, the advisor says
#    what would.
# 5. **Micro batch:** the largest power of two that still fits. Gradient accumulation makes up
#    the global batch.
#
# **Monitoring** means reading three streams. The dashboard shows memory per rank, comm bytes,
# loss and the step timeline, live. The config's `csv_monitor` and `tensorboard` sections write
# the loss on rank 0 as DeepSpeed does. `ds_lab.comm.log_summary()` prints DeepSpeed's comm table.
#
# **Diagnosing** a failure starts with knowing what each one looks like. `ds_lab.launch` turns a
# rank's exception into a `RankError` carrying that rank's traceback, and a collective that waits
# longer than `timeout=` into a `CollectiveTimeoutError` that names the op. We make each failure
# happen, so that its message is familiar before it appears at 3 a.m. on 512 GPUs.

# %%
# %matplotlib inline
import glob
import math
import os
import tempfile

import ds_lab
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.lab import failures, zero_train
from ds_lab.lab.advisor import AdvisorError, monitored_train, recommend
from ds_lab.models import GPT, GPTConfig
from ds_lab.monitor import Dashboard
from ds_lab.zero.estimate import estimate_ledger

N = 2
MODEL = dict(n_layer=4, n_head=4, n_embd=256, block_size=64, tie_weights=False)
PSI = GPT(GPTConfig(**MODEL)).num_parameters()
SHAPE = dict(layers=MODEL["n_layer"], hidden=MODEL["n_embd"], seq_len=MODEL["block_size"], vocab_size=256)
print(f"GPT {MODEL}: Ψ = {PSI:,} parameters; 16Ψ = {16 * PSI / 1e6:.1f} MB of model states")

# %% [markdown]
# ## Run it
#
# ### 1. Choosing a config (§9.1)
#
# Three real-world questions first. With no activation checkpointing, a 7.5 B model has 30 GB of
# activations per sequence of 2048 tokens, so the micro batch stays at 1.

# %%
questions = {
    "7.5B on 64 x A100 80GB, 512 sequences per step":
        (7.5e9, 64, 80e9, dict(layers=32, hidden=4096, seq_len=2048, heads=32, vocab_size=51200, global_batch=512)),
    "GPT-3 175B on 1024 x A100 80GB, checkpointing on":
        (175e9, 1024, 80e9, dict(layers=96, hidden=12288, seq_len=2048, heads=96, vocab_size=51200,
                                 checkpointing=True, global_batch=2048)),
    "1.3B on one 24 GB GPU":
        (1.3e9, 1, 24e9, dict(layers=24, hidden=2048, seq_len=2048, heads=16, vocab_size=51200)),
}
answers = {}
for question, (psi, gpus, memory, shape) in questions.items():
    print(f"\n{question}")
    try:
        answers[question] = recommend(psi, gpus, memory, **shape)
        print(answers[question].explain())
        print("  config:", answers[question].config)
    except AdvisorError as err:
        answers[question] = err
        print("  AdvisorError:", err)

# %% [markdown]
# Reading the answers:
#
# - **7.5 B on 64 GPUs.** Stage 1 is enough: 31.4 GB of states, the ZeRO paper's own example.
#   Stage 2 would fit too, but it sends its gradients at every micro batch.
# - **175 B.** Only stage 3 fits. Chapter 10's simulator shows that at this scale ZeRO-3 is
#   network-bound: 3D parallelism is what Megatron used. This advisor knows only ZeRO, so it
#   warns about the 1.5× traffic and leaves that choice to you.
# - **1.3 B on one GPU.** Nothing fits. With one GPU, ZeRO has nothing to partition across, and
#   $16 \times 1.3$ B = 20.8 GB already exceeds the 19.2 GB budget. The error says what would work:
#   more GPUs, checkpointing, or offload in DeepSpeed.
#
# ### The advice, checked on real ranks
#
# Now a question this machine can answer: our GPT on 2 ranks, each with a pretend GPU of 60 MB.
# The advisor's config goes straight into `ds_lab.launch` and trains for 3 steps. The dashboard
# draws each rank's ledger beside the estimate (hatched).

# %%
GPU_MEMORY = 60e6
advice = recommend(PSI, N, GPU_MEMORY, max_micro_batch=8, **SHAPE)
print(advice.explain())
STEPS = 3
global_batch = advice.config["train_batch_size"]
loader = DistributedLoader(corpus_tokens(), MODEL["block_size"], global_batch, seed=0)
batches = [loader.batch(i)["input_ids"] for i in range(STEPS)]
expected = estimate_ledger(PSI, N, advice.stage, "bf16")
theory = {"memory": {k: v for k, v in expected.items() if k != "total"}}
dash = Dashboard(f"the advisor's config: ZeRO {advice.stage}, micro batch {advice.micro_batch}, {N} ranks",
                 theory=theory)
checked = ds_lab.launch(zero_train, N, advice.config, batches, MODEL, dashboard=dash)
for rank, result in enumerate(checked):
    memory = result["memory"]
    states = sum(memory[k] for k in ("params", "grads", "master_params", "optimizer_states"))
    print(f"rank {rank}: model states {states / 1e6:.2f} MB (estimate {expected['total'] / 1e6:.2f}), activations "
          f"peak {memory['activations_peak'] / 1e6:.2f} MB (estimate {advice.activation_bytes / 1e6:.2f}); "
          f"losses {[round(x, 3) for x in result['losses']]}")

# %% [markdown]
# The ledger is the estimate to the byte (up to padding to a multiple of $N$). The activation peak
# is a little above the formula of chapter 1, which leaves out the embeddings' and the final
# LayerNorm's tensors. The 20 % reserve absorbs that, and the total stays inside the budget.
#
# ## Measure
#
# ### 2. Monitoring a run (§9.2)
#
# The dashboard above is one view. The config names the others. `csv_monitor` writes one CSV per
# metric on rank 0, `{output_path}/{job_name}/Train_Samples_train_loss.csv`, as DeepSpeed's does.
# `comms_logger` times every collective, and `ds_lab.comm.log_summary()` prints DeepSpeed's table.
# The worker returns that table as text (`comm.format_summary()`), because each rank keeps its own
# log.

# %%
workdir = tempfile.mkdtemp(prefix="ds_lab_ch11_")
monitored_config = dict(advice.config, csv_monitor={"enabled": True, "output_path": workdir, "job_name": "faq"},
                        comms_logger={"enabled": True})
monitored = ds_lab.launch(monitored_train, N, monitored_config, batches, MODEL)
csv_files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "faq", "*.csv")))
with open(os.path.join(workdir, "faq", "Train_Samples_train_loss.csv")) as f:
    csv_rows = f.read().splitlines()
print("csv_monitor wrote:", csv_files)
print("\n".join(csv_rows))
print("\nrank 0's comm log, as ds_lab.comm.log_summary() prints it:")
print(monitored[0]["comm_table"])

# %% [markdown]
# TensorBoard is the same section with another name. It needs the `tensorboard` package, an
# optional extra. Where it is installed, rank 0 writes an event file for `tensorboard --logdir`;
# where it is not, the error says which package to install:

# %%
tensorboard_config = dict(advice.config, tensorboard={"enabled": True, "output_path": workdir, "job_name": "faq"})
try:
    ds_lab.launch(monitored_train, N, tensorboard_config, batches[:1], MODEL)
    event_files = glob.glob(os.path.join(workdir, "faq", "events.out.tfevents.*"))
    tensorboard_message = f"tensorboard is installed: {len(event_files)} event file written for tensorboard --logdir"
except ds_lab.RankError as err:
    event_files = []
    tensorboard_message = str(err).strip().splitlines()[-1]
print(tensorboard_message)

# %% [markdown]
# ### 3. Diagnosing failures (§9.3), by causing them
#
# Each failure below runs on 2 real ranks through `ds_lab.launch`, with a short `timeout=` so a
# hang fails in seconds instead of DeepSpeed's default of 30 minutes. We catch the error and print
# its last lines. The rank functions are in `ds_lab/lab/failures.py`.

# %%
def last_lines(err, n=3):
    return "\n".join(str(err).strip().splitlines()[-n:])


caught = {}

# (a) a rank crashes: rank 1 raises in the middle of a step
try:
    ds_lab.launch(failures.crash_on_rank, N, 1, timeout=10)
except ds_lab.RankError as err:
    caught["crash"] = err
    print(f"RankError, rank {err.rank}:\n{last_lines(err)}\n")

# (b) a hang: rank 0 enters an all-reduce that rank 1 never calls
try:
    ds_lab.launch(failures.hang, N, 30, timeout=3)
except ds_lab.RankError as err:
    caught["hang"] = err
    print(f"RankError, rank {err.rank}:\n{last_lines(err, 2)}\n")

# %% [markdown]
# Reading them:
#
# - **A crash** names the rank that failed and ends with its own exception and line. The other
#   ranks are stopped at once. Had they failed as a consequence, their last lines would follow
#   as "(rank r also failed: ...)". Read the *first* rank's traceback: the others are symptoms.
# - **A hang** has no exception of its own, only a collective that waits. With `timeout=3` the
#   waiting rank gives up after 3 seconds and says which op, how many bytes and which group:
#   "all_reduce (4000 bytes, group of 2) did not complete within the 3 s timeout (...); another rank probably
#   never called it or died". The next question is what the *other* rank was doing. Usually it was
#   in a branch that only some ranks take (`if rank == 0: save()`), or it was slower (loading data).

# %%
# (c) mismatched collectives: the same op with different sizes, then different ops
stderr_base = os.path.join(workdir, "mismatch_stderr")
try:
    ds_lab.launch(failures.mismatched_sizes, N, stderr_base, timeout=5)
except ds_lab.RankError as err:
    caught["sizes"] = err
    gloo_says = ""
    for rank in range(N):
        with open(f"{stderr_base}.{rank}") as f:
            gloo_says += f.read()
    print(f"RankError, rank {err.rank}: {err.remote_traceback.strip().splitlines()[-1]}")
    for rank, traceback_text in err.others.items():
        print(f"  and rank {rank}: {traceback_text.strip().splitlines()[-1][:160]}")
    print("what gloo wrote to the rank's stderr before it aborted:\n" + gloo_says.strip() + "\n")
try:
    ds_lab.launch(failures.mismatched_ops, N, timeout=3)
except ds_lab.RankError as err:
    caught["ops"] = err
    print(f"RankError, rank {err.rank}:\n{last_lines(err, 2)}")

# %% [markdown]
# - **Different sizes** are caught by gloo itself. It aborts the process from C++ (exit code
#   −6, SIGABRT), so Python sees no exception, and `launch` can only say the rank "exited (killed by
#   SIGABRT (exit code -6)) without a result or a traceback", with its last output. The reason went
#   to the process's stderr, which we also redirected to a file: "Received data size doesn't match
#   expected size. Is there a distributed collective mismatch in your code?". Its partner only sees
#   the connection drop ("Connection reset by peer"): a symptom, not the cause. On a cluster, look in the aborted rank's log file. NCCL
#   usually *hangs* instead, and you are back at case (b).
# - **Different ops** (an all-reduce meeting a broadcast) usually look like a hang: each rank waits
#   for a partner that is in another collective. The timeout names the op of whichever rank gave up
#   first. Timing can make it look like the case above instead: when one op's bytes land in the
#   other op's receive, gloo sees sizes that do not match and aborts that rank. Either way the
#   message names a symptom; `comms_logger` with `verbose: true` on every rank would show the two
#   ranks' last ops side by side, which is the cause.

# %%
# (d) a bad config: a British spelling of a key
bad = dict(advice.config)
bad["zero_optimisation"] = bad.pop("zero_optimization")
try:
    ds_lab.launch(failures.bad_config, N, bad, MODEL)
except ds_lab.RankError as err:
    caught["config"] = err
    print(f"RankError, rank {err.rank}:\n{last_lines(err, 1)}\n")

# (e) out of memory: a real address-space cap (RLIMIT_AS) in each rank, stage 0 and then stage 1
CAP = 1_200_000_000
BIG = dict(n_layer=4, n_head=4, n_embd=1024, block_size=64, tie_weights=False)
big_psi = GPT(GPTConfig(**BIG)).num_parameters()
oom_batch = DistributedLoader(corpus_tokens(), BIG["block_size"], 4, seed=0).batch(0)["input_ids"]
def cap_config(stage):
    return {"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}
try:
    ds_lab.launch(failures.out_of_memory, N, CAP, cap_config(0), BIG, oom_batch, timeout=20)
except ds_lab.RankError as err:
    caught["memory"] = err
    print(f"stage 0 under a {CAP / 1e6:.0f} MB cap (Ψ = {big_psi:,}): RankError, rank {err.rank}:\n{last_lines(err, 1)}")
fits_under_cap = ds_lab.launch(failures.out_of_memory, N, CAP, cap_config(1), BIG, oom_batch, timeout=20)
print(f"stage 1 under the same cap: trained one step; model states "
      f"{sum(fits_under_cap[0][k] for k in ('params', 'grads', 'master_params', 'optimizer_states')) / 1e6:.0f} MB per rank")

# %% [markdown]
# - **A bad config** fails before any training, on every rank, with the key, the section and the
#   nearest known key: "unknown config key 'zero_optimisation'; did you mean 'zero_optimization'?".
#   DeepSpeed itself would ignore the unknown key and silently train with ZeRO off.
# - **Out of memory** here is real, not simulated. Each rank caps its own address space at what it
#   already maps plus 1200 MB (`resource.setrlimit(RLIMIT_AS)`), so torch's allocator fails exactly
#   as on a full host: "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes".
#   The traceback says *where*: building a buffer in `initialize`, or a step's gradients. Stage 0
#   needs 16Ψ = 816 MB of model states for this 51 M-parameter GPT, and the cap also has to hold
#   the fp32 model built before `initialize` and the engine's buffers. Stage 1 drops 6Ψ (306 MB) and
#   fits. (Each rank also limits glibc to one malloc arena, so the address space follows the
#   tensors rather than the threads.) On a
#   GPU the message is "CUDA out of memory. Tried to allocate …", and the cures are the same:
#   the next ZeRO stage, a smaller micro batch, activation checkpointing. The cap counts address
#   space, not tensors, so its numbers are not a GPU's: it shows the failure, not the exact limit.

# %% [markdown]
# ## Compare with theory
#
# ### Assertions: every claim above, checked

# %%
# 1. The advisor: the three questions answered as the prose says, its config accepted by the engine
assert answers["7.5B on 64 x A100 80GB, 512 sequences per step"].stage == 1
assert math.isclose(answers["7.5B on 64 x A100 80GB, 512 sequences per step"].states_bytes, 31.40625e9)
assert answers["GPT-3 175B on 1024 x A100 80GB, checkpointing on"].stage == 3
assert isinstance(answers["1.3B on one 24 GB GPU"], AdvisorError) and "use 3 GPUs or more" in str(answers["1.3B on one 24 GB GPU"])
assert advice.stage in (1, 2, 3) and advice.total_bytes <= advice.budget  # stage 0 would not fit 60 MB
assert estimate_ledger(PSI, N, 0)["total"] + advice.activation_bytes > advice.budget
print(f"advisor: ZeRO {advice.stage}, micro batch {advice.micro_batch}, {advice.total_bytes / 1e6:.1f} MB "
      f"of {advice.budget / 1e6:.0f} MB")

# %%
# 2. The real run: the ledger is the estimate (up to padding to a multiple of N), the loss falls,
#    and states + measured activations stay inside the budget
for result in checked:
    memory = result["memory"]
    states = sum(memory[k] for k in ("params", "grads", "master_params", "optimizer_states"))
    assert abs(states - expected["total"]) <= 16 * N, (states, expected["total"])
    assert states + memory["activations_peak"] <= advice.budget
    assert result["losses"][-1] < result["losses"][0]
print("the advised run: model states as estimated, within the budget, loss falling")

# %%
# 3. Monitoring: the CSV has one row per step (global samples), the comm table the engine's ops
assert "Train_Samples_train_loss.csv" in csv_files
assert csv_rows[0] == "step,Train/Samples/train_loss"
assert [row.split(",")[0] for row in csv_rows[1:]] == [str(global_batch * (i + 1)) for i in range(STEPS)]
assert "Comm. Op" in monitored[0]["comm_table"] and ("reduce_scatter" in monitored[0]["comm_table"]
                                                    or "all_reduce" in monitored[0]["comm_table"])
assert len(event_files) == 1 or "pip install tensorboard" in tensorboard_message
print("monitoring: CSV rows", len(csv_rows) - 1, "| comm table", len(monitored[0]["comm_table"].splitlines()) - 1, "rows")

# %%
# 4. Failures: each message says what happened and where
assert caught["crash"].rank == 1 and "ValueError: loss is nan at step 1" in str(caught["crash"])
assert "all_reduce (4000 bytes, group of 2) did not complete within the 3 s timeout" in str(caught["hang"])
assert "collective mismatch" in gloo_says  # the reason, from the aborted rank's stderr
assert "killed by SIGABRT (exit code -6)" in str(caught["sizes"]) or "Connection reset" in str(caught["sizes"])
assert any(symptom in str(caught["ops"]) for symptom in  # a timeout, or (timing) gloo's size check
           ("did not complete within the", "killed by SIGABRT (exit code -6)", "Connection reset", "Connection closed"))
assert "did you mean 'zero_optimization'?" in str(caught["config"])
assert "can't allocate memory" in str(caught["memory"])
assert all(rank_memory["optimizer_states"] > 0 for rank_memory in fits_under_cap)
print("failures: crash, hang, size mismatch, op mismatch, config typo and out-of-memory, each read from its message")

# %% [markdown]
# ## Exercises
#
# 1. **Reserve.** The advisor keeps 20 % free. Find the smallest `GPU_MEMORY` at which it still
#    picks stage 0 for our GPT, and run that config under `RLIMIT_AS`. What else is in the
#    address space?
# 2. **A deadlock of your own.** Write a rank function where rank 0 saves a checkpoint (which
#    runs a collective) inside `if rank == 0:`. Predict the message before you run it.
# 3. **Mismatched dtypes.** All-reduce a bf16 tensor on rank 0 and an fp32 tensor of the same
#    number of elements on rank 1. Is it caught? What does the result look like?
# 4. **The advisor and 3D.** Add a `tensor_parallel` argument to `recommend` that divides Ψ per GPU
#    by $t$ (chapter 10's formula). At what $t$ does GPT-3 fit at stage 1?
#
# ## Summary
#
# - Choosing a config is arithmetic: 16Ψ bytes of states, divided by the ZeRO stage, plus
#   activations that grow with the micro batch, inside a budget with a reserve. The advisor picks
#   the lowest stage that fits, and then the largest micro batch. On 2 real ranks the ledger of
#   its config was the estimate, to the padding.
# - A run is watched through the dashboard (memory, comm, loss, timeline), `csv_monitor` or
#   `tensorboard` (rank 0's metrics per step), and `comms_logger` with `log_summary()` (DeepSpeed's
#   comm table).
# - Each failure has a signature. A crash gives `RankError` with the first rank's traceback. A hang
#   gives a `CollectiveTimeoutError` naming the op. Different sizes make gloo abort with
#   "collective mismatch" on stderr. Different ops look like a hang. A config typo gets a
#   "did you mean". Memory exhaustion gives the allocator's "can't allocate memory" at the line
#   that allocated.
