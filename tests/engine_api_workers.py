"""Rank functions for tests/test_engine_api.py: DeepSpeed's engine accessors, backward's return value,
step(lr_kwargs), the checkpoint calls' new arguments and save_16bit_model."""
from __future__ import annotations

import os

import torch

import ds_lab
from ds_lab import comm
from ds_lab.models import GPT, GPTConfig
from tests.workers import TINY, full_weights, rank_slice


def gpt(seed=0, frozen=()):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY))
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return model


def train(engine, batches):
    """One optimizer step per global batch, each rank its rows, micro-batches in order."""
    rank, world, gas = comm.get_rank(), comm.get_world_size(), engine.gradient_accumulation_steps()
    for batch in batches:
        for micro in range(gas):
            x = rank_slice(batch, rank, world, micro, gas)
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()


def accessors_worker(config, batches):
    engine, *_ = ds_lab.initialize(model=gpt(), config=config)
    train(engine, batches)
    out = dict(local_rank=engine.local_rank, global_rank=engine.global_rank, world_size=engine.world_size,
               fp16=engine.fp16_enabled(), bf16=engine.bfloat16_enabled(), zero_enabled=engine.zero_optimization(),
               stage=engine.zero_optimization_stage(), partitions=(engine.zero_optimization_partition_gradients(),
                                                                   engine.zero_optimization_partition_weights()),
               offload_optimizer=engine.zero_offload_optimizer(),
               offload_param=engine.zero_offload_param(), clipping=engine.gradient_clipping(),
               steps_per_print=engine.steps_per_print(), dynamic=engine.dynamic_loss_scale(),
               comm_dtype=engine.communication_data_type, lr=engine.get_lr(),
               norm=engine.get_global_grad_norm(), training=engine.training,
               zero_optimizer_is_mode=engine.zero_optimizer is engine.mode.zero_optimizer,
               zero_optimizer_type=type(engine.zero_optimizer).__name__)
    engine.eval()
    out["eval"] = (engine.training, engine.module.training)
    engine.train()
    out["train"] = (engine.training, engine.module.training)
    try:
        engine.zero.Init(module=engine.module)  # the article's §3.1 line
    except AttributeError as err:
        out["zero"] = f"{type(err).__name__}: {err}"
    return out


def backward_worker(config, batch, mode):
    """gas micro-steps of one global batch on one rank. mode "gas": backward(loss) (divided by gas);
    "no_gas": backward(loss, scale_wrt_gas=False); "doubled": backward(loss * gas) (what no_gas must equal)."""
    engine, *_ = ds_lab.initialize(model=gpt(), config=config)
    gas, returned, losses = engine.gradient_accumulation_steps(), [], []
    for micro in range(gas):
        x = rank_slice(batch, 0, 1, micro, gas)
        loss = engine(input_ids=x, labels=x).loss
        if mode == "doubled":
            returned.append(engine.backward(loss * gas).detach().float())
        else:
            returned.append(engine.backward(loss, scale_wrt_gas=(mode == "gas")).detach().float())
        losses.append(loss.detach().float())
        engine.step()
    try:
        engine.backward(loss, scale_wrt_gradient_accumulation_steps=True)
        old_keyword = None
    except TypeError as err:
        old_keyword = str(err)
    return dict(returned=returned, losses=losses, weights=full_weights(engine), old_keyword=old_keyword,
                loss_scale=engine.loss_scale)


class RecordingScheduler:
    """A client LR scheduler whose step() takes keyword arguments, recording each call."""

    def __init__(self, optimizer):
        self.optimizer, self.calls = optimizer, []

    def step(self, **kwargs):
        self.calls.append(kwargs)
        for group in self.optimizer.param_groups:
            group["lr"] = kwargs.get("lr", group["lr"])

    def state_dict(self):
        return {}


def lr_kwargs_worker(config, batches):
    engine, *_ = ds_lab.initialize(model=gpt(), config=config, lr_scheduler=lambda opt: RecordingScheduler(opt))
    rank, world, gas = comm.get_rank(), comm.get_world_size(), engine.gradient_accumulation_steps()
    for step, batch in enumerate(batches):
        for micro in range(gas):
            x = rank_slice(batch, rank, world, micro, gas)
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step(lr_kwargs={"lr": 0.01 * (step + 1), "step_index": step})
    return dict(calls=engine.lr_scheduler.calls, lr=engine.get_lr())


