"""ds_lab's data-parallel engine against torch DistributedDataParallel: same model, data, ranks.

    python benchmarks/dp_vs_ddp.py                      # 2 ranks (gloo), GPT 4x128, 25 MiB buckets
    python benchmarks/dp_vs_ddp.py --no-overlap         # ds_lab reduces after backward (1 bucket: same)
    python benchmarks/dp_vs_ddp.py --bucket-mb 0.25     # 13 buckets: where overlap matters
    python benchmarks/dp_vs_ddp.py --bucket-mb 0.25 --no-overlap
    python benchmarks/dp_vs_ddp.py --activation-tracking      # the engine measuring activations every step

About 40 s on 2 idle CPU cores (one torch thread per rank); longer when the cores are shared.

Both sides live in the same launched process on every rank and start from the same weights (one
GPT built from a seed, deep-copied for DDP). They train on the same batches (`DistributedLoader`
draw i on step i), in fp32, with the same AdamW hyper-parameters and gradient clipping:

    ds_lab : engine(**batch) -> engine.backward(loss) -> engine.step()
             (config AdamW; clipping by `gradient_clipping`; buckets of `reduce_bucket_size`)
    DDP    : ddp(**batch) -> loss.backward() -> clip_grad_norm_ -> AdamW.step() -> zero_grad
             (torch.optim.AdamW, foreach=True like ds_lab's; buckets of `bucket_cap_mb`)

Buckets are matched: DDP's default 25 MiB, passed explicitly as `bucket_cap_mb` (so DDP's first
bucket is 25 MiB too, not its default 1 MiB), and ds_lab's `zero_optimization.reduce_bucket_size`
is the same bytes in fp32 elements: 25 x 2**20 / 4 = 6_553_600. The default GPT has 0.84 M
parameters (3.2 MiB), so each side reduces its gradients in a single bucket, which is complete
only when backward ends: overlap has nothing to hide there. `--bucket-mb 0.25` gives 13 buckets.

Timing is interleaved: every iteration times one ds_lab step and one DDP step, and the order
alternates (ds_lab first on even iterations, DDP first on odd ones) so that cache or scheduler
effects of going first or second cancel. A barrier (not timed) precedes each timed step, so both
ranks start it together. Warm-up iterations are not timed. The table reports rank 0's medians
and the ratio ds_lab / DDP two ways: the median of the per-iteration ratios, and the ratio of the
medians. On a shared machine trust the first: both steps of one iteration see the same load,
while the medians of the two sides can come from different stretches of it.

Bytes: ds_lab's are read from its comm totals (`ds_lab.comm.summarize(tags=...)`, tag "grad_allreduce"); DDP
talks to torch.distributed directly, so its row shows the gradient bytes it must all-reduce
(4 B x parameters), the same tensor as ds_lab's flat buffer.

Correctness rides along: the losses of both sides must agree on every step and rank (relative
difference <= 1e-5), and the final parameters are compared too.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ds_lab  # noqa: E402
from ds_lab import comm  # noqa: E402
from ds_lab.data import DistributedLoader, corpus_tokens  # noqa: E402
from ds_lab.models import GPT, GPTConfig  # noqa: E402
from interleave import PHASES, agreement_line, common_args, engine_step, exit_if_losses_differ, median_ms, ratio_lines, run_interleaved, training_config  # noqa: E402  (this folder is on sys.path)

MIB = 2**20
LOSS_RTOL = 1e-5


def parse_args(argv=None):
    p = common_args(__doc__.splitlines()[0], n_embd=128, warmup=5, iters=100)
    p.add_argument("--bucket-mb", type=float, default=25.0,
                   help="DDP bucket_cap_mb; ds_lab reduce_bucket_size = this many MiB of fp32 elements")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="ds_lab zero_optimization.overlap_comm (DDP always overlaps)")
    p.add_argument("--ddp-foreach", action=argparse.BooleanOptionalAction, default=True,
                   help="torch AdamW foreach=True, the multi-tensor kernels ds_lab's AdamW uses "
                        "(on CPU torch's default is the per-parameter loop)")
    return p.parse_args(argv)


def ds_config(args) -> dict:
    return {
        **training_config(args),
        "zero_optimization": {"stage": 0, "reduce_bucket_size": int(args.bucket_mb * MIB) // 4,
                              "overlap_comm": args.overlap},
    }


def worker(args) -> dict:
    rank = comm.get_rank()
    model_cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size)
    torch.manual_seed(args.seed)
    model = GPT(model_cfg)
    twin = copy.deepcopy(model)  # same initial weights for DDP

    engine, _, _, _ = ds_lab.initialize(model=model, config=ds_config(args))
    engine.track_activations = args.activation_tracking  # saved-tensor hooks in Python on every forward
    ddp = DistributedDataParallel(twin, bucket_cap_mb=args.bucket_mb)
    opt_cfg = engine.config.optimizer.params
    ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=opt_cfg["lr"], betas=tuple(opt_cfg["betas"]),
                                eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"],
                                foreach=args.ddp_foreach)
    loader = DistributedLoader(corpus_tokens(), args.block_size, args.micro_batch,
                               dp_rank=engine.dp_rank, dp_size=engine.dp_world_size, seed=args.seed)

    ds_step = engine_step(engine)

    def ddp_step(batch, t):
        out = ddp(**batch)
        t.append(time.perf_counter())
        out.loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), args.clip)
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=True)  # last, as engine.step() zeroes its buffer last
        return out.loss

    sides = {"ds_lab": ds_step, "DDP": ddp_step}
    # count only the timed steps' collectives
    times, losses = run_interleaved(sides, loader.batch, args.warmup, args.iters, on_warm=comm.reset_log)
    comm_rows = comm.summarize(tags=("grad_allreduce",))  # running totals: every timed step, however many
    with torch.no_grad():
        ours = torch.cat([p.flatten() for p in engine.module.parameters()])
        theirs = torch.cat([p.flatten() for p in ddp.module.parameters()])
        param_rel_diff = ((ours - theirs).norm() / theirs.norm()).item()
    return dict(rank=rank, threads=torch.get_num_threads(), times=times, losses=losses,
                param_rel_diff=param_rel_diff, num_parameters=engine.num_parameters(),
                buckets=len(engine.reducer.buckets),
                comm_bytes=sum(r["bytes"] * r["count"] for r in comm_rows) / args.iters,
                comm_wire_bytes=sum(r["wire_bytes"] for r in comm_rows) / args.iters,
                comm_calls=sum(r["count"] for r in comm_rows) / args.iters)


def report(args, results) -> str:
    r0 = results[0]
    t = r0["times"]
    lines = [f"GPT n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} "
             f"block_size={args.block_size}: {r0['num_parameters']:,} parameters "
             f"({4 * r0['num_parameters'] / MIB:.2f} MiB fp32); micro-batch {args.micro_batch} x "
             f"{args.world_size} ranks (gloo, {r0['threads']} torch thread(s) per rank, "
             f"torch {torch.__version__})",
             f"buckets: DDP bucket_cap_mb={args.bucket_mb:g}, ds_lab reduce_bucket_size="
             f"{int(args.bucket_mb * MIB) // 4:,} elements ({r0['buckets']} bucket(s)); "
             f"ds_lab overlap_comm={args.overlap}, activation tracking={args.activation_tracking}; "
             f"DDP AdamW foreach={args.ddp_foreach}",
             f"{args.iters} timed iterations after {args.warmup} warm-up, order alternating", "",
             "rank 0, median ms per step:",
             "| side | step (total) | forward | backward (+ all-reduce wait) | clip + AdamW + zero grads | "
             "gradient all-reduce per step |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("ds_lab", "DDP"):
        nbytes = (f"{r0['comm_bytes'] / MIB:.2f} MiB in {r0['comm_calls']:g} all-reduce(s), "
                  f"{r0['comm_wire_bytes'] / MIB:.2f} MiB sent (ds_lab.comm log)" if name == "ds_lab"
                  else f"{4 * r0['num_parameters'] / MIB:.2f} MiB (4 B x params; DDP bypasses ds_lab.comm)")
        lines.append(f"| {name} | {median_ms(t[name]['total']):.2f} | "
                     + " | ".join(f"{median_ms(t[name][ph]):.2f}" for ph in PHASES) + f" | {nbytes} |")
    lines.append("")
    lines += ratio_lines(results, "DDP")
    # Equal up to rounding, not bitwise, while clipping acts: the clip coefficient is a Python
    # float in ds_lab and a float32 tensor in clip_grad_norm_ (with --clip 1e9 the two sides are
    # bitwise equal), and Adam's 1/sqrt(v) magnifies last-bit differences in the parameters.
    lines.append(agreement_line(args, results, "DDP", LOSS_RTOL, "parameters"))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    results = ds_lab.launch(worker, args.world_size, args)
    print(report(args, results))
    exit_if_losses_differ(results, "DDP", LOSS_RTOL)


if __name__ == "__main__":
    main()
