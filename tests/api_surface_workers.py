"""Rank functions for tests/test_api_surface.py and tests/test_optim_sched.py: a small MLP trained
through ds_lab.initialize with a client optimizer (FusedAdam, DeepSpeedCPUAdam) or a config's."""
from __future__ import annotations

import torch

import ds_lab
from ds_lab import comm

GLOBAL_BATCH = 8


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batches(steps: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=generator), torch.randn(GLOBAL_BATCH, 3, generator=generator))
            for _ in range(steps)]


def train_worker(config: dict, client: str = None, steps: int = 5, client_kwargs: dict = None):
    """Train `steps` optimizer steps on the same global batches whatever the world size; return the
    losses (global mean), the final weights, and the lrs/betas the optimizer saw."""
    from ds_lab.ops.adam import DeepSpeedCPUAdam, FusedAdam

    model = mlp()
    optimizer = None
    if client is not None:
        optimizer = {"FusedAdam": FusedAdam, "DeepSpeedCPUAdam": DeepSpeedCPUAdam}[client](
            model.parameters(), **(client_kwargs or {}))
    # positional, in DeepSpeed 0.19.8's order: args, model, optimizer, model_parameters, training_data,
    # lr_scheduler, distributed_port, mpu, dist_init_required, collate_fn, config
    engine, engine_optimizer, _, scheduler = ds_lab.initialize(None, model, optimizer, None, None, None, 29500, None,
                                                               None, None, config)
    rank, world = comm.get_rank(), comm.get_world_size()
    losses, lrs, betas = [], [], []
    for x, y in batches(steps):
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        loss = torch.nn.functional.mse_loss(engine(x[rows]), y[rows])
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        comm.all_reduce(total)
        losses.append(total.item() / world)
        lrs.append([g["lr"] for g in engine_optimizer.param_groups])
        betas.append([tuple(g["betas"]) for g in engine_optimizer.param_groups if "betas" in g])
    weights = torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()])
    return {"losses": losses, "weights": weights, "lrs": lrs, "betas": betas,
            "optimizer": type(engine_optimizer).__name__, "scheduler": type(scheduler).__name__}


def error_worker(config: dict):
    """initialize() with `config`; return the ConfigError's message (None if it succeeded)."""
    try:
        ds_lab.initialize(model=mlp(), config=config)
    except ds_lab.ConfigError as err:
        return str(err)
    return None
