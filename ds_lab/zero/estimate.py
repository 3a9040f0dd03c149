"""How much memory training takes per rank, before you run it: ZeRO's arithmetic, in code.

    from ds_lab.zero.estimate import estimate_model_states, format_table, what_fits
    print(format_table(7.5e9, world_size=64))        # the ZeRO paper's Figure 1
    ds-lab estimate --params 7.5e9 --world-size 64 --gpu-memory 80e9

Model states (ZeRO paper, Rajbhandari et al. 2019, section 3.1 and Figure 1)
------------------------------------------------------------------------------
Ψ parameters trained with Adam in mixed precision keep, per parameter:

    params             2 bytes   16-bit weights used by forward and backward
    grads              2 bytes   16-bit gradients
    master_params      4 bytes   fp32 copy of the weights the optimizer updates
    optimizer_states   8 bytes   Adam's m and v, fp32
                      --------
                      16 bytes   = 2 + 2 + K with K = 12 (master + m + v)

Data parallelism replicates all 16Ψ bytes on each of the N ranks. Each ZeRO stage partitions one
more of these states, so a rank keeps 1/N of it:

    stage 0  (plain data parallel)   2Ψ + 2Ψ + KΨ          = 16Ψ
    stage 1  (optimizer states)      2Ψ + 2Ψ + KΨ/N
    stage 2  (+ gradients)           2Ψ + (2 + K)Ψ/N
    stage 3  (+ parameters)          (2 + 2 + K)Ψ/N

Ψ = 7.5B, N = 64, K = 12 gives 120 GB, 31.4 GB, 16.6 GB and 1.9 GB (GB = 1e9 bytes, as in the
paper). In fp32 (precision="fp32") params and grads are 4 bytes and there is no master copy, so
K = 8 (m and v): 16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N. That is the ideal; at stages 1 and 2 ds_lab's ZeRO
engine (like DeepSpeed's) runs its optimizer on a flat fp32 shard that is a copy of this rank's
chunk even when the model is fp32, so a measured fp32 ledger shows 4Ψ/N more (master_params);
at stage 3 the fp32 parameter chunk is the master chunk and the measurement meets 16Ψ/N. The measured
claims of the chapters and tests are made in mixed precision, where the paper's K = 12 is exact.

Two ways to report the same bytes: `estimate_model_states` uses the paper's three categories (the
master copy inside optimizer_states); `estimate_ledger` splits master_params out, the categories
ds_lab's measured memory ledger reports, so a test can put one next to the other.

A partitioned state is a flat buffer padded to a multiple of N, so each rank holds ceil(Ψ/N)
elements of it; the paper writes Ψ/N, the same number whenever N divides Ψ. Not counted here:
activations (see `estimate_activations`), temporary buffers (communication buckets, the
all-gathered parameters of a ZeRO-3 layer), fp32 gradient copies, and allocator fragmentation.
DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs_all_cold`, in
`deepspeed_estimators.py`, importable from here) add some
of these; they answer "what do I provision", this module's core answers "what does ZeRO save".

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4.1), for sequence length s, micro batch b, hidden size h, a heads, per layer and
16-bit activations, no recomputation: s·b·h·(34 + 5·a·s/h) bytes. See `estimate_activations`.
"""
from __future__ import annotations

import math

from ds_lab.units import format_bytes
from ds_lab.zero.deepspeed_estimators import (estimate_zero2_model_states_mem_needs_all_cold,
                                              estimate_zero3_model_states_mem_needs_all_cold)

__all__ = ["STAGES", "LEDGER_CATEGORIES", "estimate_ledger", "estimate_model_states", "formula", "what_fits",
           "estimate_activations", "estimate_zero2_model_states_mem_needs_all_cold",
           "estimate_zero3_model_states_mem_needs_all_cold", "format_bytes", "format_count", "format_table",
           "format_what_fits"]

STAGES = (0, 1, 2, 3)
LEDGER_CATEGORIES = ("params", "grads", "master_params", "optimizer_states")

# Bytes per parameter of each model state, and the default K (master + optimizer states).
_BYTES_PER_PARAM = {
    "mixed": dict(params=2, grads=2, master_params=4, optimizer_states=8),
    "fp32": dict(params=4, grads=4, master_params=0, optimizer_states=8),
}
_PRECISION_ALIASES = {"bf16": "mixed", "fp16": "mixed"}  # ds_lab's config.precision names

# Which states each stage partitions across the N data-parallel ranks (each stage adds one).
_PARTITIONED = {
    0: set(),
    1: {"master_params", "optimizer_states"},
    2: {"master_params", "optimizer_states", "grads"},
    3: {"master_params", "optimizer_states", "grads", "params"},
}

# ---- model states ----------------------------------------------------------------------------

