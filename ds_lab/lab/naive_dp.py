"""Naive data parallelism, instrumented from outside: the chapter's loop stays plain PyTorch.

Chapter 2 shows a hand-written training step (forward, backward, one all-reduce per gradient, the
optimizer step) in about ten lines. Everything the chapter measures about it is gathered here,
around that step, without touching it:

    results = ds_lab.launch(naive_data_parallel, 2, naive_step, batches, MODEL)

    naive_step(model, optimizer, x, world_size) -> loss     the chapter's step, called once per batch

What is recorded, per step: the loss, the wall time, the collectives the step issued and their
bytes (from `ds_lab.comm`'s log, which records every collective by itself). For the dashboard
(nothing is published when none is watching): forward, backward and optimizer-step spans on the
timeline, taken from hooks of our own (the model's forward hook, the optimizer's step hooks) and
from the first collective's start; the loss; and the memory the rank holds at the end of the
optimizer step (weights, gradients, Adam's moments: `ds_lab.monitor.memory.ledger`).
"""
from __future__ import annotations

import time

import torch

from ds_lab import comm
from ds_lab.lab.workers import rows_of
from ds_lab.models import GPT, GPTConfig
from ds_lab.monitor import events
from ds_lab.monitor.memory import ledger, optimizer_state_tensors


class _StepProbe:
    """When forward ended and the optimizer step began and ended, and what the rank held then."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.forward_end = self.step_start = self.step_end = None
        self.held = None
        model.register_forward_hook(lambda *_: setattr(self, "forward_end", time.time()))
        optimizer.register_step_pre_hook(lambda *_: setattr(self, "step_start", time.time()))
        optimizer.register_step_post_hook(lambda *_: self._after_step())

    def _after_step(self):
        self.step_end = time.time()
        if events.enabled():  # the ledger costs a walk over the tensors: only for a watching dashboard
            model = self.model
            self.held = ledger({"params": model.parameters(), "grads": [p.grad for p in model.parameters()],
                                "optimizer_states": optimizer_state_tensors(self.optimizer)})


def naive_data_parallel(train_step, batches, model, lr=1e-3):
    """Runs on every rank: the same GPT and AdamW on every rank (same seed), then
    `train_step(gpt, optimizer, x, world_size)` on this rank's rows of each global batch."""
    rank, world_size = comm.get_rank(), comm.get_world_size()
    torch.manual_seed(0)  # the same seed on every rank: identical starting weights
    gpt = GPT(GPTConfig(**model))
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=lr, weight_decay=0.0)
    probe = _StepProbe(gpt, optimizer)
    out = dict(losses=[], step_seconds=[], collectives=[], bytes=[], tensors=len(list(gpt.parameters())))
    all_records = []
    for step, batch in enumerate(batches):
        events.set_step(step)  # stamps this step on the comm spans in the timeline
        mark = comm.record_count()
        start = time.time()
        loss = train_step(gpt, optimizer, rows_of(batch, rank, world_size), world_size)
        end = time.time()
        records = comm.get_log(since=mark)
        all_records += records
        backward_end = records[0].start if records else probe.step_start
        for name, t0, t1 in (("forward", start, probe.forward_end), ("backward", probe.forward_end, backward_end),
                             ("step", probe.step_start, probe.step_end)):
            events.span(name, "compute", t0, t1, step)
        events.publish("loss", dict(step=step, loss=loss.item()))
        if probe.held is not None:
            events.publish("memory", dict(step=step, phase="step", time=probe.step_end, bytes=probe.held))
        out["losses"].append(loss.item())
        out["step_seconds"].append(end - start)
        out["collectives"].append(len(records))
        out["bytes"].append(sum(r.bytes for r in records))
    out["summary"] = comm.summarize(all_records)
    return out
