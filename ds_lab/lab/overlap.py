"""Communication overlap, measured: when does each bucket's all-reduce run, against backward?

    MODEL = dict(n_layer=4, n_head=4, n_embd=256, block_size=32)
    results = ds_lab.launch(overlap_train, 2, MODEL, steps=6, bucket_size=2**18)   # one timeline per rank
    print(timeline_summary(results))        # per mode: step time, overlap fraction, exposed communication
    fig = draw_overlap(results)             # one row per rank, overlap on above overlap off

`zero_optimization.overlap_comm` at stage 0 chooses BucketedAllReduce's schedule
(runtime/data_parallel.py): on, a bucket's async all-reduce leaves as soon as backward has produced
its last gradient; off, every bucket is reduced after backward, one after the other. Each rank
builds both engines from the same seed and trains them on the same batches, the order alternating
(on, off, off, on, ...) after a barrier, so both see the same machine load and the same data.

What one step records (wall clock, `time.time()`, the clock of `CommRecord.start`, common to the
ranks of one machine):
- forward start, backward start, `backward_end` = the last gradient accumulated (our own
  post-accumulate-grad hooks, registered before the engine's, so a gradient is timed before its
  bucket can leave), `backward_return` = when `engine.backward(loss)` returned (it also waits for
  the all-reduces), optimizer step start/end around `engine.step()`;
- each "grad_allreduce" record (`ds_lab.comm.get_log(since=...)`): issued at `start`, done
  `seconds` later. A bar runs from issue to completion, so an async bucket queued behind another
  one counts its waiting too; the summary therefore measures the *union* of the bars.

Measured, per mode (`timeline_summary`):
    overlap fraction  = |union of all-reduce bars ∩ [backward start, backward end]| / |union|
    bytes overlapped  = bytes of the buckets issued before backward ended / all gradient bytes (4Ψ fp32)
    exposed comm      = last all-reduce done - backward end   (what the step waits for after compute)

What 2 CPU cores say (gloo, one torch thread per rank; benchmarks/RESULTS.md has every run):
- Overlap is not free here. Gloo's communication thread has no core of its own (the two ranks'
  compute threads already hold both), so backward runs slower while buckets are on the wire:
  22-45 -> 37-68 ms for a 4x256 GPT with 64 tokens per rank, e.g. 60 -> 72 and 66 -> 81 ms for
  a 4x128 GPT with 1,024.
- What it hides is the all-reduces in series after backward: exposed communication falls from
  25-65 ms to 6-23 ms (4x256, 13 buckets of 1 MiB; 76-83% of the all-reduce time inside backward).
- It wins when the hidden communication outweighs the slower backward: little compute per
  gradient byte (4x256 GPT, 12.3 MiB of gradients, 2 x 32 tokens per rank). Six interleaved runs
  of 100 steps: on/off 0.88-0.98 on both ranks, on faster in 366 and 365 of 600 steps (ranks 0
  and 1, sign test p ~1e-7); four runs are significant alone (p <= 0.035), two are not (p 0.09-0.48).
- The counter-case, kept on purpose: with dp_vs_ddp's batch (4x128 GPT, 8 x 128 tokens per rank,
  13 buckets) overlap removes 16-35 ms of exposed communication and backward gives 12-15 ms back:
  three of four runs show no significant sign (0.98-1.01, p 0.37-0.92); one at load 8 favours on
  (0.94, p 9e-4); two short runs on a quiet machine (load 0.3-1) had on 2-4% slower.
- With a single bucket (the default `reduce_bucket_size`, 5e8 elements, holds any model here; the
  run used 25 MiB) nothing can overlap: the bucket is complete only when backward ends, and on
  equals off (1.02-1.05, p 0.6-0.8). Hence small buckets in every measurement above.
On a GPU the trade is different: NCCL runs on its own streams, beside the kernels that compute, not
on the CPU cores that feed them; that is why torch DDP always overlaps, and ds_lab's stage 0 does
unless `overlap_comm` is false.
"""
from __future__ import annotations

import statistics
import time

import torch

import ds_lab
from ds_lab import comm
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.models import GPT, GPTConfig

MODES = {"on": True, "off": False}  # the name of a mode -> zero_optimization.overlap_comm
BAR_COLORS = dict(forward="#4C72B0", backward="#DD8452", step="#55A868", allreduce="#8172B3")


def overlap_config(overlap: bool, bucket_size: int, micro_batch: int, lr: float = 1e-3) -> dict:
    """Stage 0 with `reduce_bucket_size` elements per bucket and overlap on or off; fp32, AdamW."""
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": lr}},
            "zero_optimization": {"stage": 0, "reduce_bucket_size": bucket_size, "overlap_comm": overlap}}


