"""Rank functions for tests/test_lab_ch01_02.py (importable, so launched ranks find them)."""
from __future__ import annotations

import torch

import ds_lab
from ds_lab import comm
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.lab.background import step_allocations
from ds_lab.models import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)


def allocations_worker(precision):
    """Ψ, and what one engine step allocated per op beyond the ledger."""
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "bf16": {"enabled": precision == "bf16"}}
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**TINY)), config=config)
    batch = DistributedLoader(corpus_tokens(), TINY["block_size"], 2, seed=0).batch(0)
    return engine.num_parameters(), step_allocations(engine, batch)


def plain_step(model, optimizer, x, world_size):
    """The naive step of chapter 2: backward, one all-reduce per tensor, mean, AdamW."""
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    for p in model.parameters():
        comm.all_reduce(p.grad)
        p.grad /= world_size
    optimizer.step()
    optimizer.zero_grad()
    return loss
