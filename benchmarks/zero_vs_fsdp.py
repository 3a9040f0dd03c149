"""ds_lab's ZeRO-3 against torch FSDP2 (`fully_shard`): same GPT, same data, same ranks, same init.

    python benchmarks/zero_vs_fsdp.py                        # 2 ranks (gloo), fp32, GPT 4x256 untied
    python benchmarks/zero_vs_fsdp.py --precision bf16       # ds_lab bf16 vs FSDP2 MixedPrecisionPolicy
    python benchmarks/zero_vs_fsdp.py --persistence-threshold 0   # ds_lab shards every parameter too

Both sides live in the same launched process on every rank and start from the same weights (one
GPT built from a seed, deep-copied for FSDP2). They train on the same batches (`DistributedLoader`
draw i on step i) with the same AdamW hyper-parameters and gradient clipping:

    ds_lab : engine(**batch) -> engine.backward(loss) -> engine.step()
             (zero_optimization.stage 3: one unit per module, prefetch within
              stage3_prefetch_bucket_size, units under stage3_param_persistence_threshold kept whole)
    FSDP2  : fsdp(**batch) -> loss.backward() -> clip_grad_norm_ -> AdamW.step() -> zero_grad
             (fully_shard on every transformer block, then on the root: the usual FSDP2 recipe;
              one all-gather and one reduce-scatter per block)

FSDP2's root is a thin wrapper that returns the loss tensor: FSDP2 finds the tensors to hook for
backward with torch's pytree, which does not look inside GPT's `GPTOutput` dataclass.

Precision. fp32: both compute, communicate and update in fp32. bf16: ds_lab's `bf16.enabled`
(bf16 parameters and gradients, reduce-scatter in bf16, fp32 master shard) against FSDP2's
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)` (fp32 sharded parameters, all-gathered
as bf16, gradients reduce-scattered in bf16 and kept as fp32 shards).

Memory (per rank, model states, counted from tensors that exist at the end of a step, before the
gradients are zeroed): ds_lab's `engine.memory_report()`; for FSDP2 the bytes of the storages
behind the parameters' local shards (`p.to_local()`, padding included), their gradients' local
shards, and the optimizer's state tensors. Whole (unsharded) parameters exist on both sides
only around the modules that run (ds_lab's units under the persistence threshold excepted: they
stay whole and are counted); activations are not in this table.

Timing is interleaved as in `dp_vs_ddp.py`: every iteration times one step of each side, the order
alternates, an untimed barrier precedes each step, warm-up iterations are not timed. Reported:
rank 0's medians, and per rank the ratio ds_lab / FSDP2 as the median of the per-iteration ratios.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ds_lab  # noqa: E402
from ds_lab import comm  # noqa: E402
from ds_lab.data import DistributedLoader, corpus_tokens  # noqa: E402
from ds_lab.models import GPT, GPTConfig  # noqa: E402
from interleave import PHASES, common_args, engine_step, median_ms, run_interleaved, training_config  # noqa: E402  (this folder is on sys.path)
from ds_lab.monitor.memory import storage_bytes  # noqa: E402

MIB = 2**20
MEMORY_ROWS = ("params", "grads", "master_params", "optimizer_states", "buffers")


def parse_args(argv=None):
    p = common_args(__doc__.splitlines()[0], n_embd=256, warmup=3, iters=30)
    p.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=False,
                   help="GPT's lm_head shares wte (untied by default: every module owns its weights)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--prefetch", type=int, default=50_000_000,
                   help="ds_lab zero_optimization.stage3_prefetch_bucket_size (elements)")
    p.add_argument("--persistence-threshold", type=int, default=100_000,
                   help="ds_lab zero_optimization.stage3_param_persistence_threshold (elements; "
                        "DeepSpeed's default; 0 shards every parameter, as FSDP2 does)")
    p.add_argument("--fsdp-foreach", action=argparse.BooleanOptionalAction, default=True,
                   help="torch AdamW foreach=True, the multi-tensor kernels ds_lab's Adam uses")
    return p.parse_args(argv)


def ds_config(args) -> dict:
    return {
        **training_config(args),
        "bf16": {"enabled": args.precision == "bf16"},
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": args.prefetch,
                              "stage3_param_persistence_threshold": args.persistence_threshold},
    }


class LossOnly(torch.nn.Module):
    """GPT that returns the loss tensor itself: FSDP2 and DeepSpeed's ZeRO-3 hook the tensors of a
    module's outputs for backward, and neither looks inside GPT's `GPTOutput` dataclass."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch).loss


def build_fsdp(model, args):
    mesh = init_device_mesh("cpu", (args.world_size,))
    mp_policy = MixedPrecisionPolicy()
    if args.precision == "bf16":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    return fully_shard(LossOnly(model), mesh=mesh, mp_policy=mp_policy)


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def fsdp_memory(fsdp, optimizer) -> dict:
    """Per-rank bytes of FSDP2's model states, from the local shards' storages (deduplicated)."""
    seen: set = set()
    params = list(fsdp.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return dict(params=storage_bytes([local(p) for p in params], seen),
                grads=storage_bytes([local(p.grad) for p in params if p.grad is not None], seen),
                master_params=0,
                optimizer_states=storage_bytes([local(t) for t in states], seen),
                buffers=storage_bytes([local(b) for b in fsdp.buffers()], seen))


def worker(args) -> dict:
    rank = comm.get_rank()
    model_cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size, tie_weights=args.tie_weights)
    torch.manual_seed(args.seed)
    model = GPT(model_cfg)
    twin = copy.deepcopy(model)  # same initial weights for FSDP2
    num_parameters = model.num_parameters()

    engine, _, _, _ = ds_lab.initialize(model=model, config=ds_config(args))
    engine.track_activations = args.activation_tracking  # saved-tensor hooks in Python on every forward
    fsdp = build_fsdp(twin, args)
    opt_cfg = engine.config.optimizer.params
    fsdp_opt = torch.optim.AdamW(fsdp.parameters(), lr=opt_cfg["lr"], betas=tuple(opt_cfg["betas"]),
                                 eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"],
                                 foreach=args.fsdp_foreach)
    loader = DistributedLoader(corpus_tokens(), args.block_size, args.micro_batch,
                               dp_rank=engine.dp_rank, dp_size=engine.dp_world_size, seed=args.seed)
    memory = {}

    ds_step = engine_step(engine)

    def fsdp_step(batch, t):
        loss = fsdp(**batch)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(fsdp.parameters(), args.clip)
        fsdp_opt.step()
        if "FSDP2" not in memory and fsdp_opt.state:
            memory["FSDP2"] = fsdp_memory(fsdp, fsdp_opt)  # before zero_grad frees the gradients
        fsdp_opt.zero_grad(set_to_none=True)
        return loss

    sides = {"ds_lab": ds_step, "FSDP2": fsdp_step}
    times, losses = run_interleaved(sides, loader.batch, args.warmup, args.iters)
    report = engine.memory_report()  # gradient shards are zeroed in place, never freed
    memory["ds_lab"] = {k: report[k] for k in MEMORY_ROWS}
    memory["ds_lab"]["activations_peak"] = report["activations_peak"]
    return dict(rank=rank, threads=torch.get_num_threads(), times=times, losses=losses,
                memory=memory, num_parameters=num_parameters, units=len(engine.zero.units),
                persistent_units=sum(u.persistent for u in engine.zero.units))


def report(args, results) -> str:
    r0 = results[0]
    t = r0["times"]
    psi = r0["num_parameters"]
    lines = [f"GPT n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} "
             f"block_size={args.block_size} tie_weights={args.tie_weights}: {psi:,} parameters "
             f"({4 * psi / MIB:.2f} MiB fp32); micro-batch {args.micro_batch} x {args.world_size} ranks "
             f"(gloo, {r0['threads']} torch thread(s) per rank, torch {torch.__version__}), {args.precision}",
             f"ds_lab ZeRO-3: {r0['units']} units ({r0['persistent_units']} kept whole: "
             f"stage3_param_persistence_threshold={args.persistence_threshold:,}), "
             f"stage3_prefetch_bucket_size={args.prefetch:,}, "
             f"activation tracking on every step={args.activation_tracking}; "
             f"FSDP2: fully_shard on {args.n_layer} blocks + root, AdamW foreach={args.fsdp_foreach}",
             f"{args.iters} timed iterations after {args.warmup} warm-up, order alternating", "",
             "rank 0, median ms per step:",
             "| side | step (total) | forward | backward | clip + AdamW + zero grads |",
             "|---|---:|---:|---:|---:|"]
    for name in ("ds_lab", "FSDP2"):
        lines.append(f"| {name} | {median_ms(t[name]['total']):.1f} | "
                     + " | ".join(f"{median_ms(t[name][ph]):.1f}" for ph in PHASES) + " |")
    lines.append("")
    for r in results:
        ds, fs = r["times"]["ds_lab"]["total"], r["times"]["FSDP2"]["total"]
        per_iter = statistics.median(a / b for a, b in zip(ds, fs))
        lines.append(f"rank {r['rank']}: ds_lab {median_ms(ds):.1f} ms, FSDP2 {median_ms(fs):.1f} ms; "
                     f"ratio ds_lab/FSDP2: median of per-iteration ratios {per_iter:.3f}, "
                     f"ratio of medians {statistics.median(ds) / statistics.median(fs):.3f}")
    lines += ["", "rank 0, model-state bytes per rank (MiB; end of a step, before gradients are zeroed):",
              "| side | params | grads | fp32 masters | optimizer states | buffers | total | "
              "(16 x Psi / N, for reference) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("ds_lab", "FSDP2"):
        m = r0["memory"][name]
        total = sum(m[k] for k in MEMORY_ROWS)
        lines.append(f"| {name} | " + " | ".join(f"{m[k] / MIB:.2f}" for k in MEMORY_ROWS)
                     + f" | {total / MIB:.2f} | {16 * psi / args.world_size / MIB:.2f} |")
    lines.append(f"(ds_lab activations_peak, measured on its first step: "
                 f"{r0['memory']['ds_lab']['activations_peak'] / MIB:.1f} MiB)")
    steps = args.warmup + args.iters
    diffs = [abs(a - b) for r in results for a, b in zip(r["losses"]["ds_lab"], r["losses"]["FSDP2"])]
    per_step = [max(abs(r["losses"]["ds_lab"][i] - r["losses"]["FSDP2"][i]) for r in results)
                for i in range(steps)]
    shown = ", ".join(f"{d:.1e}" for d in per_step[:5]) + (f", ... {per_step[-1]:.1e}" if steps > 5 else "")
    lines += ["", f"loss |ds_lab - FSDP2| per step (max over ranks): {shown}; max over {steps} steps "
                  f"{max(diffs):.1e} (rank 0 loss {r0['losses']['ds_lab'][0]:.4f} -> "
                  f"{r0['losses']['ds_lab'][-1]:.4f})"]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    results = ds_lab.launch(worker, args.world_size, args, timeout=600)
    print(report(args, results))


if __name__ == "__main__":
    main()