class TimedEngine:
    """One side of the comparison: a GPT built from `seed` inside an engine, stepped by
    `side(batch, t)` (benchmarks/interleave.py's protocol: appends `time.perf_counter()` after
    forward and after backward to `t`, returns the loss), keeping one timeline entry per step."""

    def __init__(self, model: dict, config: dict, seed: int = 0):
        torch.manual_seed(seed)
        gpt = GPT(GPTConfig(**model))
        self.grad_times: list = []
        for p in gpt.parameters():  # before initialize: ours run before the engine's bucket hooks
            p.register_post_accumulate_grad_hook(lambda p: self.grad_times.append(time.time()))
        self.engine, _, _, _ = ds_lab.initialize(model=gpt, config=config)
        self.steps: list = []

    def __call__(self, batch: dict, t=None):
        t = [] if t is None else t
        engine, mark = self.engine, comm.record_count()
        self.grad_times.clear()
        forward_start = time.time()
        loss = engine(**batch).loss
        t.append(time.perf_counter())
        backward_start = time.time()
        engine.backward(loss)
        backward_return = time.time()
        t.append(time.perf_counter())
        engine.step()
        step_end = time.time()
        records = [r for r in comm.get_log(since=mark) if r.tag == "grad_allreduce"]
        self.steps.append(dict(
            forward_start=forward_start, backward_start=backward_start,
            backward_end=max(self.grad_times, default=backward_return), backward_return=backward_return,
            step_start=backward_return, step_end=step_end, loss=loss.item(),
            allreduces=[dict(start=r.start, end=r.start + r.seconds, bytes=r.bytes) for r in records]))
        return loss


def overlap_sides(model: dict, bucket_size: int, micro_batch: int = 4, seed: int = 0, lr: float = 1e-3) -> dict:
    """{"on": TimedEngine, "off": TimedEngine}: the same GPT (same seed) under both schedules."""
    return {name: TimedEngine(model, overlap_config(flag, bucket_size, micro_batch, lr), seed)
            for name, flag in MODES.items()}


def rank_timeline(sides: dict, warmup: int = 0) -> dict:
    """What one rank returns: per mode the step timelines (the first `warmup` dropped) and every
    loss; the parameter count, the bucket sizes (elements), and the largest difference between the
    engines' final weights (0.0: overlap changes when bytes move, not what is summed)."""
    engines = [side.engine for side in sides.values()]
    with torch.no_grad():
        weight_diff = max((a - b).abs().max().item() for a, b in
                          zip(engines[0].module.parameters(), engines[-1].module.parameters()))
    reducer = engines[0].reducer
    return dict(rank=comm.get_rank(), world_size=comm.get_world_size(),
                num_parameters=sum(p.numel() for p in reducer.params),
                buckets=[end - start for start, end in reducer.buckets], weight_max_diff=weight_diff,
                modes={name: dict(steps=side.steps[warmup:], losses=[s["loss"] for s in side.steps])
                       for name, side in sides.items()})


def overlap_train(model: dict, steps: int, bucket_size: int, micro_batch: int = 4, warmup: int = 1,
                  seed: int = 0, lr: float = 1e-3) -> dict:
    """On every rank: both engines (overlap on and off, same seed), `warmup + steps` interleaved steps
    on the shipped corpus, each after a barrier, the order alternating. Returns `rank_timeline`."""
    sides = overlap_sides(model, bucket_size, micro_batch, seed, lr)
    loader = DistributedLoader(corpus_tokens(), model["block_size"], micro_batch, dp_rank=comm.get_rank(),
                               dp_size=comm.get_world_size(), seed=seed)
    names = list(sides)
    for i in range(warmup + steps):
        batch = loader.batch(i)
        for name in (names if i % 2 == 0 else names[::-1]):  # neither mode always goes first
            comm.barrier()  # both ranks start the step together
            sides[name](batch)
    return rank_timeline(sides, warmup)


# ---- what a timeline says -----------------------------------------------------------------------

def _union(intervals) -> list:
    """Sorted, merged (start, end) intervals."""
    merged: list = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _inside(intervals, lo: float, hi: float) -> float:
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in intervals)


def step_measures(step: dict) -> dict:
    """One step of one rank: step and backward seconds, all-reduce busy seconds (union of the bars),
    the fraction of them inside backward, the fraction of bytes issued inside it, exposed seconds."""
    bars = _union((r["start"], r["end"]) for r in step["allreduces"])
    busy = sum(b - a for a, b in bars)
    total_bytes = sum(r["bytes"] for r in step["allreduces"])
    last_done = max((r["end"] for r in step["allreduces"]), default=step["backward_end"])
    return dict(step_s=step["step_end"] - step["forward_start"],
                backward_s=step["backward_end"] - step["backward_start"],
                allreduce_s=busy,
                overlap_fraction=_inside(bars, step["backward_start"], step["backward_end"]) / busy if busy else 0.0,
                bytes_overlapped=sum(r["bytes"] for r in step["allreduces"] if r["start"] < step["backward_end"])
                / total_bytes if total_bytes else 0.0,
                exposed_s=max(0.0, last_done - step["backward_end"]),
                allreduce_bytes=total_bytes, allreduces=len(step["allreduces"]))


