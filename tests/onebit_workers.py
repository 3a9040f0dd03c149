"""Rank functions for the communication-compression tests: the compressed all-reduce, 1-bit Adam,
signSGD and SignAdam on launched ranks, recording what the single-process simulations need."""
from __future__ import annotations

import torch

import ds_lab
from ds_lab import comm
from ds_lab.comm.compressed import compressed_allreduce, padded_length, sign_majority_vote
from ds_lab.models import GPT, GPTConfig
from tests.workers import TINY, full_weights, train_step

STEP_TAGS = ("grad_allreduce", "compressed_allreduce", "sign_vote")


def rank_tensor(size: int, rank: int, round_: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * round_ + 17 * rank + size)
    return torch.randn(size, generator=g)


def compressed_worker(sizes, rounds, vote=False):
    """`rounds` compressed all-reduces (or majority votes) of every size, errors kept per size."""
    rank, world = comm.get_rank(), comm.get_world_size()
    errors = {n: (torch.zeros(padded_length(n, world)), torch.zeros(padded_length(n, world) // world))
              for n in sizes}
    out, logs = [], []
    for r in range(rounds):
        row = {}
        for n in sizes:
            x = rank_tensor(n, rank, r)
            mark = comm.record_count()
            if vote:
                row[n] = sign_majority_vote(x)
            else:
                row[n] = compressed_allreduce(x, *errors[n])
            logs.append([(rec.op, rec.bytes, rec.group_size, rec.tag) for rec in comm.get_log(since=mark)])
        out.append(row)
    return dict(results=out, logs=logs)


def train_worker(config, batches, seed=0, record_grads=True, reset_errors_after=None, ckpt=None,
                 client_optimizer=None):
    """Train TINY on `batches`; record each step's gradients as the optimizer sees them (local after
    the switch, averaged before), the step's traffic, and the weights before and after.
    reset_errors_after: drop the 1-bit errors after that many steps (DeepSpeed's checkpoint-load rule).
    ckpt: ("save", dir, after_steps) saves there; ("load", dir) loads before training."""
    torch.manual_seed(seed)
    kwargs = {} if client_optimizer is None else dict(optimizer=client_optimizer)
    engine, *_ = ds_lab.initialize(model=GPT(GPTConfig(**TINY)), config=config, **kwargs)
    if ckpt is not None and ckpt[0] == "load":
        engine.load_checkpoint(ckpt[1])
    start = full_weights(engine)
    params = [p for p in engine.module.parameters()]
    grads, losses, traffic, compressing = [], [], [], []

    def grab(micro):
        if record_grads:
            grads.append([p.grad.detach().float().clone() for p in params])

    for step, batch in enumerate(batches):
        if ckpt is not None and ckpt[0] == "save" and step == ckpt[2]:
            engine.save_checkpoint(ckpt[1])
        if reset_errors_after is not None and step == reset_errors_after:
            for state in engine.optimizer.state.values():
                state.pop("worker_error", None), state.pop("server_error", None)
        compressing.append(bool(getattr(engine.optimizer, "compressing", lambda: False)()))
        mark = comm.record_count()
        losses.append(train_step(engine, batch, grab))
        traffic.append([(r.op, r.bytes, r.group_size, r.tag, r.wire_bytes)
                        for r in comm.get_log(since=mark) if r.tag in STEP_TAGS])
    return dict(start=start, grads=grads, losses=losses, weights=full_weights(engine), traffic=traffic,
                compressing=compressing, names=[n for n, _ in engine.module.named_parameters()],
                memory=engine.memory_report())


def probe_data(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)


def deepspeed_probe_worker(steps: int):
    """The program of tests/test_onebit.py's DeepSpeed probe, through ds_lab (its step t = DeepSpeed's t+1)."""
    rank = comm.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
              "optimizer": {"type": "OneBitAdam", "params": {"lr": 0.01, "freeze_step": 3, "weight_decay": 0.01,
                                                            "comm_backend_name": "compressed"}}}
    engine, *_ = ds_lab.initialize(model=model, config=config)
    out = [dict(loss=None, weights=[p.detach().reshape(-1).tolist() for p in model.parameters()])]
    for step in range(1, steps + 1):
        x, y = probe_data(step, rank)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        out.append(dict(loss=loss.item(), weights=[p.detach().reshape(-1).tolist() for p in model.parameters()],
                        compressing=engine.optimizer.compressing(step)))
    return out
