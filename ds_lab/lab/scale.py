"""A scale simulator: project what a small run measured onto real clusters (chapter 10).

    from ds_lab.lab.scale import GPT3_175B, A100_80GB, PRESETS, Layout, Cluster, simulate
    plan = simulate(GPT3_175B, Layout(dp=16, tp=8, pp=8, global_batch=1536, recompute=True),
                    Cluster(A100_80GB, gpus_per_node=8, links=PRESETS["a100-nvlink+ib-hdr200"]))
    plan["memory"]["total"], plan["time"]["step"], plan["flops_per_gpu"]

Every number comes from one of four formulas, each stated here and checked in tests/test_scale.py.

Parameters (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", section 5.1): a GPT of l layers, hidden size h, sequence s, vocabulary V has

    Ψ = 12·l·h² + 13·l·h + (V + s)·h

FLOPs per token (a multiply-add is 2 FLOPs; backward costs twice forward):

    model    6Ψ + 12·l·s·h          6Ψ for the matmuls with the weights, 12·l·s·h for attention's
                                    QKᵀ and AV (no causal halving, as Megatron counts)
    hardware model + l·(24h² + 4sh) with full activation recomputation: every layer's forward runs
                                    once more in backward (the logits are not recomputed)

  The hardware count is Megatron's equation (3), 96·B·s·l·h²·(1 + s/6h + V/16lh) per batch of B
  sequences, up to the 78lh + 6sh terms of Ψ; the "achieved FLOP/s" Megatron reports count it.

Memory per GPU, with d·t·p = n GPUs (data, tensor, pipeline parallel):

    model states   estimate_ledger(Ψ/(t·p), d, zero_stage)       ZeRO partitions over d only
                   = (2 + 2 + 12)·Ψ/(t·p) at stage 0, ... (2+2+12)·Ψ/(t·p·d) at stage 3
    activations    per layer and micro batch b (Korthikanti et al. 2022, Table 2, 16-bit, no
                   sequence parallelism): s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes; with full
                   recomputation 2·s·b·h (the layer's input only). Under 1F1B the first stage holds
                   min(p, m) micro batches of l/p layers: at most the activations of l layers.

Step time: m = B/(d·b) micro batches per pipeline and step, a slot per micro batch and stage:

    slot        = FLOPs of one micro batch on one GPU / (peak · efficiency)
                  + tensor-parallel all-reduces: (4, or 6 with recomputation) per layer of the
                    stage, each of 2·b·s·h bytes over the t GPUs of a node
                  + pipeline send and receive of the 2·b·s·h/t bytes at the stage boundary
    pipeline    = (m + p − 1) · slot              the 1F1B bubble: (p − 1)/m of the ideal
    data        = the gradient sync of Ψ/(t·p) parameters once per step, not overlapped:
                  stage 0, 1    all-reduce, or reduce-scatter + all-gather: 2(d−1)/d · 2Ψ/(t·p) bytes
                  stage 2       a reduce-scatter per micro batch + one all-gather
                  stage 3       2 all-gathers + 1 reduce-scatter per micro batch: 3m(d−1)/d · 2Ψ/(t·p)
    step        = pipeline + data

Collective times come from the α–β model of `ds_lab.comm.links` (one record each, t = steps·α +
wire bytes/β), over NVLink when the group fits in a node, over the network otherwise.

What this leaves out (and why its step times are optimistic): kernels below peak (LayerNorm,
softmax, dropout and the optimizer are memory bound), overlap of communication with compute
(which would make it faster), the interleaved schedule, embeddings on the first and last stage
only, stragglers, network contention, and checkpointing. `efficiency` is one knob for all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

from ds_lab.comm.links import PRESETS, LinkModel
from ds_lab.zero.estimate import estimate_ledger

__all__ = ["GPU", "A100_80GB", "A100_40GB", "V100_32GB", "Transformer", "GPT3_175B", "MEGATRON_1T", "Layout",
           "Cluster", "model_flops_per_token", "hardware_flops_per_token", "megatron_flops_per_batch",
           "activation_bytes_per_layer", "memory_per_gpu", "dp_records", "step_time", "simulate",
           "training_days", "passes_per_parameter", "calibrate", "MEGATRON_TABLE1", "megatron_row", "PRESETS",
           "TP_ALLREDUCES_PER_LAYER", "layout_choices", "format_plans"]

# Megatron f and g (chapter 4): 2 all-reduces of b·s·h in each layer's forward, 2 in its backward;
# recomputation runs the forward's 2 again.
TP_ALLREDUCES_PER_LAYER = 4


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float       # dense 16-bit tensor-core FLOP/s (vendor datasheet)
    memory: float           # bytes


A100_80GB = GPU("A100 80GB", 312e12, 80e9)      # NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense
A100_40GB = GPU("A100 40GB", 312e12, 40e9)
V100_32GB = GPU("V100 32GB", 125e12, 32e9)      # NVIDIA V100 datasheet: 125 TFLOP/s fp16 tensor


@dataclass(frozen=True)
class Transformer:
    name: str
    layers: int
    hidden: int
    heads: int
    seq_len: int = 2048
    vocab: int = 51200

    @property
    def params(self) -> int:
        l, h = self.layers, self.hidden
        return 12 * l * h * h + 13 * l * h + (self.vocab + self.seq_len) * h


# GPT-3 (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288, 96 heads, context 2048; the
# vocabulary padded to 51,200 as Megatron does (GPT-2's BPE has 50,257 tokens).
GPT3_175B = Transformer("GPT-3 175B", 96, 12288, 96, 2048, 51200)
# Narayanan et al. 2021, Table 1, last row: 128 layers, hidden 25600, 160 heads -> 1008 B parameters.
MEGATRON_1T = Transformer("Megatron 1T", 128, 25600, 160, 2048, 51200)


@dataclass(frozen=True)
class Layout:
    """How n = dp·tp·pp GPUs share the work; global_batch sequences per optimizer step."""
    dp: int
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batch: int = 1
    global_batch: int = 512
    recompute: bool = False

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def micro_batches(self) -> int:
        """m: micro batches each pipeline runs per step (= gradient accumulation steps)."""
        per_pipeline, rest = divmod(self.global_batch, self.dp * self.micro_batch)
        if rest or per_pipeline < 1:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of dp {self.dp} x micro_batch "
                             f"{self.micro_batch}; change one so the product divides it")
        return per_pipeline


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    gpus_per_node: int = 8
    links: LinkModel = field(default_factory=lambda: PRESETS["a100-nvlink+ib-hdr200"])


# ---- FLOPs -------------------------------------------------------------------------------------

def model_flops_per_token(model: Transformer, attention: bool = True) -> float:
    """6Ψ (+ 12·l·s·h for attention's two batched matmuls, forward and backward)."""
    return 6 * model.params + (12 * model.layers * model.seq_len * model.hidden if attention else 0)


def hardware_flops_per_token(model: Transformer, recompute: bool, attention: bool = True) -> float:
    """What the GPU computes: the model FLOPs plus, with full recomputation, one more forward of
    every layer, l·(24h² + 4sh) (the 4sh only when attention is counted)."""
    l, h, s = model.layers, model.hidden, model.seq_len
    extra = l * (24 * h * h + (4 * s * h if attention else 0)) if recompute else 0
    return model_flops_per_token(model, attention) + extra


def megatron_flops_per_batch(model: Transformer, batch: int) -> float:
    """Narayanan et al. 2021, equation (3): 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)), recomputation on."""
    l, h, s, v = model.layers, model.hidden, model.seq_len, model.vocab
    return 96 * batch * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))