def timeline_summary(timeline: list) -> dict:
    """`timeline`: what `launch(overlap_train, ...)` returns (one dict per rank). Per mode, the mean
    over ranks and steps of every `step_measures` value, plus `step_s_median` and, for "on",
    `wins`: the fraction of (rank, step) pairs where on's step was faster than off's same step."""
    out = {}
    for name in timeline[0]["modes"]:
        rows = [step_measures(s) for r in timeline for s in r["modes"][name]["steps"]]
        out[name] = {key: statistics.fmean(row[key] for row in rows) for key in rows[0]}
        out[name]["step_s_median"] = statistics.median(row["step_s"] for row in rows)
    if set(out) == set(MODES):
        pairs = [(a["step_end"] - a["forward_start"], b["step_end"] - b["forward_start"]) for r in timeline
                 for a, b in zip(r["modes"]["on"]["steps"], r["modes"]["off"]["steps"])]
        out["on"]["wins"] = sum(a < b for a, b in pairs) / len(pairs)
        out["on"]["ratio_median"] = statistics.median(a / b for a, b in pairs)  # on / off, per step
    return out


def format_summary(summary: dict) -> str:
    """A markdown table of `timeline_summary` (milliseconds)."""
    lines = ["| overlap_comm | step ms (mean / median) | backward ms | all-reduce busy ms | all-reduce time "
             "inside backward | bytes issued inside backward | exposed comm ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {1e3 * s['step_s']:.1f} / {1e3 * s['step_s_median']:.1f} | "
                     f"{1e3 * s['backward_s']:.1f} | {1e3 * s['allreduce_s']:.1f} | {s['overlap_fraction']:.0%} | "
                     f"{s['bytes_overlapped']:.0%} | {1e3 * s['exposed_s']:.1f} |")
    if "ratio_median" in summary.get("on", {}):
        lines.append(f"\non/off step time: median of per-step ratios {summary['on']['ratio_median']:.3f}; "
                     f"on faster in {summary['on']['wins']:.0%} of the (rank, step) pairs")
    return "\n".join(lines)


# ---- the picture --------------------------------------------------------------------------------

def draw_overlap(timeline: list, step: int = -1, figsize=(10, 4.5)):
    """Overlap on above overlap off, for one step: per rank a row with forward (blue), backward
    (orange, to its last gradient) and optimizer step (green) boxes, and under it every bucket's
    all-reduce bar (purple, issue to completion; bucket 0, the last layers, on top). Time in ms from the
    step's first forward on any rank; both panels share the axis. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(timeline[0]["modes"])
    fig, axes = plt.subplots(len(names), 1, figsize=figsize, sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        steps = [r["modes"][name]["steps"][step] for r in timeline]
        begin = min(s["forward_start"] for s in steps)
        ms = lambda t: 1e3 * (t - begin)  # noqa: E731
        for rank, s in enumerate(steps):
            y = len(steps) - 1 - rank
            for kind, a, b in (("forward", s["forward_start"], s["backward_start"]),
                               ("backward", s["backward_start"], s["backward_end"]),
                               ("step", s["step_start"], s["step_end"])):
                ax.broken_barh([(ms(a), ms(b) - ms(a))], (y + 0.05, 0.4), facecolors=BAR_COLORS[kind])
            bars = s["allreduces"]
            for k, r in enumerate(bars):
                lane = 0.4 / max(1, len(bars))
                ax.broken_barh([(ms(r["start"]), max(ms(r["end"]) - ms(r["start"]), 0.05))],
                               (y - 0.05 - (k + 1) * lane, lane * 0.9), facecolors=BAR_COLORS["allreduce"])
            ax.vlines(ms(s["backward_end"]), y - 0.5, y + 0.5, color="black", linewidth=0.6, linestyles=":")
        ax.set_yticks(range(len(steps)), [f"rank {r}" for r in reversed(range(len(steps)))])
        ax.set_title(f"overlap_comm {name}: {len(steps[0]['allreduces'])} bucket all-reduces", fontsize=10)
    axes[-1, 0].set_xlabel("ms from the step's first forward (dotted: last gradient of backward)")
    fig.legend(handles=[Patch(color=c, label=k) for k, c in BAR_COLORS.items()], loc="upper right", ncol=4,
               fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig
