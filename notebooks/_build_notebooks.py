"""Write the chapter notebooks from the Python source in this file, with no outputs.

    .venv/bin/python notebooks/_build_notebooks.py          # rewrite 01_background.ipynb, 02_data_parallel.ipynb
    .venv/bin/python notebooks/_build_notebooks.py --png    # also redraw docs/img/dashboard_dp_world4.png

A chapter is a list of cells: `md(...)` for prose, `code(...)` for code. To change a chapter, edit
it here and re-run this script, so a review reads Python and Markdown instead of notebook JSON.
Cell ids are fixed (c00, c01, ...), so regenerating an unchanged chapter changes nothing.

`--png` runs chapter 2's own setup and worker cells in this process and launches the engine at
world size 4 with a Dashboard, then saves its four panels (nbval must not write into the repo, so
the picture is made here, not from the notebook).
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PNG = Path("docs") / "img" / "dashboard_dp_world4.png"


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip("\n"))


# =================================================================================================
# Chapter 1: background
# =================================================================================================

CH01_SETUP = """
    %matplotlib inline
    import torch
    import matplotlib.pyplot as plt

    import ds_lab
    from ds_lab.data import DistributedLoader, corpus_tokens
    from ds_lab.models import GPT, GPTConfig
    from ds_lab.monitor import Dashboard
    from ds_lab.zero.estimate import (estimate_activations, estimate_ledger, estimate_model_states,
                                      format_bytes, what_fits)

    # A GPT small enough to train on one CPU core in seconds. Byte vocabulary: 256 tokens.
    MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=128)
    PSI = GPT(GPTConfig(**MODEL)).num_parameters()
    STATES = ["params", "grads", "master_params", "optimizer_states"]  # the "model states"
    print(f"Ψ = {PSI:,} parameters")
