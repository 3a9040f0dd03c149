"""Rank functions for tests/test_activation_checkpointing.py and tests/test_flops_profiler.py."""
from __future__ import annotations

import torch
import torch.nn as nn

import ds_lab
from ds_lab import parallel
from ds_lab.models import GPT, GPTConfig
from ds_lab.models.gpt_tp import GPTTP
from ds_lab.monitor.memory import ActivationTracker
from ds_lab.runtime import activation_checkpointing

SMALL = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
BATCH = 2


def _ids(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL["vocab_size"], (BATCH, SMALL["block_size"]), generator=g)


def engine_worker(runs, steps=2):
    """For each (n_layer, checkpointed, dropout): train `steps` steps through the engine; the ledger's
    activations_peak (measured on the first step, as the engine does) and the final weights."""
    out = {}
    for n_layer, checkpointed, dropout in runs:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**dict(SMALL, n_layer=n_layer, dropout=dropout)))
        if checkpointed:
            model.gradient_checkpointing_enable(ds_lab.checkpointing.checkpoint)
        engine, *_ = ds_lab.initialize(model=model, config={
            "train_batch_size": BATCH, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
        losses = []
        for step in range(steps):
            ids = _ids(step)
            loss = engine(ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[(n_layer, checkpointed, dropout)] = dict(
            activations_peak=engine.memory_report()["activations_peak"], losses=losses,
            weights=[p.detach().clone() for p in model.parameters()])
    return out


def config_section_worker():
    """The engine applies the config's activation_checkpointing section, with its grid as the mpu."""
    model = GPT(GPTConfig(**SMALL))
    engine, *_ = ds_lab.initialize(model=model, config={
        "train_batch_size": BATCH, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "activation_checkpointing": {"partition_activations": True, "number_checkpoints": 2}})
    s = activation_checkpointing.settings
    return dict(configured=ds_lab.checkpointing.is_configured(), partition=s.partition_activations,
                number=s.number_checkpoints, mpu_is_grid=s.mpu is engine.grid)


class Checkpointed(nn.Module):
    """A block run through deepspeed.checkpointing.checkpoint (parameter order unchanged)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return ds_lab.checkpointing.checkpoint(self.block, x)


def partition_worker():
    """A tensor-parallel GPT (T = 2) with dropout: plain, checkpointed, and checkpointed with
    partitioned activations. Gradients, saved bytes, and the all-gathers partitioning adds."""
    parallel.initialize_model_parallel(tensor_model_parallel_size=2)
    out = {}
    for mode in ("plain", "checkpointed", "partitioned"):
        ds_lab.checkpointing.configure(None, partition_activations=(mode == "partitioned"))
        parallel.model_parallel_manual_seed(0)
        model = GPTTP(GPTConfig(**dict(SMALL, dropout=0.1)))
        if mode != "plain":
            model.blocks = nn.ModuleList(Checkpointed(b) for b in model.blocks)
        ids = _ids()
        tracker = ActivationTracker(exclude=list(model.parameters()))
        with tracker.track():
            loss = model(ids, labels=ids).loss
        kept = tracker.live  # what the forward left for backward
        gathers = []

        def listener(record):
            if record.op == "all_gather":
                gathers.append(record.bytes)

        ds_lab.comm.add_listener(listener)
        loss.backward()
        ds_lab.comm.remove_listener(listener)
        out[mode] = dict(kept=kept, loss=loss.item(), gathers=gathers,
                         grads=[p.grad.clone() for p in model.parameters()])
    return out


def profiled_engine_worker(output_file, enabled=True, steps=3):
    """Train (with dropout) with "flops_profiler" at profile_step 1: what the engine printed, and the losses."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**dict(SMALL, dropout=0.1)))
    engine, *_ = ds_lab.initialize(model=model, config={
        "train_batch_size": BATCH, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "flops_profiler": {"enabled": enabled, "profile_step": 1, "module_depth": -1, "top_modules": 1,
                           "detailed": True, "output_file": output_file}})
    started_at, losses = [], []
    for step in range(steps):
        ids = _ids(step)
        loss = engine(ids, labels=ids).loss
        started_at.append(engine.flops_profiler is not None and engine.flops_profiler.started)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    import torch.nn.functional as F
    return dict(summary=engine.flops_profiler and engine.flops_profiler.last_summary, started_at=started_at,
                losses=losses, restored=not hasattr(F.linear, "__wrapped__"), params=model.num_parameters())