# ---- memory ------------------------------------------------------------------------------------

def activation_bytes_per_layer(model: Transformer, micro_batch: int, tp: int = 1, recompute: bool = False) -> float:
    """Korthikanti et al. 2022, Table 2: s·b·h·(10 + 24/t + 5as/(ht)) bytes (16-bit, dropout, no
    sequence parallelism); full recomputation keeps the layer input only, 2·s·b·h."""
    s, b, h, a = model.seq_len, micro_batch, model.hidden, model.heads
    if recompute:
        return 2 * s * b * h
    return s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))


def memory_per_gpu(model: Transformer, layout: Layout, precision: str = "mixed") -> dict:
    """Bytes per GPU: the model-states ledger of Ψ/(t·p) parameters over d ranks, plus activations."""
    params_per_gpu = math.ceil(model.params / (layout.tp * layout.pp))
    states = estimate_ledger(params_per_gpu, layout.dp, layout.zero, precision)
    in_flight = min(layout.pp, layout.micro_batches)  # 1F1B: micro batches the first stage holds
    layers = model.layers / layout.pp * in_flight
    activations = layers * activation_bytes_per_layer(model, layout.micro_batch, layout.tp, layout.recompute)
    return dict(states=states["total"], activations=activations, total=states["total"] + activations,
                params_per_gpu=params_per_gpu)