"""

CHAPTER_01 = [
    md(r"""
    # 1 · Why training a large language model is hard

    *Source article §1 (background). Every chapter follows one skeleton: Goal · The idea · Run it ·
    Measure · Compare with theory · Exercises · Summary.*

    ## Goal

    By the end of this chapter you can say, byte by byte, what one training step of a GPT keeps in
    memory, and why no single GPU can hold what it takes to train GPT-3 (175 billion parameters).
    Every number comes from a real run, and each one is set beside the formula that predicts it.
    """),
    md(r"""
    ## The idea

    The article (§1.2) names three challenges: compute, memory and communication. It describes the
    memory problem as "the model has a huge number of parameters". That undersells it. **While a
    model trains, its weights are the smallest part of what each GPU has to hold.** Adam in mixed
    precision (bf16 or fp16 compute, fp32 master weights) keeps, for every parameter:

    | state | bytes per parameter | why it exists |
    |---|---|---|
    | `params` (bf16) | 2 | the weights forward and backward compute with |
    | `grads` (bf16) | 2 | what backward produces |
    | `master_params` (fp32) | 4 | the optimizer updates an fp32 copy, because a bf16 weight cannot absorb a small update |
    | `optimizer_states` (fp32) | 8 | Adam's two moments, *m* and *v* |
    | **model states** | **16** | the ZeRO paper's 16Ψ, for Ψ parameters |

    Plain fp32 training also adds up to 16: 4 (params) + 4 (grads) + 8 (Adam), with no master copy.
    Either way the weights alone are at most a quarter of the model states, and in mixed precision
    only an eighth.

    On top of the model states come the **activations**: the tensors forward saves so that backward
    can compute gradients. They don't depend on Ψ. They grow with the micro-batch size *b* and
    the sequence length *s*. For one transformer layer of hidden size *h* with *a* heads, Korthikanti
    et al. (2022) count $s\,b\,h\,(34 + 5\,a\,s/h)$ bytes in 16-bit. The $a\,s^2$ part is the
    attention score matrix, which fused attention kernels don't keep.

    This chapter measures both on a small GPT, checks the formulas against the measurement, and
    then uses the formulas to scale up to GPT-3. Communication, the third challenge, is the subject
    of chapters 2 and 5.
    """),
    code(CH01_SETUP),
    md(r"""
    ## Run it

    One rank runs a few Adam steps. Then we ask the engine what it holds: `engine.memory_report()`
    reads the **memory ledger**, which counts the bytes of tensors that really exist on the rank
    (each storage once), and the **activation tracker**, which counts what autograd saves for
    backward through saved-tensor hooks. Nothing in the ledger is estimated.

    `ds_lab.launch(worker, 1, ...)` runs the worker in a real child process (a world of size 1),
    the same way chapter 2 runs it on 2 and 4 processes. Launching keeps the notebook process out of
    any process group. If you called `ds_lab.initialize` right here, the notebook itself would
    become a world of size 1. The dashboard draws the rank's memory (solid) next to the formula's
    bytes (hatched).
    """),
    code("""
    def make_engine(precision, micro_batch):
        torch.manual_seed(0)
        config = {"train_micro_batch_size_per_gpu": micro_batch,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                  "bf16": {"enabled": precision == "bf16"}}
        engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**MODEL)), config=config)
        return engine


    def train_and_measure(precision, steps=4, micro_batch=4, seq_len=128):
        \"\"\"Runs on the launched rank: a few Adam steps, then the memory ledger.\"\"\"
        engine = make_engine(precision, micro_batch)
        data = DistributedLoader(corpus_tokens(), seq_len, micro_batch, seed=0)
        for step in range(steps):
            loss = engine(**data.batch(step)).loss
            engine.backward(loss)
            engine.step()
        return dict(memory=engine.memory_report(), num_parameters=engine.num_parameters())


    def states_theory(precision):
        \"\"\"The formula's bytes per category for one rank (stage 0 = no ZeRO partitioning).\"\"\"
        expected = estimate_ledger(PSI, world_size=1, stage=0, precision=precision)
        return {category: expected[category] for category in STATES}


    dash = Dashboard("Chapter 1: one rank, bf16 mixed precision", theory={"memory": states_theory("bf16")})
    bf16_run = ds_lab.launch(train_and_measure, 1, "bf16", dashboard=dash)[0]
    """),
    md(r"""
    ## Measure

    ### Model states
    """),
    code("""
    def show_states(title, memory, psi):
        print(f"{title}   (Ψ = {psi:,})")
        for category in STATES:
            print(f"  {category:<20}{memory[category]:>12,} bytes = {memory[category] / psi:4.1f} x Ψ")
        total = sum(memory[category] for category in STATES)
        print(f"  {'model states':<20}{total:>12,} bytes = {total / psi:4.1f} x Ψ")
        print(f"  {'activations (peak)':<20}{memory['activations_peak']:>12,} bytes")


    show_states("bf16 mixed precision", bf16_run["memory"], bf16_run["num_parameters"])
    """),
    md(r"""
    The same model in plain fp32: the weights and gradients double, the master copy disappears, and
    the total stays at 16 bytes per parameter.
    """),
    code("""
    dash = Dashboard("Chapter 1: one rank, fp32", theory={"memory": states_theory("fp32")})
    fp32_run = ds_lab.launch(train_and_measure, 1, "fp32", dashboard=dash)[0]
    show_states("fp32", fp32_run["memory"], fp32_run["num_parameters"])
    """),
    md(r"""
    ### Activations grow with batch size and sequence length

    One forward and one backward pass for each shape (micro-batch *b*, sequence length *s*). We
    read the activation tracker's **peak**: the most bytes autograd held at once. These are bf16
    activations.
    """),
    code("""
    def activation_sweep(shapes, precision="bf16"):
        \"\"\"Runs on the launched rank: one forward + backward per (micro_batch, seq_len).\"\"\"
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
    """),
    code("""
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
    """),
    md(r"""
    The bytes per token stay the same in every row, so the activations are linear in *b* and, for
    this attention, linear in *s* too. Double the batch, double the activations. At *b* = 4,
    *s* = 128 this tiny model already keeps more bytes of activations than of model states. In a
    big model the model states dominate at small batches, and activations take over as *b* and *s*
    grow.
    """),
    md(r"""
    ## Compare with theory

    **Model states.** `ds_lab.zero.estimate.estimate_ledger` implements the ZeRO paper's
    arithmetic. The measured ledger and the formula agree to the byte. The assertion cells at the
    end check this.
    """),
    code("""
    for name, run, precision in (("bf16", bf16_run, "bf16"), ("fp32", fp32_run, "fp32")):
        measured = {category: run["memory"][category] for category in STATES}
        print(f"{name}: measured {measured}")
        print(f"{'':6}formula  {states_theory(precision)}")
    """),
    md(r"""
    **Activations.** The formula covers the transformer layers (16·*s*·*b*·*h* elements each, for
    this model) and the logits (*s*·*b*·*V*). The measured peak is a few percent higher. The extra
    bytes are tensors outside the layers: the input of the final LayerNorm and the input of the
    output head (2·*s*·*b*·*h* elements), the token ids (int64). There are also small per-token
    statistics the kernels keep: LayerNorm's mean and inverse standard deviation, and attention's
    log-sum-exp in fp32. In a deep model the layers dominate and the gap shrinks.

    ### Scaling up: GPT-3, 175 billion parameters

    The measured model states match the formula exactly, so we can trust the formula where we
    can't measure:
    """),
    code("""
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
    """),
    md(r"""
    The model states alone need 2.8 TB: the memory of 35 GPUs of 80 GB, or 20 of the 141 GB ones.
    Even the bf16 weights by themselves (350 GB) are too big for any one of them. Activations come on top. Here is the same
    formula for one GPT-3 sequence (*s* = 2048, *h* = 12288, 96 layers, 96 heads, *V* = 50257,
    16-bit, with dropout):
    """),
    code("""
    gpt3_shape = dict(batch_size=1, seq_len=2048, hidden_size=12288, num_layers=96, vocab_size=50257)
    variants = {
        "attention scores kept (as in 2020)": dict(num_heads=96),
        "fused attention, no s x s scores": dict(num_heads=None),
        "full activation checkpointing": dict(num_heads=96, checkpointing=True),
    }
    for name, options in variants.items():
        total = estimate_activations(**gpt3_shape, **options)["total"]
        print(f"{name:<38}{format_bytes(total):>10} per sequence")
    """),
    md(r"""
    **Compute**, the article's first challenge, follows from the same sizes. Training costs about
    6·Ψ·*D* floating-point operations for *D* tokens: 2 per parameter per token in forward, 4 in
    backward (Kaplan et al. 2020). GPT-3 saw about 300B tokens. The 40% utilization below is our
    assumption. It is typical of large runs, not a measurement.
    """),
    code("""
    flops = 6 * GPT3_PARAMS * 300e9
    a100_bf16_peak, utilization = 312e12, 0.4
    gpu_seconds = flops / (a100_bf16_peak * utilization)
    print(f"{flops:.2e} FLOPs = {gpu_seconds / (365 * 86400):.0f} A100-years at {utilization:.0%} of peak"
          f" = {gpu_seconds / 1024 / 86400:.0f} days on 1024 A100s")
    """),
    md(r"""
    So one GPU cannot even *hold* the training state, and it would need decades to do the work.
    Training has to be spread over many GPUs, and that creates the third challenge: every GPU must
    exchange gradients (and with ZeRO also parameters) with the others at every step. The rest of
    the course is about spreading the work and the memory without drowning in communication:

    - **data parallelism** (chapter 2) splits the *batch*: N times the compute, but every GPU still
      holds all 16Ψ bytes;
    - **ZeRO** (chapter 3) splits the *model states* across the data-parallel GPUs: 16Ψ/N each at
      stage 3;
    - **tensor and pipeline parallelism** (chapter 4) split the *layers* themselves, and with them
      the activations.

    ### Assertions: measured vs theory
    """),
    code("""
    # Model states are exactly 16 bytes per parameter: 2 + 2 + 4 + 8 in bf16, 4 + 4 + 0 + 8 in fp32,
    # byte for byte what the ZeRO formula says.
    for run, precision, split in ((bf16_run, "bf16", (2, 2, 4, 8)), (fp32_run, "fp32", (4, 4, 0, 8))):
        memory, psi = run["memory"], run["num_parameters"]
        assert psi == PSI
        assert [memory[category] for category in STATES] == [k * psi for k in split], memory
        assert sum(memory[category] for category in STATES) == 16 * psi
        assert {category: memory[category] for category in STATES} == states_theory(precision)
    print("model states = 16 Ψ exactly, in bf16 and in fp32:", 16 * PSI, "bytes")
    """),
    code("""
    # Activations grow linearly with the micro-batch (and with the sequence length): the bytes per
    # token vary by less than 1% across all shapes, and 8x the batch gives 8x the bytes (within 1%).
    per_token = [peaks[(b, s)] / (b * s) for (b, s) in shapes]
    assert max(per_token) / min(per_token) < 1.01, per_token
    assert abs(peaks[(8, 128)] / peaks[(1, 128)] / 8 - 1) < 0.01
    assert all(peaks[(b1, 128)] < peaks[(b2, 128)] for b1, b2 in zip(BATCH_SIZES, BATCH_SIZES[1:]))
    # ...and the formula accounts for all but a few percent of them (it leaves out the tensors
    # outside the layers, so it is the lower of the two).
    assert all(1.0 <= peaks[shape] / activation_formula(*shape) <= 1.15 for shape in shapes)
    print(f"bytes per token: {min(per_token):,.0f} to {max(per_token):,.0f}; "
          f"8x batch -> {peaks[(8, 128)] / peaks[(1, 128)]:.3f}x activations")
    """),
    code("""
    # GPT-3: 175e9 parameters x 16 bytes = 2.8e12 bytes (2.8 TB) of model states; more than any
    # GPU in the table, and even its bf16 weights alone (2 bytes x Ψ = 350 GB) do not fit in one.
    assert 175e9 * 16 == 2.8e12
    assert gpt3["total"] == 2.8e12
    assert gpt3["params"] == 350e9 > max(GPUS.values())
    assert all(gpt3["total"] > memory for memory in GPUS.values())
    print(f"GPT-3 model states: {format_bytes(gpt3['total'])}")
    """),
    md(r"""
    ## Exercises

    1. **Another optimizer.** In `make_engine`, pass a client optimizer:
       `ds_lab.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), config=...)`
       (and drop `"optimizer"` from the config). Predict the bytes per parameter in fp32 and in
       bf16 before you run it. (Hint: K, the bytes of optimizer state plus master copy, changes.)
    2. **Width.** Double `n_embd` to 128. By what factor do the model states grow, and by what
       factor do the activations? Why are the factors different?
    3. **Attention scores.** Compute `estimate_activations(..., num_heads=4)` for *s* = 128 and
       *s* = 1024. At what sequence length would keeping the *s*×*s* scores cost as much as the
       rest of the layer? Check it against $5as/h = 34$.
    4. **How many GPUs?** Use `what_fits(80e9, world_size=N, stage=...)` to find the smallest N
       that holds GPT-3's model states at ZeRO stage 3. (Chapter 3 runs ZeRO for real.)
    5. **The article's framing.** §1.2 says the memory bottleneck is the number of parameters.
       Rewrite that sentence with the three numbers this chapter measured: weights, model states,
       and activations for one sequence.

    ## Summary

    - Training with Adam keeps **16 bytes per parameter** of model states (2 + 2 + 4 + 8 in mixed
      precision, 4 + 4 + 8 in fp32). We measured it byte for byte on a real run, and the weights
      are only an eighth of it.
    - **Activations** grow linearly with micro-batch and sequence length (plus an *s*² term when
      the attention scores are kept). The Korthikanti formula predicts them to within a few percent.
    - **GPT-3** needs 2.8 TB of model states and hundreds of GB of activations per sequence, and
      about 3·10²³ FLOPs. No single GPU can hold or compute it, so the work has to be spread, and
      that is what data parallelism, ZeRO and model parallelism do in the next chapters.
    """),
]


# =================================================================================================
# Chapter 2: data parallel
# =================================================================================================

CH02_SETUP = """
    %matplotlib inline
    import math
    import statistics
    import time

    import torch
    import matplotlib.pyplot as plt

    import ds_lab
    from ds_lab import comm
    from ds_lab.data import DistributedLoader, corpus_tokens
    from ds_lab.models import GPT, GPTConfig
    from ds_lab.monitor import Dashboard, events
    from ds_lab.monitor.memory import ledger, optimizer_state_tensors
    from ds_lab.zero.estimate import estimate_ledger

    MODEL = dict(n_layer=2, n_head=4, n_embd=128, block_size=64)
    GLOBAL_BATCH = 16         # sequences per optimizer step, whatever the number of ranks
    STEPS = 8
    BUCKET = 100_000          # the engine's reduce_bucket_size, in elements
    PSI = GPT(GPTConfig(**MODEL)).num_parameters()
    GRAD_BYTES = 4 * PSI      # fp32 gradients: what every step has to average over the ranks

    # The global batches, drawn once: every run below trains on exactly these, on any number of ranks.
    loader = DistributedLoader(corpus_tokens(), MODEL["block_size"], GLOBAL_BATCH, seed=0)
    batches = [loader.batch(i)["input_ids"] for i in range(STEPS)]


    def rows_of(batch, rank, world_size, micro=0, accumulation=1):
        \"\"\"Micro-batch `micro` of rank `rank`: the N x A micro-batches tile the global batch.\"\"\"
        size = batch.shape[0] // (world_size * accumulation)
        start = (rank * accumulation + micro) * size
        return batch[start:start + size]


    def theory(world_size):
        \"\"\"What each rank should hold and send per step (stage 0, fp32 Adam), for the dashboard.\"\"\"
        memory = estimate_ledger(PSI, world_size, stage=0, precision="fp32")
        memory.pop("total")
        per_step = 2 * (world_size - 1) / world_size * GRAD_BYTES
        return {"memory": memory, "comm": {"per_step_bytes": per_step, "label": "ring all-reduce 2(N-1)/N x 4Ψ"}}


    print(f"Ψ = {PSI:,} parameters, gradient bytes 4Ψ = {GRAD_BYTES:,}")
