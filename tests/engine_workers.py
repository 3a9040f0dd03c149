"""Rank functions for the engine-seam tests: the grid, an mpu, no_sync, checkpoints across modes."""
from __future__ import annotations

import os

import torch

import ds_lab
from ds_lab import comm
from ds_lab.models import GPT, GPTConfig
from tests.workers import TINY, full_weights, rank_slice


class Mpu:
    """A Megatron-style mpu over `model` x `data` ranks (model fastest), as Megatron builds it."""

    def __init__(self, model: int):
        world, rank = comm.get_world_size(), comm.get_rank()
        data = world // model
        self.model_size, self.data_size = model, data
        self.model_rank, self.data_rank = rank % model, rank // model
        self.data_group = self.model_group = None
        for m in range(model):  # every rank creates every group, in the same order
            g = comm.new_group([d * model + m for d in range(data)])
            if m == self.model_rank:
                self.data_group = g
        for d in range(data):
            g = comm.new_group([d * model + m for m in range(model)])
            if d == self.data_rank:
                self.model_group = g

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_world_size(self):
        return self.data_size

    def get_data_parallel_rank(self):
        return self.data_rank

    def get_model_parallel_group(self):
        return self.model_group

    def get_model_parallel_world_size(self):
        return self.model_size

    def get_model_parallel_rank(self):
        return self.model_rank


def init(model, config, **kwargs):
    """ds_lab.initialize; an "SGD" optimizer section becomes a client optimizer callable
    (SGD with momentum: a gradient off by a constant factor shows, where Adam would hide it)."""
    section = config.get("optimizer") or {}
    if section.get("type") == "SGD":
        hyper = section["params"]
        config = {k: v for k, v in config.items() if k != "optimizer"}
        kwargs["optimizer"] = lambda params: torch.optim.SGD(params, **hyper)
    return ds_lab.initialize(model=model, config=config, **kwargs)


def mpu_train_worker(config, batches, model_parallel, ckpt_dir=None):
    """Train with an mpu whose model axis replicates the model: data ranks split the batch."""
    torch.manual_seed(0)
    mpu = Mpu(model_parallel)
    engine, *_ = init(GPT(GPTConfig(**TINY)), config, mpu=mpu)
    assert engine.dp_group is mpu.get_data_parallel_group() and engine.grid.mpu is mpu
    losses, norms = [], []
    for batch in batches:
        x = rank_slice(batch, mpu.data_rank, mpu.data_size, 0, 1)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().reshape(1)
        comm.all_reduce(mean, group=mpu.get_data_parallel_group())
        losses.append(mean.item() / mpu.data_size)
        norms.append(engine.get_global_grad_norm())
    if ckpt_dir is not None:
        engine.save_checkpoint(ckpt_dir, tag="t")
    return dict(losses=losses, norms=norms, weights=full_weights(engine), dp_rank=engine.dp_rank,
                files=sorted(os.listdir(os.path.join(ckpt_dir, "t"))) if ckpt_dir else None)


def no_sync_worker(config, batches):
    """k micro-batches: the first k-1 backward inside no_sync, the last outside; one step.
    Returns the weights and the gradient collectives per step (must be exactly one all-reduce)."""
    torch.manual_seed(0)
    engine, *_ = init(GPT(GPTConfig(**TINY)), config)
    rank, n = comm.get_rank(), comm.get_world_size()
    reduces, step_inside = [], None
    for batch in batches:
        micro = torch.chunk(batch, 3)
        comm.reset_log()
        for i, part in enumerate(micro):
            x = rank_slice(part, rank, n, 0, 1)
            if i < len(micro) - 1:
                with engine.no_sync():
                    engine.backward(engine(input_ids=x, labels=x).loss)
                    if step_inside is None:
                        try:
                            engine.step()
                            step_inside = "allowed"
                        except RuntimeError as err:
                            step_inside = str(err)
            else:
                engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        reduces.append(sum(1 for r in comm.get_log() if r.tag in ("grad_allreduce", "grad_reduce_scatter")))
    return dict(weights=full_weights(engine), reduces=reduces, step_inside=step_inside,
                global_steps=engine.global_steps)


def no_sync_refused_worker(config):
    engine, *_ = init(GPT(GPTConfig(**TINY)), config)
    try:
        with engine.no_sync():
            pass
    except RuntimeError as err:
        return str(err)
    return "accepted"


