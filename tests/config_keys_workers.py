"""Workers for tests/test_config_keys.py: a small MLP trained through ds_lab.initialize, with the
gradients, the comm log and the weights handed back so the test can recompute them in one process."""
from __future__ import annotations

import warnings

import torch

import ds_lab
from ds_lab import comm
from tests.workers import COMM_TAGS, full_weights

SIZES = (7, 13, 5)  # 7*13 + 13 + 13*5 + 5 = 174 parameters: divisible by 2 and 3
SGD = dict(lr=0.05, momentum=0.9)
ADAM = dict(lr=0.01)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.Tanh(),
                               torch.nn.Linear(SIZES[1], SIZES[2]))


def data(steps, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, SIZES[0], generator=g), torch.randn(batch, SIZES[2], generator=g))
            for _ in range(steps)]


def loss_of(out, y):
    return torch.nn.functional.mse_loss(out, y)


def rank_rows(t, rank, world):
    rows = t.shape[0] // world
    return t[rank * rows:(rank + 1) * rows]


def optimizer_for(kind):
    """'sgd': client SGD with momentum (a gradient off by a constant shows); 'adam': the config's Adam."""
    if kind == "sgd":
        return (lambda params: torch.optim.SGD(params, **SGD)), None
    return None, {"type": "Adam", "params": ADAM}


def train(config, batches, kind):
    """Train a fresh MLP; per step: the gradients after backward (stage 0: the averaged ones), the
    global loss, the comm records of the gradient reduction; then the final weights."""
    client, section = optimizer_for(kind)
    config = {**config, **({"optimizer": section} if section else {})}
    with warnings.catch_warnings(record=True) as caught:  # e.g. the untested-optimizer warning, SGD with ZeRO
        warnings.simplefilter("always")
        engine, *_ = ds_lab.initialize(model=mlp(), config=config, optimizer=client)
    rank, world = comm.get_rank(), comm.get_world_size()
    losses, grads, records = [], [], []
    for x, y in batches:
        comm.reset_log()
        loss = loss_of(engine(rank_rows(x, rank, world)), rank_rows(y, rank, world))
        engine.backward(loss)
        grads.append({n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
                      if p.grad is not None})
        engine.step()
        records.append([(r.op, r.tag, r.bytes) for r in comm.get_log() if r.tag in COMM_TAGS])
        total = loss.detach().clone()
        comm.all_reduce(total)
        losses.append(total.item() / world)
    weights = full_weights(engine)
    return dict(losses=losses, grads=grads, records=records, weights=weights,
                warnings=[str(x.message) for x in caught])


def cases_worker(cases):
    """[(config, batches, optimizer kind)] -> one result each, one launch for all of them."""
    return [train(config, batches, kind) for config, batches, kind in cases]
