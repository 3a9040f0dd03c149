"""The pipeline bubble, measured: every rank records when it computes; the idle share is what is left.

    results = ds_lab.launch(bubble_worker, P, [1, 2, 4, 8], "1f1b")     # each rank: its spans per m, per batch
    measured_bubble([r[m_index][0] for r in results])                   # vs theoretical_bubble(P, m)

Over one batch, from the first forward to the last backward on any stage (window W), each of the
P stages is busy m (t_f + t_b) and idle for the rest:

    idle = 1 - sum_s busy_s / (P W)        theory: (P - 1) / (m + P - 1),  interleaved (P - 1) / (v m + P - 1)

`bubble_worker` runs a pipeline whose layers *wait* t_f in forward and t_b in backward (a sleep, not
arithmetic), so the measurement shows the schedule itself, not how many CPU cores the ranks share.
The timestamps are the engine's own (`engine.timeline`), the ones its events stream to a dashboard.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ds_lab import comm
from ds_lab.config import DeepSpeedConfig
from ds_lab.modes import mode_builder
from ds_lab.pipe.engine import PipelineEngine
from ds_lab.pipe.module import LayerSpec, PipelineModule


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, forward_s, backward_s):
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, grad.sum().reshape(1), None, None


class Wait(nn.Module):
    """A layer that takes forward_s to run forward and backward_s to run backward (one parameter, = 1)."""

    def __init__(self, forward_s: float, backward_s: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, x):
        return _Wait.apply(x, self.weight, self.forward_s, self.backward_s)


def _mean(output, labels):
    return output.mean()


def bubble_worker(micro_batch_counts, schedule="1f1b", virtual_stages=1, forward_s=0.01, backward_s=0.02,
                  repeats=1):
    """On every rank of a pipeline of world-size stages: for each m, one warm-up batch, then `repeats`
    measured batches; returns, per m, per batch, this rank's compute spans [(phase, micro_batch, chunk, t0, t1)].
    (On a busy machine take the least idle of the repeats: noise only ever adds idle time.)"""
    stages = comm.get_world_size()
    out = []
    for m in micro_batch_counts:
        layers = [LayerSpec(Wait, forward_s / virtual_stages, backward_s / virtual_stages)
                  for _ in range(stages * virtual_stages)]
        model = PipelineModule(layers, num_stages=stages, loss_fn=_mean, virtual_stages=virtual_stages)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": m, "gradient_clipping": 0.0,
                  "pipeline": {"schedule": schedule}}
        config = DeepSpeedConfig.from_any(config, world_size=1)  # what ds_lab.initialize does, for this grid
        engine = PipelineEngine(model, config, model.grid, mode_builder(config),
                                optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
        batches = []
        for _ in range(1 + repeats):
            engine.train_batch(iter([(torch.ones(1, 4), torch.zeros(1))] * m))
            batches.append([span for span in engine.timeline if span[0] in ("forward", "backward")])
        out.append(batches[1:])
    return out


def measured_bubble(timelines: list) -> float:
    """Idle share of the stages from their compute spans (one list per stage, same batch)."""
    begin = min(t0 for spans in timelines for *_, t0, _ in spans)
    end = max(t1 for spans in timelines for *_, t1 in spans)
    busy = sum(t1 - t0 for spans in timelines for *_, t0, t1 in spans)
    return 1.0 - busy / (len(timelines) * (end - begin))
