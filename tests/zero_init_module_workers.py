"""Rank functions for tests/test_zero_init_module.py (importable, so launched ranks find them)."""
from __future__ import annotations

import torch

import ds_lab
from ds_lab import comm
from ds_lab.zero import Init
from tests.zero_workers import ADAM, Net, full_weights, train


def _config(batches):
    return {"train_batch_size": batches[0][0].shape[0], "gradient_clipping": 1.0, "optimizer": ADAM,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _train(model, batches):
    engine, _, _, _ = ds_lab.initialize(model=model, config=_config(batches))
    return dict(losses=train(engine, batches), weights=full_weights(engine))


def init_module_worker(kind, batches):
    """The same model (each rank seeded differently: rank 0's values must win) built inside
    `with Init()` and built plainly then passed to `Init(module=...)`; both trained at stage 3."""
    rank = comm.get_rank()
    torch.manual_seed(rank)
    with Init():
        in_context = Net(kind)
    context_chunks = {n: (p.ds_init.shard.clone(), p.numel()) for n, p in in_context.named_parameters()}
    torch.manual_seed(rank)
    built = Net(kind)
    whole = {n: p.detach().clone() for n, p in built.named_parameters()}
    Init(module=built)
    Init(module=built)  # a second call finds every parameter partitioned already: nothing changes
    module_chunks = {n: (p.ds_init.shard.clone(), p.numel()) for n, p in built.named_parameters()}
    torch.manual_seed(rank)
    untouched = Net(kind)
    Init(module=untouched, enabled=False)
    return dict(context_chunks=context_chunks, module_chunks=module_chunks, whole=whole,
                untouched_numel=[p.numel() for p in untouched.parameters()],
                context=_train(in_context, batches), module=_train(built, batches))