"""

CH02_NAIVE = """
    def naive_data_parallel(batches, lr=1e-3):
        \"\"\"Runs on every rank: plain PyTorch, plus one all-reduce per parameter after backward.\"\"\"
        rank, world_size = comm.get_rank(), comm.get_world_size()
        torch.manual_seed(0)  # the same seed on every rank: identical starting weights
        model = GPT(GPTConfig(**MODEL))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        out = dict(losses=[], step_seconds=[], collectives=[], bytes=[],
                   tensors=len(list(model.parameters())))
        for step, batch in enumerate(batches):
            events.current_step = step  # stamps this step on the comm spans in the timeline
            first = len(comm.get_log())
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
            records = comm.get_log()[first:]
            out["losses"].append(loss.item())
            out["step_seconds"].append(t4 - t0)
            out["collectives"].append(len(records))
            out["bytes"].append(sum(r.bytes for r in records))
        out["summary"] = comm.summarize()
        return out
"""

CH02_ENGINE = """
    def engine_data_parallel(batches, accumulation=1, zero=None):
        \"\"\"Runs on every rank: the same training, through ds_lab's engine (DeepSpeed's API).\"\"\"
        rank, world_size = comm.get_rank(), comm.get_world_size()
        torch.manual_seed(0)
        model = GPT(GPTConfig(**MODEL))
        # When does backward produce its last gradient? These hooks are registered before the
        # engine's, so they run first (hooks run in registration order): a gradient is timed
        # before the engine can send its bucket.
        grad_times = []
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: grad_times.append(time.time()))
        config = {"train_batch_size": GLOBAL_BATCH, "gradient_accumulation_steps": accumulation,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                  "zero_optimization": {"stage": 0, **(zero or {})}}
        engine, _, _, _ = ds_lab.initialize(model=model, config=config)
        out = dict(losses=[], step_seconds=[], collectives=[], bytes=[], wire_bytes=[], sent_early=[],
                   lead_ms=[])
        all_grad_records = []
        for batch in batches:
            first = len(comm.get_log())
            start = time.perf_counter()
            micro_losses = []
            for micro in range(accumulation):
                grad_times.clear()
                x = rows_of(batch, rank, world_size, micro, accumulation)
                loss = engine(input_ids=x, labels=x).loss
                engine.backward(loss)
                engine.step()
                micro_losses.append(loss.item())
            out["step_seconds"].append(time.perf_counter() - start)
            grads = [r for r in comm.get_log()[first:] if r.tag == "grad_allreduce"]
            all_grad_records += grads
            last_gradient = max(grad_times)
            out["losses"].append(sum(micro_losses) / accumulation)
            out["collectives"].append(len(grads))
            out["bytes"].append(sum(r.bytes for r in grads))
            out["wire_bytes"].append(sum(r.wire_bytes for r in grads))
            out["sent_early"].append(sum(r.start < last_gradient for r in grads))
            out["lead_ms"].append(1e3 * (last_gradient - min(r.start for r in grads)) if grads else 0.0)
        out.update(buckets=len(engine.reducer.buckets), micro_batch=engine.train_micro_batch_size_per_gpu(),
                   memory=engine.memory_report(), num_parameters=engine.num_parameters(),
                   summary=comm.summarize(all_grad_records))
        return out