def boundary_override_worker(config, pattern):
    """set_gradient_accumulation_boundary before each micro-step; step() after each."""
    torch.manual_seed(0)
    engine, *_ = init(GPT(GPTConfig(**TINY)), config)
    x = torch.randint(0, 256, (engine.train_micro_batch_size_per_gpu(), TINY["block_size"]))
    applied = []
    for is_boundary in pattern:
        engine.set_gradient_accumulation_boundary(is_boundary)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        applied.append(engine.was_step_applied())
    return dict(applied=applied, global_steps=engine.global_steps)


def client_scheduler_worker(config):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mine = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    engine, _, _, returned = ds_lab.initialize(model=model, optimizer=optimizer, lr_scheduler=mine,
                                               config=config)
    x = torch.randint(0, 256, (engine.train_micro_batch_size_per_gpu(), TINY["block_size"]))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    return dict(returned_is_client=returned is mine, engine_has_client=engine.lr_scheduler is mine,
                lr=engine.get_lr()[0])


def save_worker(config, batches, ckpt_dir, model=None, seed=0, client_state=None):
    torch.manual_seed(seed)
    engine, *_ = init(GPT(GPTConfig(**(model or TINY))), config)
    from tests.workers import train_step
    losses = [train_step(engine, b) for b in batches]
    engine.save_checkpoint(ckpt_dir, client_state=client_state)
    return dict(losses=losses, weights=full_weights(engine), global_steps=engine.global_steps)


def load_worker(config, batches, ckpt_dir, model=None, seed=123, **load_kwargs):
    """Build a differently-initialised model, load, then train on `batches`."""
    from tests.workers import train_step
    torch.manual_seed(seed)
    engine, *_ = init(GPT(GPTConfig(**(model or TINY))), config)
    before = dict(global_steps=engine.global_steps)
    path, client = engine.load_checkpoint(ckpt_dir, **load_kwargs)
    loaded = full_weights(engine)
    masters = [m.detach().clone() for m in getattr(engine.mode, "master_of", {}).values()]
    counters = dict(global_steps=engine.global_steps, global_samples=engine.global_samples,
                    skipped_steps=engine.skipped_steps, loss_scale=engine.loss_scale)
    losses = [train_step(engine, b) for b in batches]
    return dict(loaded=loaded, masters=masters, counters=counters, before=before, losses=losses,
                weights=full_weights(engine), client=client)


def reinitialize_worker(first, second, batches):
    """initialize twice on one model (a re-run notebook cell); the second engine trains the model
    as a fresh model with the same weights would be trained."""
    from tests.workers import train_step
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    engine, *_ = init(model, first)
    train_step(engine, batches[0])
    weights = full_weights(engine)
    engine2, *_ = init(model, second)
    again = [train_step(engine2, b) for b in batches[1:]]
    fresh_model = GPT(GPTConfig(**TINY))
    fresh_model.load_state_dict(weights)
    fresh, *_ = init(fresh_model, second)
    expected = [train_step(fresh, b) for b in batches[1:]]
    return dict(again=again, expected=expected)


def peak_worker(config, batches, model=None):
    """Train; return the last step's peak ledger, the steady one, Ψ and the ZeRO layout."""
    from tests.workers import train_step
    torch.manual_seed(0)
    engine, *_ = init(GPT(GPTConfig(**(model or TINY))), config)
    engine.track_activations = True  # measure every step
    for b in batches:
        train_step(engine, b)
    units = [(u.numel, u.padded, u.chunk) for u in engine.zero_optimizer.units] if engine.zero_optimizer else []
    return dict(report=engine.memory_report(), psi=engine.num_parameters(), units=units)


class _SeesDtype(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, extra=None):
        self.seen = (x.dtype, None if extra is None else extra.dtype)
        return self.linear(x.to(self.linear.weight.dtype)).float().mean()


def auto_cast_worker(auto_cast):
    """fp16.auto_cast: the floating positional inputs reach forward as fp16; keywords do not."""
    model = _SeesDtype()
    cfg = {"train_batch_size": 1, "fp16": {"enabled": True, "auto_cast": auto_cast},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    engine, *_ = ds_lab.initialize(model=model, config=cfg)
    engine.backward(engine(torch.ones(2, 4), extra=torch.ones(2)))
    return [str(d) for d in model.seen]