# ---- time --------------------------------------------------------------------------------------

def _record(op: str, group_size: int, message_bytes: float, inter: bool) -> SimpleNamespace:
    """A comm-log-like record (what `LinkModel.record_seconds` reads), with ring wire bytes."""
    from ds_lab.comm.trace import bus_factor
    return SimpleNamespace(op=op, group_size=group_size, bytes=message_bytes,
                           wire_bytes=message_bytes * bus_factor(op, group_size), link="inter" if inter else "intra")


def passes_per_parameter(zero: int, micro_batches: int = 1) -> float:
    """Messages of Ψ 16-bit values per step in the data-parallel sync, each costing (d−1)/d·2Ψ on
    the wire: 2 at stages 0 and 1, m + 1 at stage 2, 3m at stage 3 (see the module docstring)."""
    return {0: 2, 1: 2, 2: micro_batches + 1, 3: 3 * micro_batches}[zero]


def dp_records(model: Transformer, layout: Layout, cluster: Cluster, grad_bytes: int = 2) -> list:
    """The data-parallel collectives of one step of one GPU, as records."""
    d = layout.dp
    if d == 1:
        return []
    message = grad_bytes * math.ceil(model.params / (layout.tp * layout.pp))
    inter = d * layout.tp * layout.pp > cluster.gpus_per_node
    m = layout.micro_batches
    ops = {0: [("all_reduce", 1)], 1: [("reduce_scatter", 1), ("all_gather", 1)],
           2: [("reduce_scatter", m), ("all_gather", 1)], 3: [("all_gather", 2 * m), ("reduce_scatter", m)]}
    return [_record(op, d, message, inter) for op, count in ops[layout.zero] for _ in range(count)]


def step_time(model: Transformer, layout: Layout, cluster: Cluster, efficiency: float = 1.0,
              grad_bytes: int = 2) -> dict:
    """Seconds per optimizer step and its parts (see the module docstring)."""
    t, p, b, s, h = layout.tp, layout.pp, layout.micro_batch, model.seq_len, model.hidden
    m = layout.micro_batches
    links = cluster.links
    flops = b * s * hardware_flops_per_token(model, layout.recompute) / (t * p)
    compute = flops / (cluster.gpu.peak_flops * efficiency)
    tp_comm = 0.0
    if t > 1:
        per_layer = TP_ALLREDUCES_PER_LAYER + (2 if layout.recompute else 0)
        record = _record("all_reduce", t, 2 * b * s * h, inter=t > cluster.gpus_per_node)
        tp_comm = model.layers / p * per_layer * links.record_seconds(record)
    pp_comm = 0.0
    if p > 1:  # one activation forward, one gradient backward; Megatron scatters it over the t ranks
        record = _record("send", 2, 2 * b * s * h / t, inter=t * p > cluster.gpus_per_node)
        pp_comm = 2 * links.record_seconds(record)
    slot = compute + tp_comm + pp_comm
    pipeline = (m + p - 1) * slot
    data = links.estimate_seconds(dp_records(model, layout, cluster, grad_bytes))
    return dict(compute=m * compute, tp_comm=m * tp_comm, pp_comm=m * pp_comm, bubble=(p - 1) * slot,
                dp_comm=data, step=pipeline + data, bubble_fraction=(p - 1) / m)


def simulate(model: Transformer, layout: Layout, cluster: Cluster, efficiency: float = 1.0,
             grad_bytes: int = 2) -> dict:
    """Memory and time of one step, the FLOP/s each GPU achieves (hardware FLOPs, as Megatron
    counts them) and whether the memory fits."""
    memory = memory_per_gpu(model, layout)
    time = step_time(model, layout, cluster, efficiency, grad_bytes)
    tokens = layout.global_batch * model.seq_len
    per_gpu = tokens * hardware_flops_per_token(model, layout.recompute) / (layout.gpus * time["step"])
    return dict(memory=memory, time=time, fits=memory["total"] <= cluster.gpu.memory, flops_per_gpu=per_gpu,
                aggregate_flops=per_gpu * layout.gpus, tokens_per_second=tokens / time["step"],
                model_flops_utilization=tokens * model_flops_per_token(model) / (layout.gpus * time["step"])
                / cluster.gpu.peak_flops)