"""

CH02_WORLD4 = """
    dash = Dashboard("ds_lab engine, 4 ranks: data parallel", theory=theory(4))
    four = ds_lab.launch(engine_data_parallel, 4, batches[:4], zero={"reduce_bucket_size": BUCKET}, dashboard=dash)
"""

CHAPTER_02 = [
    md(r"""
    # 2 · Data parallelism

    *Source article §2.1, §3.1 and §4.1. Skeleton: Goal · The idea · Run it · Measure · Compare
    with theory · Exercises · Summary.*

    ## Goal

    Train one model on N processes so that it learns **exactly** what one process learns from the
    same global batch. Measure what that costs on the wire. Then see why DeepSpeed (like PyTorch's
    DDP) sends gradients in a few large buckets *while backward is still running*, instead of one
    tensor at a time after it.
    """),
    md(r"""
    ## The idea

    Each of the N ranks holds a full copy of the model: weights, gradients and optimizer states,
    all 16Ψ bytes from chapter 1. Each rank trains on its own slice of the global batch. After
    backward, rank *r* holds $g_r$, the mean gradient over its slice. When the slices are the same
    size, their average

    $$g = \frac{1}{N}\sum_{r=0}^{N-1} g_r$$

    is exactly the mean gradient over the whole global batch. So every rank applies the update one
    process would apply to the whole batch, and the copies stay identical. The average is one
    **all-reduce** of all the gradient bytes per optimizer step. With the ring algorithm each rank
    sends $2\frac{N-1}{N}$ times the gradient bytes: a reduce-scatter and an all-gather,
    $\frac{N-1}{N}$ each. For large N that is the ZeRO paper's "2Ψ".

    The batch arithmetic is DeepSpeed's:

    $$\text{train\_batch\_size} = \text{micro batch per GPU} \times \text{gradient accumulation steps} \times N$$

    The article's §4.1 writes the global batch as $B \times P$. That is the special case with no
    gradient accumulation.

    > **Where the article is wrong or misleading**
    >
    > - §2.1 lists data parallelism as a kind of *model* parallelism. It is the opposite: data
    >   parallelism splits the **batch** and *replicates* the model, while model parallelism (tensor,
    >   pipeline; chapter 4) splits the **model**. The difference matters because data parallelism
    >   does nothing for memory. Every rank still holds all 16Ψ bytes, as we measure below, and
    >   that is why ZeRO (chapter 3) exists.
    > - §3.1 says DeepSpeed's model parallelism "is based on PyTorch's `DistributedDataParallel`"
    >   and is set up with `deepspeed.init()`. DeepSpeed's engine does not wrap the model in DDP. It
    >   registers its own gradient hooks and reduces the gradients itself: a bucketed all-reduce
    >   without ZeRO, a reduce-scatter with it. That is what `ds_lab/runtime/data_parallel.py`
    >   re-implements and what you run below. Its model parallelism is tensor parallelism
    >   (Megatron-style, passed in as `mpu`) and pipeline parallelism (`deepspeed.pipe.PipelineModule`),
    >   and neither one is DDP. The entry point is `deepspeed.initialize(...)`, which the article's
    >   own code block calls. There is no `deepspeed.init()`.
    > - §3.1's `engine.zero.Init(module=model)` is not a DeepSpeed call either. `deepspeed.zero.Init`
    >   is a ZeRO-3 context manager that you *build the model inside*
    >   (`with deepspeed.zero.Init(...): model = Model()`), before `initialize`, so that no rank
    >   ever materializes the whole model. ZeRO itself is switched on by the config's
    >   `zero_optimization.stage`.
    """),
    code(CH02_SETUP),
    md(r"""
    ## Run it

    ### 1. Naive data parallelism, written by hand

    Plain PyTorch with one addition: after `loss.backward()`, all-reduce each parameter's gradient
    and divide by N. Every collective goes through `ds_lab.comm`, which records it (op, bytes,
    seconds, tag). The engine publishes its memory, loss and timeline events by itself. This
    hand-written loop publishes the same events explicitly, so that the dashboard can draw it too.
    """),
    code(CH02_NAIVE),
    code("""
    dash = Dashboard("Naive data parallel, 2 ranks: one all-reduce per tensor, after backward", theory=theory(2))
    naive = ds_lab.launch(naive_data_parallel, 2, batches, dashboard=dash)
    """),
    code("""
    r = naive[0]
    print(f"parameter tensors:          {r['tensors']}")
    print(f"collectives per step:       {r['collectives']}")
    print(f"bytes all-reduced per step: {r['bytes'][0]:,}   (gradient bytes 4Ψ = {GRAD_BYTES:,})")
    print(f"median step time:           {1e3 * statistics.median(r['step_seconds'][1:]):.1f} ms\\n")
    print(comm.format_summary(r["summary"]))
    """),
    md(r"""
    It trains, and it is correct. But it has two costs that grow with scale:

    - **One collective per tensor.** Each all-reduce pays a fixed latency (a ring all-reduce takes
      2(N−1) hops) however small the tensor is. The table above shows messages of a few hundred
      bytes (LayerNorm weights and biases) paying the same per-call price as the large matrices.
    - **Communication waits for all of backward.** While backward runs, the network sits idle.
      While the gradients travel, the compute sits idle.

    ### 2. The engine: buckets, overlapped with backward

    `ds_lab.initialize` wraps the same model. Data parallelism (ZeRO stage 0) lives in
    `ds_lab/runtime/data_parallel.py` and works like DDP and DeepSpeed's stage 0:

    - all gradients live in **one flat buffer**, laid out in *reverse* parameter order because
      backward produces the last layer's gradients first, and each `param.grad` is a view into it;
    - the buffer is cut into **buckets** of `reduce_bucket_size` elements;
    - a hook fires as each gradient is ready. When a bucket is complete, its all-reduce starts
      **asynchronously**, while backward goes on computing the earlier layers
      (`overlap_comm: true`).

    Same model, same data, `reduce_bucket_size` = 100,000 elements. We run it twice: overlap on and
    overlap off. Each run also records when backward produced its last gradient, so we can count
    how many buckets were already on the wire by then.
    """),
    code(CH02_ENGINE),
    code("""
    dash = Dashboard("ds_lab engine, 2 ranks: buckets, overlap_comm=True", theory=theory(2))
    overlapped = ds_lab.launch(engine_data_parallel, 2, batches,
                               zero={"reduce_bucket_size": BUCKET, "overlap_comm": True}, dashboard=dash)
    """),
    md(r"""
    In the timeline above, each rank's comm lane shows its all-reduce bars *under* the backward bar,
    spread across it. Now with overlap off: the same buckets, all sent after backward has finished
    computing, so the comm bars bunch up at the end of each backward bar.
    """),
    code("""
    dash = Dashboard("ds_lab engine, 2 ranks: buckets, overlap_comm=False", theory=theory(2))
    sequential = ds_lab.launch(engine_data_parallel, 2, batches,
                               zero={"reduce_bucket_size": BUCKET, "overlap_comm": False}, dashboard=dash)
    """),
    md(r"""
    ## Measure
    """),
    code("""
    def median_ms(run):
        return 1e3 * statistics.median(run["step_seconds"][1:])  # skip the first (warm-up) step


    print(f"{'2 ranks':<26}{'collectives/step':>17}{'bytes/step':>12}{'step (ms)':>11}"
          f"{'sent before last grad':>23}{'lead (ms)':>11}")
    print(f"{'naive (by hand)':<26}{naive[0]['collectives'][0]:>17}{naive[0]['bytes'][0]:>12,}"
          f"{median_ms(naive[0]):>11.1f}{0:>23}{'-':>11}")
    for name, runs in (("engine, overlap on", overlapped), ("engine, overlap off", sequential)):
        r = runs[0]
        print(f"{name:<26}{r['collectives'][0]:>17}{r['bytes'][0]:>12,}{median_ms(r):>11.1f}"
              f"{r['sent_early'][0]:>23}{statistics.median(r['lead_ms']):>11.1f}")
    print(f"\\nengine buckets: {overlapped[0]['buckets']} (Ψ = {PSI:,} elements, {BUCKET:,} per bucket)")
    print(comm.format_summary(overlapped[0]["summary"]))
    """),
    md(r"""
    - **Fewer, bigger collectives.** The engine issues one all-reduce per bucket instead of one per
      tensor, and sends the same bytes (all gradients, once).
    - **Reading the latency columns.** An overlapped all-reduce is timed from the moment it is
      issued until it completes. That includes the time it waits for the other rank to reach the
      same bucket, which is still busy with backward. Its "latency" is mostly waiting, not wire
      time.
    - **Overlap.** With `overlap_comm` on, all buckets but the last are already on the wire when
      backward produces its last gradient ("lead" is how much earlier the first bucket left).
      With it off, none are.
    - **Step time depends on the hardware.** On a GPU, NCCL moves the data with its own engines and
      the network while the GPU keeps computing, so overlap hides communication behind backward.
      That is why DDP and DeepSpeed do it. Here, with gloo on a CPU, "communication" is memory
      copies and additions done by the same few cores that run backward. With 2 ranks sharing 2
      cores there is little idle hardware to hide it in. The gap between the two engine runs here
      is small and changes from run to run, and it can even reverse. Run both on GPUs to see what
      overlap is for.

    ### Same answer as one process

    Now the claim that matters most. One process trains on the whole global batch of 16 (micro
    batch 16, no accumulation). Two ranks train with micro batch 4 and 2 accumulation steps:
    4 × 2 × 2 = 16, the same global batch, and the same seed. The loss of a step is the mean over
    its micro-batches and ranks.
    """),
    code("""
    dash = Dashboard("One process, the whole global batch")
    single = ds_lab.launch(engine_data_parallel, 1, batches, dashboard=dash)[0]
    dash = Dashboard("2 ranks x 2 accumulation steps x micro batch 4", theory=theory(2))
    accumulated = ds_lab.launch(engine_data_parallel, 2, batches, accumulation=2,
                                zero={"reduce_bucket_size": BUCKET}, dashboard=dash)
    """),
    code("""
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
    """),
    md(r"""
    The two curves lie on top of each other. The only differences are float rounding, because
    summing over ranks adds the same numbers in a different order.

    ### Traffic at N = 4

    The same engine on 4 ranks (micro batch 16 / 4 = 4) for a few steps. The dashboard's comm panel
    draws the theory as a dashed line: 2(N−1)/N × 4Ψ bytes per step, times the steps run. The
    solid bar above that line is the broadcast of rank 0's weights at start-up (4Ψ, once), which
    the engine does so that every rank starts from the same weights.
    """),
    code(CH02_WORLD4),
    md(r"""
    ## Compare with theory
    """),
    code("""
    print(f"{'N':>2}{'grad bytes/step':>17}{'4Ψ':>11}{'wire bytes/step':>17}{'2(N-1)/N x 4Ψ':>16}")
    for world_size, runs in ((2, overlapped), (4, four)):
        r = runs[0]
        expected_wire = 2 * (world_size - 1) / world_size * GRAD_BYTES
        print(f"{world_size:>2}{r['bytes'][0]:>17,}{GRAD_BYTES:>11,}{r['wire_bytes'][0]:>17,.0f}{expected_wire:>16,.0f}")

    memory = four[0]["memory"]
    states = {category: memory[category] for category in ("params", "grads", "master_params", "optimizer_states")}
    print(f"\\nrank 0 of 4 holds {sum(states.values()):,} bytes of model states = "
          f"{sum(states.values()) / PSI:.0f} x Ψ: data parallelism does not divide memory")
    """),
    md(r"""
    The recorded message is the whole gradient, 4Ψ bytes, once per optimizer step. That holds with
    accumulation too: the engine communicates only on the boundary micro-step. The bytes each rank
    actually sends under the ring algorithm are 2(N−1)/N of that: 1× at N = 2 and 1.5× at N = 4,
    approaching 2× as N grows. Per-rank traffic stays almost constant as you add ranks, which is
    why data parallelism scales. Per-rank memory stays constant too, at 16Ψ, which is why it
    doesn't scale to big models on its own.

    ### Assertions: measured vs theory
    """),
    code("""
    # Data parallel gives the same losses as one process on the same global batch (within 1e-5 relative),
    # and the hand-written naive version agrees with the engine the same way.
    assert single["micro_batch"] == GLOBAL_BATCH and accumulated[0]["micro_batch"] * 2 * 2 == GLOBAL_BATCH
    assert max(relative) <= 1e-5, relative
    naive_losses = [statistics.fmean(r["losses"][step] for r in naive) for step in range(STEPS)]
    engine_losses = [statistics.fmean(r["losses"][step] for r in overlapped) for step in range(STEPS)]
    assert max(abs(a - b) / abs(b) for a, b in zip(naive_losses, engine_losses)) <= 1e-5
    print(f"data parallel vs one process: max relative loss difference {max(relative):.1e}")
    """),
    code("""
    # The recorded gradient all-reduce bytes per optimizer step equal the gradient bytes (4Ψ, fp32):
    # once per step, with or without accumulation, at N = 2 and N = 4, on every rank.
    for runs in (overlapped, sequential, accumulated, four):
        for r in runs:
            assert r["bytes"] == [GRAD_BYTES] * len(r["bytes"]), r["bytes"]
    # The bytes each rank puts on the wire (ring algorithm) are 2(N-1)/N x the gradient bytes.
    for world_size, runs in ((2, overlapped), (2, accumulated), (4, four)):
        for r in runs:
            expected = 2 * (world_size - 1) / world_size * GRAD_BYTES
            assert all(math.isclose(w, expected, rel_tol=1e-12) for w in r["wire_bytes"]), r["wire_bytes"]
    print(f"grad bytes/step = {GRAD_BYTES:,}; wire bytes/step = {overlapped[0]['wire_bytes'][0]:,.0f} (N=2), "
          f"{four[0]['wire_bytes'][0]:,.0f} (N=4)")
    """),
    code("""
    # The naive version issues one collective per parameter tensor; the engine one per bucket.
    n_tensors = naive[0]["tensors"]
    assert all(c == [n_tensors] * STEPS for c in (r["collectives"] for r in naive))
    for runs in (overlapped, sequential, accumulated, four):
        for r in runs:
            assert r["collectives"] == [r["buckets"]] * len(r["collectives"])
            assert 1 < r["buckets"] <= math.ceil(PSI / BUCKET) < n_tensors
    # With overlap_comm on, buckets are on the wire before backward produces its last gradient;
    # with it off, not one is.
    assert all(r["sent_early"] == [r["buckets"] - 1] * STEPS for r in overlapped), [r["sent_early"] for r in overlapped]
    assert all(r["sent_early"] == [0] * STEPS for r in sequential)
    # Data parallelism does not divide memory: each of 4 ranks holds all 16Ψ bytes of model states.
    for r in four:
        m = r["memory"]
        assert m["params"] + m["grads"] + m["master_params"] + m["optimizer_states"] == 16 * PSI
    print(f"naive: {n_tensors} collectives/step; engine: {overlapped[0]['buckets']} (one per bucket)")
    """),
    md(r"""
    ## Exercises

    1. **Bucket size.** Run the engine with `reduce_bucket_size` of 10,000 and of 10⁹ (one bucket).
       Count the collectives and the buckets sent before the last gradient. Why can a single
       bucket never overlap with backward?
    2. **Accumulation.** Use 4 accumulation steps on 2 ranks (micro batch 2). Check that the losses
       still match one process and that the all-reduce still runs once per *optimizer* step.
    3. **bf16.** Add `"bf16": {"enabled": True}` to the engine's config. What happens to the
       gradient bytes per step, and to how closely the losses match one process? (The test suite
       allows bf16 a few ulps.)
    4. **An odd world size.** Set `GLOBAL_BATCH = 24` and run on 3 ranks. What does 2(N−1)/N
       predict, and what do you measure?
    5. **Why not overlap here?** Time the overlapped and the sequential engine again with more steps.
       Then explain, from what the cores are doing, why overlap buys little on a 2-core CPU and a
       lot on GPUs with NCCL.

    ## Summary

    - Data parallelism replicates the model and splits the batch. Averaging the gradients with one
      all-reduce per optimizer step makes N ranks follow **exactly** the trajectory of one process
      on the same global batch (micro batch × accumulation × N). We measured losses equal to
      10⁻⁵ relative or better.
    - The all-reduce moves the whole gradient, 4Ψ bytes in fp32, once per step. Each rank sends
      2(N−1)/N of that under the ring algorithm, so per-rank traffic hardly grows with N.
    - Naive data parallelism sends one small collective per tensor after backward. The engine, like
      DeepSpeed and DDP, sends a few large buckets *during* backward.
    - Every rank still holds all 16Ψ bytes of model states, so data parallelism alone cannot train a
      model that doesn't fit on one GPU. Chapter 3 (ZeRO) partitions those states across the ranks.
    """),
]


CHAPTERS = {"01_background.ipynb": CHAPTER_01, "02_data_parallel.ipynb": CHAPTER_02}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for index, cell in enumerate(cells):
        cell.id = f"c{index:02d}"
    nb.cells = cells
    nbformat.validate(nb)
    return nb


def write_notebooks() -> None:
    for name, cells in CHAPTERS.items():
        nbformat.write(build(cells), HERE / name)
        print(f"wrote notebooks/{name} ({len(cells)} cells)")


def _python(source: str) -> str:
    """A cell's code without its IPython magics (lines starting with %)."""
    return "\n".join(line for line in textwrap.dedent(source).splitlines() if not line.lstrip().startswith("%"))


def draw_dashboard_png() -> None:
    """Chapter 2's world-size-4 run, from the chapter's own cells; saves the dashboard's PNG."""
    import os
    os.environ.setdefault("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__chapter_02__"}
    for source in (CH02_SETUP, CH02_ENGINE, CH02_WORLD4):
        exec(compile(_python(source), "02_data_parallel.ipynb", "exec"), namespace)
    path = REPO / PNG
    path.parent.mkdir(parents=True, exist_ok=True)
    namespace["dash"].save_png(path)
    print(f"wrote {PNG}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", action="store_true", help=f"also redraw {PNG} (runs 4 ranks)")
    args = parser.parse_args()
    write_notebooks()
    if args.png:
        draw_dashboard_png()