def _check(num_params, world_size, stage, precision) -> tuple[int, str]:
    precision = _PRECISION_ALIASES.get(precision, precision)
    if precision not in _BYTES_PER_PARAM:
        raise ValueError(f"precision {precision!r} is not known; use 'mixed' (bf16/fp16 weights with fp32 master "
                         f"copy) or 'fp32'")
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage {stage!r} does not exist; use 0, 1, 2 or 3")
    if world_size < 1 or int(world_size) != world_size:
        raise ValueError(f"world_size {world_size!r} must be a whole number of ranks, at least 1")
    if num_params < 0 or num_params != round(num_params):
        raise ValueError(f"num_params {num_params!r} must be a whole number of parameters, at least 0 "
                         f"(7.5e9 is fine)")
    return int(round(num_params)), precision


def _bytes_per_param(precision: str, optimizer_bytes) -> dict:
    per_param = dict(_BYTES_PER_PARAM[precision])
    if optimizer_bytes is not None:
        # K covers master copy + optimizer states; the master copy stays 4 bytes in mixed precision.
        if optimizer_bytes < per_param["master_params"]:
            raise ValueError(f"optimizer_bytes K={optimizer_bytes} is less than the {per_param['master_params']}-byte "
                             f"fp32 master copy it includes in {precision} precision; use K >= "
                             f"{per_param['master_params']}")
        per_param["optimizer_states"] = optimizer_bytes - per_param["master_params"]
    return per_param


def estimate_ledger(num_params, world_size: int, stage: int, precision: str = "mixed",
                    optimizer_bytes: int | None = None) -> dict:
    """Per-rank bytes in the categories of ds_lab's memory ledger: params, grads, master_params,
    optimizer_states, and their total.

    precision: "mixed" (also "bf16", "fp16") or "fp32". optimizer_bytes: K, bytes per parameter of
    master copy + optimizer states; default 12 in mixed precision (4 master + 4 m + 4 v), 8 in fp32.
    """
    num_params, precision = _check(num_params, world_size, stage, precision)
    shard = math.ceil(num_params / world_size)  # elements a rank keeps of a partitioned state
    ledger = {}
    for category, nbytes in _bytes_per_param(precision, optimizer_bytes).items():
        elements = shard if category in _PARTITIONED[stage] else num_params
        ledger[category] = nbytes * elements
    ledger["total"] = sum(ledger.values())
    return ledger


def estimate_model_states(num_params, world_size: int, stage: int, precision: str = "mixed",
                          optimizer_bytes: int | None = None) -> dict:
    """Per-rank bytes as the ZeRO paper counts them: params, grads, optimizer_states (which
    includes the fp32 master copy in mixed precision: K = 12), and total.

    Same arguments as `estimate_ledger`; optimizer_bytes defaults to K = 12 (mixed) or 8 (fp32).
    """
    ledger = estimate_ledger(num_params, world_size, stage, precision, optimizer_bytes)
    return dict(params=ledger["params"], grads=ledger["grads"],
                optimizer_states=ledger["master_params"] + ledger["optimizer_states"], total=ledger["total"])


def formula(stage: int, precision: str = "mixed", optimizer_bytes: int | None = None) -> str:
    """The paper's expression for a stage's per-rank bytes, e.g. '2Ψ + 2Ψ + 12Ψ/N'."""
    _, precision = _check(0, 1, stage, precision)
    per_param = _bytes_per_param(precision, optimizer_bytes)
    k = per_param["master_params"] + per_param["optimizer_states"]
    terms = [(per_param["params"], "params"), (per_param["grads"], "grads"), (k, "optimizer_states")]
    replicated = [f"{n}Ψ" for n, name in terms if name not in _PARTITIONED[stage]]
    partitioned = [n for n, name in terms if name in _PARTITIONED[stage]]
    if len(partitioned) > 1:
        sharded = [f"({' + '.join(str(n) for n in partitioned)})Ψ/N"]
    else:
        sharded = [f"{n}Ψ/N" for n in partitioned]
    return " + ".join(replicated + sharded)


def what_fits(gpu_bytes, world_size: int, precision: str = "mixed", optimizer_bytes: int | None = None) -> dict:
    """{stage: the largest Ψ whose model states fit in gpu_bytes per rank}.

    Per-rank bytes are (replicated bytes)·Ψ + (partitioned bytes)·Ψ/N, so Ψ_max is about
    gpu_bytes / (replicated + partitioned/N); the loop below settles the ceil(Ψ/N) rounding.
    Activations and buffers need room too: treat the answer as an upper bound.
    """
    fits = {}
    for stage in STAGES:
        def total(num_params):
            return estimate_ledger(num_params, world_size, stage, precision, optimizer_bytes)["total"]

        per_param = total(world_size) / world_size  # bytes per parameter per rank, exact at Ψ = N
        num_params = int(gpu_bytes // per_param) if per_param else 0
        while num_params > 0 and total(num_params) > gpu_bytes:
            num_params -= 1
        while total(num_params + 1) <= gpu_bytes:
            num_params += 1
        fits[stage] = num_params
    return fits


# ---- activations -----------------------------------------------------------------------------

def estimate_activations(batch_size: int, seq_len: int, hidden_size: int, num_layers: int,
                         num_heads: int | None = None, vocab_size: int | None = None,
                         bytes_per_element: int = 2, checkpointing: bool = False, dropout: bool = True) -> dict:
    """Bytes of activations a GPT keeps for backward, per rank (no tensor or sequence parallelism).

    Korthikanti et al. 2022, section 4.1: one pre-LayerNorm transformer layer keeps, with s =
    seq_len, b = batch_size, h = hidden_size, a = num_heads and 16-bit activations,

        s·b·h·(34 + 5·a·s/h) bytes.

    Where 34 and 5 come from, in elements (e = bytes_per_element) and 1-byte dropout masks:

        attention   input of the qkv projection sbh, Q and K 2sbh, V sbh, softmax output as²b,
                    its dropout output as²b and mask as²b (1 byte), input of the output
                    projection sbh, output dropout mask sbh (1 byte)       -> 11sbh + 5as²b at e=2
        MLP         input sbh, GELU input 4sbh, input of the second linear 4sbh, dropout mask
                    sbh (1 byte)                                          -> 19sbh
        LayerNorms  two inputs 2sbh                                       ->  4sbh

    so in general e·(16sbh + 2as²b) + (2sbh + as²b) bytes, and e·(16sbh + as²b) without dropout
    (dropout=False: no masks, no dropout output), which is ds_lab's GPT at dropout 0.

    Assumptions: num_heads=None means the a·s² attention scores are not kept (FlashAttention, or
    Korthikanti's selective recomputation), leaving 34sbh. checkpointing=True is full activation
    checkpointing: a layer keeps only its input, e·sbh (2sbh in 16-bit); during backward one layer's
    full activations are rebuilt, which this count leaves out, as the paper does. Embeddings, the
    final LayerNorm and biases' small tensors are not counted; the logits are, when vocab_size is
    given: s·b·V·e bytes (often the largest single tensor).

    Returns {"per_layer", "layers" (= num_layers · per_layer), "logits", "total"} in bytes.
    """
    s, b, h, e = seq_len, batch_size, hidden_size, bytes_per_element
    sbh = s * b * h
    if checkpointing:
        per_layer = e * sbh
    else:
        scores = num_heads * s * s * b if num_heads else 0  # a·s²·b: one s×s matrix per head
        if dropout:
            per_layer = e * (16 * sbh + 2 * scores) + (2 * sbh + scores)
        else:
            per_layer = e * (16 * sbh + scores)
    logits = s * b * vocab_size * e if vocab_size else 0
    layers = num_layers * per_layer
    return dict(per_layer=per_layer, layers=layers, logits=logits, total=layers + logits)


# ---- tables ----------------------------------------------------------------------------------

def format_count(num_params: float) -> str:
    """7.5e9 -> '7.5B', 1.25e6 -> '1.2M'."""
    for divisor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if num_params >= divisor:
            return f"{num_params / divisor:.1f}{suffix}"
    return f"{num_params:.0f}"


def format_table(num_params, world_size: int, precision: str = "mixed", optimizer_bytes: int | None = None) -> str:
    """The four stages side by side: bytes per rank by ledger category, the total, the formula."""
    columns = LEDGER_CATEGORIES + ("total",)
    lines = [f"model states per rank: Ψ = {format_count(num_params)} parameters, N = {world_size} ranks, "
             f"{precision} precision (GB = 1e9 bytes)",
             f"{'stage':<7}" + "".join(f"{c:>18}" for c in columns) + "   formula"]
    for stage in STAGES:
        ledger = estimate_ledger(num_params, world_size, stage, precision, optimizer_bytes)
        lines.append(f"{stage:<7}" + "".join(f"{format_bytes(ledger[c]):>18}" for c in columns)
                     + f"   {formula(stage, precision, optimizer_bytes)}")
    return "\n".join(lines)


def format_what_fits(gpu_bytes, world_size: int, precision: str = "mixed", optimizer_bytes: int | None = None) -> str:
    """What `what_fits` says, one line per stage."""
    fits = what_fits(gpu_bytes, world_size, precision, optimizer_bytes)
    lines = [f"largest model whose model states fit in {format_bytes(gpu_bytes)} per GPU, N = {world_size} ranks "
             f"(activations and buffers need room too):"]
    lines += [f"  stage {stage}: Ψ <= {format_count(fits[stage])} parameters" for stage in STAGES]
    return "\n".join(lines)