def training_days(params: float, tokens: float, gpus: int, flops_per_gpu: float) -> float:
    """Narayanan et al. 2021's end-to-end estimate, 8·T·P/(n·X) seconds (8 = 6 + 2 for recomputation), in days."""
    return 8 * tokens * params / (gpus * flops_per_gpu) / 86400


def calibrate(model: Transformer, layout: Layout, cluster: Cluster, achieved_flops_per_gpu: float) -> float:
    """The `efficiency` at which `simulate` reports `achieved_flops_per_gpu` (bisection; the
    simulated FLOP/s rise monotonically with it)."""
    low, high = 1e-3, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if simulate(model, layout, cluster, mid)["flops_per_gpu"] < achieved_flops_per_gpu:
            low = mid
        else:
            high = mid
    return (low + high) / 2


# Narayanan et al. 2021, Table 1 (weak scaling on A100 80GB, Selene): parameters (billions), heads,
# hidden, layers, tensor t, pipeline p, GPUs n, batch B, achieved teraFLOP/s per GPU, % of peak,
# aggregate petaFLOP/s. Data parallel d = n/(t·p). All rows use activation recomputation.
MEGATRON_TABLE1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44, 4.4),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43, 34.6),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44, 70.8),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47, 227.1),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50, 297.4),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52, 410.2),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52, 502.0),
]


def megatron_row(row, micro_batch: int = 1) -> tuple:
    """(Transformer, Layout, published FLOP/s per GPU) of a MEGATRON_TABLE1 row. The table does not
    give the micro batch; 1 is assumed."""
    billions, heads, hidden, layers, t, p, n, batch, tflops = row[:9]
    model = Transformer(f"{billions:g}B", layers, hidden, heads)
    layout = Layout(dp=n // (t * p), tp=t, pp=p, micro_batch=micro_batch, global_batch=batch, recompute=True)
    return model, layout, tflops * 1e12


def layout_choices(gpus: int, global_batch: int, tp: int = 8, pp: int = 8) -> dict:
    """The choices chapter 10 compares on n GPUs: plain DP, ZeRO-1/2/3 over all n, TP inside a node
    (DP across), PP across nodes (DP across), and 3D (t·p·d = n); all with full recomputation."""
    def layout(**kw):
        return Layout(global_batch=global_batch, recompute=True, **kw)
    return {"DP": layout(dp=gpus), "ZeRO-1": layout(dp=gpus, zero=1), "ZeRO-2": layout(dp=gpus, zero=2),
            "ZeRO-3": layout(dp=gpus, zero=3), f"TP {tp} x DP": layout(dp=gpus // tp, tp=tp),
            f"PP {pp} x DP": layout(dp=gpus // pp, pp=pp), f"3D {tp}x{pp}": layout(dp=gpus // (tp * pp), tp=tp, pp=pp)}


def format_plans(plans: dict, gpu: GPU) -> str:
    """One line per {name: simulate(...)} result: memory per GPU, step time and its parts."""
    lines = [f"{'layout':<14}{'states GB':>10}{'activ. GB':>10}{'fits':>6}{'step s':>9}{'compute':>9}{'bubble':>8}"
             f"{'TP comm':>9}{'PP comm':>9}{'DP comm':>9}{'TFLOP/s':>9}"]
    for name, plan in plans.items():
        m, t = plan["memory"], plan["time"]
        lines.append(f"{name:<14}{m['states'] / 1e9:>10.1f}{m['activations'] / 1e9:>10.1f}"
                     f"{'yes' if plan['fits'] else 'NO':>6}{t['step']:>9.1f}{t['compute']:>9.1f}{t['bubble']:>8.1f}"
                     f"{t['tp_comm']:>9.1f}{t['pp_comm']:>9.1f}{t['dp_comm']:>9.1f}{plan['flops_per_gpu'] / 1e12:>9.0f}")
    note = f"(memory per GPU against {gpu.memory / 1e9:.0f} GB; times in seconds per step)"
    return "\n".join(lines + [note])
