"""Data parallel with `overlap_comm` on vs off: step time, all-reduce inside backward, exposed comm.

    python benchmarks/overlap_on_off.py                  # 4x256 GPT, 2 x 32 tokens per rank, 13 buckets: on wins
    python benchmarks/overlap_on_off.py --n-embd 128 --block-size 128 --micro-batch 8 --bucket-mb 0.25
                                                         # dp_vs_ddp's batch: no sure gain (the counter-case)
    python benchmarks/overlap_on_off.py --bucket-mb 25   # one bucket: nothing to overlap
    python benchmarks/overlap_on_off.py --figure overlap.png   # also draw the last step's rank timelines

20 to 44 s on 2 CPU cores shared with other jobs (load 2.4 to 4.6); the counter-case 32 to 61 s
(load 2.3 to 8).

Each rank builds two engines from the same seed (ds_lab/lab/overlap.py: `overlap_sides`), stage 0
with `reduce_bucket_size` = --bucket-mb MiB of fp32 elements, one with `overlap_comm` true, one
false, and trains both on the same batches. Timing is interleaved (benchmarks/interleave.py): each
iteration steps both after a barrier, the order alternating. Besides the step times, every step
records when backward produced its last gradient and when each bucket's all-reduce was issued and
completed (the `ds_lab.comm` log), which gives per mode:

    all-reduce time inside backward = |union of the all-reduce bars ∩ backward| / |union|
    bytes issued inside backward    = bytes of buckets issued before the last gradient / 4Ψ
    exposed communication           = last all-reduce done - last gradient

The ratio on/off is the median of the per-iteration ratios (both steps of one iteration see the
same load); the sign test says how sure the sign of the difference is. Losses and final weights
must be identical (overlap changes when bytes move, not what is summed); the script exits with an
error otherwise.

Why the default batch is small (2 sequences of 32 tokens per rank): on 2 cores each rank's compute
thread already has its core, so gloo's communication thread competes with backward for it; overlap
is worth that only when the serial all-reduces it hides cost more than backward loses. With 1,024
tokens per rank (dp_vs_ddp's batch) backward is long, the hidden latency is a smaller part of the
step, and the slowdown of backward can eat the gain: see benchmarks/RESULTS.md.
"""
from __future__ import annotations

import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ds_lab  # noqa: E402
from ds_lab import comm  # noqa: E402
from ds_lab.data import DistributedLoader, corpus_tokens  # noqa: E402
from ds_lab.lab.overlap import format_summary, overlap_sides, rank_timeline, timeline_summary  # noqa: E402
from interleave import common_args, median_ms, run_interleaved  # noqa: E402  (this folder is on sys.path)

MIB = 2**20


def parse_args(argv=None):
    p = common_args(__doc__.splitlines()[0], n_embd=256, warmup=5, iters=100)
    p.set_defaults(block_size=32, micro_batch=2)
    p.add_argument("--bucket-mb", type=float, default=1.0,
                   help="reduce_bucket_size = this many MiB of fp32 elements (1: 13 buckets at the default GPT)")
    p.add_argument("--figure", default="", help="save the last step's timelines (on above off) to this file")
    return p.parse_args(argv)


def worker(args) -> dict:
    model = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    sides = overlap_sides(model, int(args.bucket_mb * MIB) // 4, args.micro_batch, args.seed, args.lr)
    loader = DistributedLoader(corpus_tokens(), args.block_size, args.micro_batch, dp_rank=comm.get_rank(),
                               dp_size=comm.get_world_size(), seed=args.seed)
    times, losses = run_interleaved(sides, loader.batch, args.warmup, args.iters)
    return dict(rank_timeline(sides, args.warmup), times=times, threads=torch.get_num_threads())


def sign_test(wins: int, n: int) -> float:
    """Two-sided binomial p-value of `wins` out of `n` under 'either side is as likely to be faster'."""
    k = min(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def report(args, results) -> str:
    r0 = results[0]
    lines = [f"GPT n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} block_size={args.block_size}: "
             f"{r0['num_parameters']:,} parameters ({4 * r0['num_parameters'] / MIB:.2f} MiB fp32); micro-batch "
             f"{args.micro_batch} x {args.world_size} ranks (gloo, {r0['threads']} torch thread(s) per rank, "
             f"torch {torch.__version__})",
             f"reduce_bucket_size={int(args.bucket_mb * MIB) // 4:,} elements: {len(r0['buckets'])} bucket(s); "
             f"{args.iters} timed iterations after {args.warmup} warm-up, order alternating", ""]
    for r in results:
        on, off = r["times"]["on"]["total"], r["times"]["off"]["total"]
        wins = sum(a < b for a, b in zip(on, off))
        lines.append(f"rank {r['rank']}: on {median_ms(on):.2f} ms, off {median_ms(off):.2f} ms; ratio on/off: "
                     f"median of per-iteration ratios {statistics.median(a / b for a, b in zip(on, off)):.3f}, "
                     f"ratio of medians {statistics.median(on) / statistics.median(off):.3f}; on faster in "
                     f"{wins}/{len(on)} iterations (sign test p = {sign_test(wins, len(on)):.1e})")
    lines += ["", "all ranks, timed steps (means unless marked):", format_summary(timeline_summary(results)), ""]
    step_bytes = {sum(a["bytes"] for a in s["allreduces"]) for r in results for m in r["modes"].values()
                  for s in m["steps"]}
    loss_diff = max(abs(a - b) for r in results for a, b in zip(r["modes"]["on"]["losses"], r["modes"]["off"]["losses"]))
    lines.append(f"gradient all-reduce bytes per step: {sorted(step_bytes)} (4 x Ψ = {4 * r0['num_parameters']:,}); "
                 f"on vs off: max |loss difference| {loss_diff:.1e}, max |weight difference| "
                 f"{max(r['weight_max_diff'] for r in results):.1e}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    results = ds_lab.launch(worker, args.world_size, args)
    print(report(args, results))
    if args.figure:
        import matplotlib
        matplotlib.use("Agg")
        from ds_lab.lab.overlap import draw_overlap
        draw_overlap(results).savefig(args.figure, dpi=120)
        print(f"figure: {args.figure}")
    if any(r["weight_max_diff"] != 0.0 for r in results) or any(
            r["modes"]["on"]["losses"] != r["modes"]["off"]["losses"] for r in results):
        sys.exit("overlap on and off trained to different losses or weights: the timing compares different computations")


if __name__ == "__main__":
    main()