def warmup_lr_kwargs_worker(config, batch):
    """The config's WarmupLR stepped with DeepSpeed's lr_kwargs={"last_batch_iteration": n}."""
    engine, *_ = ds_lab.initialize(model=gpt(), config=config)
    x = rank_slice(batch, comm.get_rank(), comm.get_world_size(), 0, 1)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step(lr_kwargs={"last_batch_iteration": 5})
    return dict(lr=engine.get_lr(), last=engine.lr_scheduler.last_batch_iteration)


def frozen_checkpoint_worker(config, batches, ckpt_dir, frozen):
    """Train with `frozen` parameters, save excluding them; a fresh engine (another seed) loads it
    strictly (refused) and not strictly."""
    engine, *_ = ds_lab.initialize(model=gpt(0, frozen), config=config)
    train(engine, batches)
    engine.save_checkpoint(ckpt_dir, tag="t", client_state={"epoch": 3}, exclude_frozen_parameters=True)
    saved = full_weights(engine)
    other, *_ = ds_lab.initialize(model=gpt(1, frozen), config=config)
    before = full_weights(other)
    try:
        other.load_checkpoint(ckpt_dir, tag="t")
        strict_error = None
    except Exception as err:
        strict_error = f"{type(err).__name__}: {err}"
    path, client = other.load_checkpoint(ckpt_dir, tag="t", load_module_strict=False)
    file = torch.load(os.path.join(ckpt_dir, "t", "mp_rank_00_model_states.pt"), weights_only=True)
    return dict(saved=saved, before=before, loaded=full_weights(other), strict_error=strict_error,
                path=path, client=client, module_keys=sorted(file["module"]))


def custom_load_worker(config, batches, ckpt_dir):
    """save; load into a fresh engine with custom_load_fn (loads src, then doubles one tensor); one
    step at lr 0 must keep the custom values (the fp32 masters followed the module)."""
    engine, *_ = ds_lab.initialize(model=gpt(0), config=config)
    train(engine, batches)
    engine.save_checkpoint(ckpt_dir)
    saved = full_weights(engine)
    calls = []

    def load_fn(src, dst):
        calls.append(dict(keys=sorted(src), module=type(dst).__name__))
        dst.load_state_dict(src)
        with torch.no_grad():
            dst.ln_f.weight.mul_(2.0)

    zero_lr = {**config, "optimizer": {"type": "Adam", "params": {"lr": 0.0}}}
    other, *_ = ds_lab.initialize(model=gpt(1), config=zero_lr)
    nothing = other.load_checkpoint(os.path.join(ckpt_dir, "missing"))
    path, client = other.load_checkpoint(ckpt_dir, custom_load_fn=load_fn, load_optimizer_states=False)
    loaded = full_weights(other)
    train(other, batches[:1])
    return dict(saved=saved, loaded=loaded, after_step=full_weights(other), calls=calls, path=path,
                client=client, nothing=nothing, state_keys=sorted(other.module.state_dict()))


def custom_load_refused_worker(config, ckpt_dir):
    engine, *_ = ds_lab.initialize(model=gpt(0), config=config)
    engine.save_checkpoint(ckpt_dir)
    try:
        engine.load_checkpoint(ckpt_dir, custom_load_fn=lambda src, dst: None)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def save_16bit_worker(config, batches, save_dir, frozen=()):
    """Train, then save_16bit_model (and the save_fp16_model alias). Returns what it returned and
    the engine's whole weights in the model dtype, gathered independently of save_16bit_model."""
    engine, *_ = ds_lab.initialize(model=gpt(0, frozen), config=config)
    train(engine, batches)
    saved = engine.save_16bit_model(save_dir, exclude_frozen_parameters=bool(frozen))
    alias = engine.save_fp16_model(save_dir, "alias.bin")
    params = list(engine.module.parameters())
    with ds_lab.zero.GatheredParameters(params):  # stage 3: the whole bf16 parameters; else a no-op
        whole = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    exists = os.path.exists(os.path.join(save_dir, "pytorch_model.bin"))
    return dict(saved=saved, alias=alias, whole=whole, exists=exists)
