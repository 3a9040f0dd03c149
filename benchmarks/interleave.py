"""What every benchmark here shares: time two training sides step by step, interleaved.

Each iteration runs one step of every side on the same batch, alternating which side goes first
(so neither always inherits the other's cache or scheduler state), after a barrier (so both start
from the same point on every rank). A side is `step(batch, t) -> loss`: it appends
`time.perf_counter()` to `t` after forward and after backward, and the loop adds the start and the
end, so each step is cut into the phases forward, backward and step.
"""
from __future__ import annotations

import statistics
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


def median_ms(xs) -> float:
    return 1e3 * statistics.median(xs)
