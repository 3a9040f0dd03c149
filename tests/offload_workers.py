"""Ranks of tests/test_offload.py: train the TINY GPT with ZeRO, offloaded or not, and report."""
from __future__ import annotations

import torch

import ds_lab
from ds_lab.models import GPT, GPTConfig
from tests.workers import TINY, train_step

SGD = dict(lr=0.05, momentum=0.9)


def client_optimizer(kind, params):
    """None: the config's optimizer (ds_lab's Adam); "sgd": a client torch.optim.SGD with momentum."""
    return torch.optim.SGD(params, **SGD) if kind == "sgd" else None


def offload_train_worker(config, batches, optimizer=None, seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**TINY))
    engine, _, _, _ = ds_lab.initialize(model=gpt, optimizer=client_optimizer(optimizer, gpt.parameters()),
                                        config=config)
    losses = [train_step(engine, batch) for batch in batches]
    zero = engine.zero_optimizer
    return dict(losses=losses, weights=full_weights(engine), memory=engine.memory_report(),
                shard_elements=sum(m.numel() for m in zero.masters), offload=zero.offload,
                optimizer_type=type(engine.optimizer).__name__,
                state_on_masters=all(s["momentum_buffer" if optimizer == "sgd" else "exp_avg"].device
                                     == m.device for m, s in ((m, engine.optimizer.state[m]) for m in zero.masters)))


def full_weights(engine):
    """The whole fp32 weights: the module's own under stages 1-2, the gathered shards under ZeRO-3."""
    if engine.mode.stage == 3:
        return {k: v.clone() for k, v in engine.mode.full_state_dict().items()}
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def reference_train(batches, optimizer=None, clip=1.0, seed=0):
    """One process, plain PyTorch, the whole global batch at once."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**TINY))
    opt = torch.optim.SGD(gpt.parameters(), **SGD) if optimizer == "sgd" else \
        torch.optim.AdamW(gpt.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for batch in batches:
        loss = gpt(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return dict(losses=losses, weights={k: v.detach().clone() for k, v in gpt.state_dict().items()})


def several_worker(configs, batches, optimizer=None):
    """Train one fresh model per config, one after another on the same ranks (one launch for all)."""
    return [offload_train_worker(config, batches, optimizer) for config in configs]
