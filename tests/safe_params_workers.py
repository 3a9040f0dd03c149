"""Rank functions for tests/test_safe_params.py (importable, so launched ranks find them).

One launch trains a fresh `Net` (tests/zero_workers.py: odd sizes, uneven shards) at every case
(stage, precision) and reads and writes its fp32 state only through `ds_lab.utils.safe_*`.
"""
from __future__ import annotations

import torch

import ds_lab
from ds_lab import comm
from ds_lab.utils import (safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state,
                          safe_set_full_fp32_param, safe_set_full_optimizer_state)
from ds_lab.zero import GatheredParameters
from tests.workers import rank_slice
from tests.zero_workers import ADAM, Net, full_weights

EDITED = ("segments.1.fc1.weight", "head.bias")  # 351 elements (split unevenly), and a small one
KEYS = ("exp_avg", "exp_avg_sq")


def edit_values(name, shape):
    """The values the test sets: deterministic, different for each tensor and key."""
    numel = torch.Size(shape).numel()
    base = torch.arange(numel, dtype=torch.float32).view(shape) / numel
    return dict(param=base - 0.25 - 0.01 * len(name), exp_avg=0.01 * (base - 0.5), exp_avg_sq=1e-4 * (base + 0.5))


def _backward(engine, batch):
    rank, world = comm.get_rank(), comm.get_world_size()
    x, y = batch
    engine.backward(engine(rank_slice(x, rank, world, 0, 1), rank_slice(y, rank, world, 0, 1)))


def case(stage, precision, batches):
    torch.manual_seed(0)
    model = Net("plain")
    config = {"train_batch_size": batches[0][0].shape[0], "gradient_clipping": 0.0, "optimizer": ADAM,
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 200,
                                    "stage3_param_persistence_threshold": 0}}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    engine, _, _, _ = ds_lab.initialize(model=model, config=config)
    params = dict(engine.module.named_parameters())
    out = dict(before={n: safe_get_full_fp32_param(p) for n, p in params.items()})
    try:
        safe_get_full_optimizer_state(params[EDITED[0]], "exp_avg")
        out["state_before_step"] = "no error"
    except ValueError as err:
        out["state_before_step"] = str(err)
    _backward(engine, batches[0])
    out["grads"] = {n: safe_get_full_grad(p) for n, p in params.items()}
    engine.step()
    out["after_step"] = {n: safe_get_full_fp32_param(p) for n, p in params.items()}
    out["weights_after_step"] = full_weights(engine)
    out["states"] = {key: {n: safe_get_full_optimizer_state(p, key) for n, p in params.items()} for key in KEYS}
    for name in EDITED:  # set the whole value, the same on every rank (the setters are local)
        values = edit_values(name, out["before"][name].shape)
        safe_set_full_fp32_param(params[name], values["param"])
        for key in KEYS:
            safe_set_full_optimizer_state(params[name], values[key], key)
    out["read_back"] = {n: dict(param=safe_get_full_fp32_param(params[n]),
                                **{k: safe_get_full_optimizer_state(params[n], k) for k in KEYS}) for n in EDITED}
    out["model_after_set"] = {}
    for name in EDITED:  # what the next forward computes with (stage 3: the chunks, gathered)
        with GatheredParameters(params[name]):
            out["model_after_set"][name] = params[name].detach().float().clone()
    _backward(engine, batches[1])
    out["grads_2"] = {n: safe_get_full_grad(params[n]) for n in EDITED}
    engine.step()
    out["after_step_2"] = {n: safe_get_full_fp32_param(params[n]) for n in EDITED}
    out["unmanaged"] = safe_get_full_fp32_param(torch.nn.Parameter(torch.zeros(3)))
    return out


def safe_params_worker(cases, batches):
    return {(stage, precision): case(stage, precision, batches) for stage, precision in cases}


def unannounced_edit_worker(editor: int, persistence_threshold: int = 100_000):
    """Rank `editor` changes a ZeRO-3 weight inside GatheredParameters without modifier_rank: every rank
    gets DeepSpeed's RuntimeError, and the weight is what it was before (the edit is dropped everywhere)."""
    import ds_lab
    torch.manual_seed(0)
    config = {"train_batch_size": 2 * comm.get_world_size(), "optimizer": ADAM,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence_threshold}}
    engine, _, _, _ = ds_lab.initialize(model=Net(), config=config)
    weight = engine.module.head.bias  # small: kept whole on every rank unless the threshold is 0
    before = safe_get_full_fp32_param(weight)
    error = None
    try:
        with GatheredParameters(weight):
            whole = weight.detach().clone()
            if comm.get_rank() == editor:
                with torch.no_grad():
                    weight.add_(1.0)
    except RuntimeError as err:
        error = str(err)
    with GatheredParameters(weight):  # read-only and untouched: no error
        after = weight.detach().clone()
    return dict(error=error, whole=whole, after=after, before=before, master=safe_get_full_fp32_param(weight))
