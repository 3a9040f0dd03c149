"""Flat against hierarchical gradient all-reduce, side by side, on 4 ranks simulated as 2 nodes of 2.

    python benchmarks/hierarchical_vs_flat.py                     # GPT 4x128, one 25 MiB bucket
    python benchmarks/hierarchical_vs_flat.py --bucket-mb 0.25    # 13 buckets: overlap and padding
    python benchmarks/hierarchical_vs_flat.py --ranks-per-node 4  # one node: both sides are flat

About 30 s on 2 CPU cores. Every rank is on this machine: the "nodes" are `launch(ranks_per_node=2)`
(LOCAL_WORLD_SIZE=2), so both sides cross the same loopback and the timings say what the extra
collectives cost here, not what a real network would. The bytes do not depend on the machine:

- Two engines on every rank, from the same weights and batches: `"hierarchical_allreduce": false`
  (one flat all-reduce per bucket) and `true` (intra-node reduce-scatter, inter-node all-reduce of
  half the bucket, intra-node all-gather). Steps are timed interleaved (`interleave.py`), and the
  losses must agree (relative 1e-5: the sums run in another order).
- "comm only": the same gradient buffer all-reduced both ways, alternating, with no training.
- Inter-node bytes per rank and step come from the comm log (`summarize(links=("inter",))`), next
  to `comm.links.cross_node_bytes` (which accounting gives 1/k is worked out in `comm/links.py`).
- The alpha-beta projection prices one step's recorded collectives on real clusters
  (`comm.links.PRESETS`), for this model and for the same schedule scaled to `--project-params`.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ds_lab  # noqa: E402
from ds_lab import comm  # noqa: E402
from ds_lab.comm import links  # noqa: E402
from ds_lab.comm.hierarchical import HierarchicalAllReduce  # noqa: E402
from ds_lab.data import DistributedLoader, corpus_tokens  # noqa: E402
from ds_lab.models import GPT, GPTConfig  # noqa: E402
from interleave import PHASES, common_args, engine_step, median_ms, run_interleaved, training_config  # noqa: E402

MIB = 2**20
LOSS_RTOL = 1e-5
SIDES = ("flat", "hierarchical")


def parse_args(argv=None):
    p = common_args(__doc__.splitlines()[0], n_embd=128, warmup=3, iters=20)
    p.set_defaults(world_size=4)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=25.0, help="reduce_bucket_size in MiB of fp32 elements")
    p.add_argument("--comm-iters", type=int, default=30, help="alternating all-reduces of the gradient buffer")
    p.add_argument("--project-params", type=float, default=1.3e9, help="model size for the scaled projection")
    return p.parse_args(argv)


def worker(args) -> dict:
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size))
    zero = {"stage": 0, "reduce_bucket_size": int(args.bucket_mb * MIB) // 4}
    engines = {side: ds_lab.initialize(model=copy.deepcopy(model), config={
        **training_config(args), "zero_optimization": zero, "hierarchical_allreduce": side == "hierarchical"})[0]
        for side in SIDES}
    flat_engine = engines["flat"]
    loader = DistributedLoader(corpus_tokens(), args.block_size, args.micro_batch,
                               dp_rank=flat_engine.dp_rank, dp_size=flat_engine.dp_world_size, seed=args.seed)
    last_step = {}  # side -> the grad_allreduce records of its latest step

    def recorded(side):
        step = engine_step(engines[side])

        def run(batch, t):
            mark = comm.record_count()
            loss = step(batch, t)
            last_step[side] = [r for r in comm.get_log(since=mark) if r.tag == "grad_allreduce"]
            return loss
        return run

    times, losses = run_interleaved({side: recorded(side) for side in SIDES}, loader.batch, args.warmup,
                                    args.iters, on_warm=comm.reset_log)
    inter = {side: links.inter_wire_bytes(last_step[side]) for side in SIDES}
    comm_times = comm_only(flat_engine.reducer.buffer.numel(), args.comm_iters)
    return dict(rank=comm.get_rank(), times=times, losses=losses, comm_times=comm_times, inter=inter,
                records={side: [dataclasses.asdict(r) for r in recs] for side, recs in last_step.items()},
                num_parameters=flat_engine.num_parameters(), buckets=len(flat_engine.reducer.buckets))


def comm_only(numel: int, iters: int) -> dict:
    """The gradient buffer all-reduced flat and hierarchically, alternating, after a barrier each."""
    hierarchy = HierarchicalAllReduce()
    buffer = torch.randn(numel)
    ops = {"flat": lambda: comm.all_reduce(buffer), "hierarchical": lambda: hierarchy.all_reduce(buffer)}
    times = {side: [] for side in SIDES}
    for i in range(iters + 2):
        for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
            comm.barrier()
            t0 = time.perf_counter()
            ops[side]()
            if i >= 2:
                times[side].append(time.perf_counter() - t0)
    return times


def projection_lines(args, r0) -> list:
    scale = args.project_params / r0["num_parameters"]
    lines = ["", f"alpha-beta projection of one step's gradient collectives (rank 0's records; serial, no "
             f"overlap), this model and scaled to {args.project_params:.3g} parameters (fp32 gradients):",
             "| cluster (comm/links.py PRESETS) | flat | hierarchical | flat, scaled | hierarchical, scaled |",
             "|---|---:|---:|---:|---:|"]
    records = {side: [comm.CommRecord(**rec) for rec in r0["records"][side]] for side in SIDES}
    scaled = {side: [dataclasses.replace(rec, bytes=int(rec.bytes * scale)) for rec in recs]
              for side, recs in records.items()}
    for name, model in links.PRESETS.items():
        cells = [f"{model.estimate_seconds(records[s]) * 1e6:.1f} µs" for s in SIDES]
        cells += [f"{model.estimate_seconds(scaled[s]) * 1e3:.1f} ms" for s in SIDES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def worst_loss_diff(results) -> float:
    return max(abs(a - b) / abs(b) for r in results for a, b in zip(r["losses"]["hierarchical"], r["losses"]["flat"]))


def report(args, results) -> str:
    r0 = results[0]
    psi = r0["num_parameters"]
    lines = [f"GPT n_layer={args.n_layer} n_embd={args.n_embd}: {psi:,} parameters ({4 * psi / MIB:.2f} MiB "
             f"fp32, {r0['buckets']} bucket(s)); {args.world_size} ranks as {args.world_size // args.ranks_per_node} "
             f"node(s) of {args.ranks_per_node} (gloo, torch {torch.__version__}); {args.iters} timed "
             f"iterations after {args.warmup} warm-up, order alternating", "",
             "rank 0, median ms per step:",
             "| side | step (total) | " + " | ".join(PHASES) + " | comm only (same buffer) |",
             "|---|---:|---:|---:|---:|---:|"]
    for side in SIDES:
        t = r0["times"][side]
        phases = " | ".join(f"{median_ms(t[ph]):.2f}" for ph in PHASES)
        lines.append(f"| {side} | {median_ms(t['total']):.2f} | {phases} | {median_ms(r0['comm_times'][side]):.2f} |")
    hier, flat = r0["times"]["hierarchical"]["total"], r0["times"]["flat"]["total"]
    per_iter = statistics.median(a / b for a, b in zip(hier, flat))
    lines.append(f"\nhierarchical / flat step time, median of per-iteration ratios (rank 0): {per_iter:.3f}")
    analytic = links.cross_node_bytes(psi, args.world_size, args.ranks_per_node)
    measured = {side: [r["inter"][side] for r in results] for side in SIDES}
    boundary = [r["rank"] for r in results if r["rank"] % args.ranks_per_node == args.ranks_per_node - 1]
    lines += ["", "inter-node bytes per step (comm log: wire bytes of records whose group spans nodes):",
              "| side | per rank, max (log) | per rank (analytic) | whole job (log, ring edges that cross) | "
              "whole job (analytic) |", "|---|---:|---:|---:|---:|"]
    for side in SIDES:
        crossing = measured[side] if side == "hierarchical" else [measured[side][r] for r in boundary]
        lines.append(f"| {side} | {max(measured[side]):,.0f} | {analytic[side]['per_rank']:,.0f} | "
                     f"{sum(crossing):,.0f} | {analytic[side]['total']:,.0f} |")
    if max(measured["flat"]):
        lines.append(f"hierarchical / flat: per rank {max(measured['hierarchical']) / max(measured['flat']):.3f}, "
                     f"message {analytic['hierarchical']['message'] / analytic['flat']['message']:.3f} "
                     f"(analytic, whole buffer; the log pads each bucket)")
    lines += projection_lines(args, r0)
    lines.append(f"\nlosses agree: max relative difference {worst_loss_diff(results):.1e} "
                 f"(rank 0 loss {r0['losses']['flat'][0]:.4f} -> {r0['losses']['flat'][-1]:.4f})")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    results = ds_lab.launch(worker, args.world_size, args, ranks_per_node=args.ranks_per_node)
    print(report(args, results))
    worst = worst_loss_diff(results)
    if worst > LOSS_RTOL:
        sys.exit(f"flat and hierarchical losses differ by up to {worst:.1e}")


if __name__ == "__main__":
    main()
