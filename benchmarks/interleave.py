"""What every benchmark here shares: time two training sides step by step, interleaved.

Each iteration runs one step of every side on the same batch, alternating which side goes first
(so neither always inherits the other's cache or scheduler state), after a barrier (so both start
from the same point on every rank). A side is `step(batch, t) -> loss`: it appends
`time.perf_counter()` to `t` after forward and after backward, and the loop adds the start and the
end, so each step is cut into the phases forward, backward and step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch.distributed as dist

PHASES = ("forward", "backward", "step")


def run_interleaved(sides: dict, batch_of, warmup: int, iters: int, on_warm=None):
    """-> (times[side][phase or "total"] in seconds for the timed iterations, losses[side] for all)."""
    names = list(sides)
    times = {name: {ph: [] for ph in ("total",) + PHASES} for name in names}
    losses = {name: [] for name in names}
    for i in range(warmup + iters):
        if i == warmup and on_warm is not None:
            on_warm()
        batch = batch_of(i)
        for name in (names if i % 2 == 0 else names[::-1]):
            dist.barrier()  # straight to torch: the barrier is the benchmark's, not either side's traffic
            t = [time.perf_counter()]
            loss = sides[name](batch, t)
            t.append(time.perf_counter())
            losses[name].append(loss.item())
            if i >= warmup:
                times[name]["total"].append(t[3] - t[0])
                for ph, a, b in zip(PHASES, t, t[1:]):
                    times[name][ph].append(b - a)
    return times, losses


def engine_step(engine):
    """ds_lab's side of a comparison: `step(batch, t)` timing forward | backward (+ wait) | step."""
    def step(batch, t):
        out = engine(**batch)
        t.append(time.perf_counter())
        engine.backward(out.loss)
        t.append(time.perf_counter())
        engine.step()
        return out.loss
    return step


def median_ms(xs) -> float:
    return 1e3 * statistics.median(xs)


def common_args(description: str, *, n_embd: int, warmup: int, iters: int) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: world size, the GPT's shape, the batch, the timing, and
    the training hyper-parameters both sides share. Each script adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=n_embd)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed iterations")
    p.add_argument("--iters", type=int, default=iters, help="timed iterations (one step of each side)")
    p.add_argument("--activation-tracking", action=argparse.BooleanOptionalAction, default=False,
                   help="measure activations on every forward (engine.track_activations = True); by "
                        "default the engine measures them on its first step only")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping (max global norm), both sides")
    p.add_argument("--seed", type=int, default=0)
    return p


def training_config(args, optimizer_type: str = "AdamW") -> dict:
    """The part of the DeepSpeed config both sides share: batch, AdamW, clipping."""
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": optimizer_type, "params": {"lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                          "weight_decay": args.weight_decay}},
        "gradient_clipping": args.clip,
    }


# ---- what every comparison prints and checks: ds_lab against one baseline ------------------------
def loss_rel_diff(results, baseline: str) -> float:
    """Largest |loss_ds_lab - loss_baseline| / |loss_baseline| over every step and rank."""
    return max(abs(a - b) / abs(b) for r in results
               for a, b in zip(r["losses"]["ds_lab"], r["losses"][baseline]))


def ratio_lines(results, baseline: str) -> list:
    """Per rank: both medians and the ratio ds_lab/baseline two ways. Trust the median of the
    per-iteration ratios on a shared machine (both steps of one iteration see the same load)."""
    lines = []
    for r in results:
        ds, base = r["times"]["ds_lab"]["total"], r["times"][baseline]["total"]
        per_iter = statistics.median(a / b for a, b in zip(ds, base))
        lines.append(f"rank {r['rank']}: ds_lab {median_ms(ds):.2f} ms, {baseline} {median_ms(base):.2f} ms; "
                     f"ratio ds_lab/{baseline}: median of per-iteration ratios {per_iter:.3f}, "
                     f"ratio of medians {statistics.median(ds) / statistics.median(base):.3f}")
    return lines


def agreement_line(args, results, baseline: str, rtol: float, params: str = "parameters") -> str:
    """Correctness rides along: the losses agree, and how far the final parameters are apart."""
    loss_diff = loss_rel_diff(results, baseline)
    param_diff = max(r["param_rel_diff"] for r in results)
    r0 = results[0]
    return (f"losses agree: {loss_diff <= rtol} (max relative loss difference over "
            f"{args.warmup + args.iters} steps and all ranks {loss_diff:.1e}; {params} at the end "
            f"|p_ds_lab - p_{baseline}| / |p_{baseline}| = {param_diff:.1e}; rank 0 loss "
            f"{r0['losses']['ds_lab'][0]:.4f} -> {r0['losses']['ds_lab'][-1]:.4f})")


def exit_if_losses_differ(results, baseline: str, rtol: float) -> None:
    worst = loss_rel_diff(results, baseline)
    if worst > rtol:
        sys.exit(f"ds_lab and {baseline} losses differ by up to {worst:.1e} (relative): the timing compares "
                 "different computations")
