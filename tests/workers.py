"""Functions the tests run on launched ranks (kept importable, out of the test modules)."""
from __future__ import annotations

import os
import time

import torch

import ds_lab
from ds_lab import comm
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.models import GPT, GPTConfig

# A deliberately odd-sized model: Ψ is odd, so it divides by none of 2, 3, 4.
TINY = dict(vocab_size=257, block_size=16, n_layer=2, n_head=5, n_embd=35)
COMM_TAGS = ("grad_allreduce", "grad_reduce_scatter", "param_allgather")  # the traffic of a step


def pid_file_worker(folder, fail_rank=None, hang_rank=None):
    path = os.path.join(folder, f"rank{comm.get_rank()}.pid")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)  # a rank killed mid-write leaves no half-written pid
    if comm.get_rank() == fail_rank:
        raise ValueError(f"boom from rank {comm.get_rank()}")
    if comm.get_rank() == hang_rank:
        time.sleep(600)  # never reaches the all_reduce below
    t = torch.ones(4)
    comm.all_reduce(t)
    return comm.get_rank()


def collectives_worker():
    rank, n = comm.get_rank(), comm.get_world_size()
    t = torch.full((5,), float(rank + 1))
    comm.all_reduce(t)
    gathered = torch.empty(3 * n)
    comm.all_gather(gathered, torch.full((3,), float(rank)))
    shard = torch.empty(2)
    comm.reduce_scatter(shard, torch.arange(2.0 * n))
    b = torch.full((4,), float(rank))
    comm.broadcast(b, src=0)
    # rank 1 joins the async all-reduce 0.5 s late: rank 0's call must return at once (recording
    # forces no sync), unfinished, and the record gets the real duration when the op completes
    if rank == 1:
        time.sleep(0.5)
    t0 = time.perf_counter()
    h = comm.all_reduce(torch.ones(7, dtype=torch.bfloat16), async_op=True)
    issue_seconds = time.perf_counter() - t0
    pending_seconds = comm.get_log()[-1].seconds
    h.wait()
    waited_seconds = comm.get_log()[-1].seconds
    if n >= 2:
        if rank == 0:
            comm.send(torch.ones(6), dst=1)
        elif rank == 1:
            comm.recv(torch.empty(6), src=0)
    log = [(r.op, r.bytes, r.group_size, r.seconds is not None) for r in comm.get_log()]
    print(f"rank {rank} done")
    return dict(all_reduce=t, all_gather=gathered, reduce_scatter=shard, broadcast=b,
                pending_seconds=pending_seconds, issue_seconds=issue_seconds,
                waited_seconds=waited_seconds, log=log)


def make_batches(steps, global_batch, seq_len, seed=1):
    loader = DistributedLoader(corpus_tokens(), seq_len, global_batch, seed=seed)
    return [loader.batch(i)["input_ids"] for i in range(steps)]


def rank_slice(batch, rank, world_size, micro, accumulation):
    """Rank r, micro-step m gets rows [(r*A + m) * B, ...): together they cover the global batch."""
    b = batch.shape[0] // (world_size * accumulation)
    start = (rank * accumulation + micro) * b
    return batch[start:start + b]


def global_mean(micro_losses) -> float:
    """The global batch's loss: the mean over micro-steps and ranks (equal-sized slices)."""
    mean = torch.stack(micro_losses).mean()
    comm.all_reduce(mean)
    return mean.item() / comm.get_world_size()


def train_step(engine, batch, before_step=None) -> float:
    """One optimizer step on the global `batch`: this rank's slice of every micro-batch, then the
    global batch's mean loss. `before_step(micro)` runs between backward and step (fault injection)."""
    rank, n, accumulation = comm.get_rank(), comm.get_world_size(), engine.gradient_accumulation_steps()
    micro_losses = []
    for micro in range(accumulation):
        x = rank_slice(batch, rank, n, micro, accumulation)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        if before_step is not None:
            before_step(micro)
        engine.step()
        micro_losses.append(loss.detach().float())
    return global_mean(micro_losses)


def dp_train_worker(config, batches, model=None, seed=0, inject_inf_at=None):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**(model or TINY)))
    engine, _, _, _ = ds_lab.initialize(model=gpt, config=config)
    accumulation = engine.gradient_accumulation_steps()

    def inject_inf(micro):
        if micro == accumulation - 1 and comm.get_rank() == 0:
            if engine.zero_optimizer is not None:  # ZeRO: the gradient lives in this rank's shard
                engine.zero_optimizer.grad_chunk(engine.zero_optimizer.units[0])[0] = float("inf")
            else:
                next(engine.module.parameters()).grad.view(-1)[0] = float("inf")

    losses, scales, applied, grad_bytes, wire_bytes = [], [], [], [], []
    for step, batch in enumerate(batches):
        comm.reset_log()
        losses.append(train_step(engine, batch, inject_inf if step == inject_inf_at else None))
        scales.append(engine.loss_scale)
        applied.append(engine.was_step_applied())
        grad_bytes.append(sum(r.bytes for r in comm.get_log() if r.tag == "grad_allreduce"))
        wire_bytes.append(sum(r.wire_bytes for r in comm.get_log() if r.tag in COMM_TAGS))
    return dict(losses=losses, weights=full_weights(engine), scales=scales, applied=applied,
                grad_bytes=grad_bytes, wire_bytes=wire_bytes, memory=engine.memory_report(),
                num_parameters=engine.num_parameters(),
                peak_live_params=getattr(engine.zero_optimizer, "peak_live_bytes", None))


def full_weights(engine):
    """The whole fp32 weights: the module's own under stages 0-2, the gathered shards under ZeRO-3."""
    if engine.zero_optimizer is not None and engine.zero_optimizer.stage == 3:
        return {k: v.clone() for k, v in engine.zero_optimizer.full_state_dict().items()}
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def reference_train(batches, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip=1.0,
                    model=None, seed=0):
    """Plain PyTorch, one process, the whole global batch at once: what every mode must match."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**(model or TINY)))
    opt = torch.optim.AdamW(gpt.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    losses = []
    for batch in batches:
        loss = gpt(input_ids=batch, labels=batch).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return dict(losses=losses, weights={k: v.detach().clone() for k, v in gpt.state_dict().items()})


def checkpoint_worker(config, batches, ckpt_dir, resume=False, model=None):
    """Train on `batches`; resume=False: then save. resume=True: load first, then train."""
    torch.manual_seed(123 if resume else 0)  # a different init: loading must overwrite it
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**(model or TINY))), config=config)
    client = None
    if resume:
        path, client = engine.load_checkpoint(ckpt_dir)
        assert path is not None
    losses = [train_step(engine, batch) for batch in batches]
    if not resume:
        engine.save_checkpoint(ckpt_dir, client_state={"data_position": len(batches)})
    return dict(losses=losses, client_state=client, global_steps=engine.global_steps,
                lr=engine.get_lr(), scale=engine.loss_scale)


def load_only_worker(ckpt_dir, config, tag=None):
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**TINY)), config=config)
    return engine.load_checkpoint(ckpt_dir, tag=tag)


def hf_article_example(save_dir, steps=3):
    """The article's §5.2 loop with only the import changed (and the model built from a config)."""
    import ds_lab as deepspeed
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    learning_rate = 1e-4
    config = {"train_micro_batch_size_per_gpu": 2}
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=learning_rate), config=config)
    losses = []
    for _ in range(steps):
        input_ids = torch.randint(0, 256, (2, 16))
        attention_mask = torch.ones_like(input_ids)
        outputs = engine(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
        loss = outputs.loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.save_checkpoint(save_dir)
    return dict(losses=losses, steps=engine.global_steps)


def zero_measure_worker(config, batches, model, seed=0, use_init=False):
    """Train a few steps; return the ledger, the wire bytes per step, and ZeRO-3's live peak."""
    torch.manual_seed(seed)
    if use_init:
        from ds_lab.zero.init import Init
        Init.peak_bytes = 0
        with Init():
            gpt = GPT(GPTConfig(**model))
        init_peak = Init.peak_bytes
        init_params_bytes = sum(p.numel() * p.element_size() for p in gpt.parameters())
    else:
        gpt, init_peak, init_params_bytes = GPT(GPTConfig(**model)), None, None
    engine, _, _, _ = ds_lab.initialize(model=gpt, config=config)
    wire, losses = [], []
    for batch in batches:
        comm.reset_log()
        losses.append(train_step(engine, batch))
        wire.append(sum(r.wire_bytes for r in comm.get_log() if r.tag in COMM_TAGS))
    largest_unit = max((u.padded for u in engine.zero_optimizer.units), default=0) if engine.zero_optimizer else 0
    return dict(memory=engine.memory_report(), num_parameters=engine.num_parameters(), wire=wire,
                losses=losses, peak_live=getattr(engine.zero_optimizer, "peak_live_bytes", None),
                largest_unit=largest_unit, init_peak=init_peak, init_params_bytes=init_params_bytes,
                weights=full_weights(engine), grad_norm=engine.get_global_grad_norm())


def gathered_parameters_worker(config):
    from ds_lab.zero import GatheredParameters
    torch.manual_seed(0)
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**TINY)), config=config)
    weight = engine.module.blocks[0].mlp.c_fc.weight
    with GatheredParameters(weight, modifier_rank=0):
        shape = tuple(weight.shape)
        if comm.get_rank() == 0:
            with torch.no_grad():
                weight.fill_(0.5)
    after_exit = weight.numel()  # released again: only this rank's chunk remains elsewhere
    return dict(shape=shape, after_exit=after_exit,
                value=full_weights(engine)["blocks.0.mlp.c_fc.weight"])


def consolidate_worker(config, batches, ckpt_dir):
    torch.manual_seed(0)
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**TINY)), config=config)
    for batch in batches:
        train_step(engine, batch)
    engine.save_checkpoint(ckpt_dir)
    return full_weights(engine)


def topology_worker(pipe, data, model):
    from ds_lab.comm.topology import ProcessGroups, ProcessTopology
    groups = ProcessGroups(ProcessTopology(pipe=pipe, data=data, model=model))
    t = torch.tensor([float(comm.get_rank())])
    comm.all_reduce(t, group=groups.get_data_parallel_group())
    return dict(coord=groups.coord, data_ranks=groups.ranks["data"], data_sum=t.item(),
                dp_size=groups.get_data_parallel_world_size(), dp_rank=groups.get_data_parallel_rank())


def api_worker(config_path):
    import argparse
    args = argparse.Namespace(deepspeed_config=config_path, local_rank=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    dataset = [{"input_ids": torch.randint(0, 256, (16,))} for _ in range(32)]
    engine, optimizer, loader, scheduler = ds_lab.initialize(args=args, model=model, training_data=dataset,
                                                             model_parameters=model.parameters())
    out = dict(tbs=engine.train_batch_size(), micro=engine.train_micro_batch_size_per_gpu(),
               ga=engine.gradient_accumulation_steps(), lr0=engine.get_lr(), loader_batches=len(loader),
               scheduler=type(scheduler).__name__, optimizer_is_engine_optimizer=optimizer is engine.optimizer)
    boundaries = []
    for batch in loader:
        x = batch["input_ids"]
        boundaries.append(engine.is_gradient_accumulation_boundary())
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        if len(boundaries) == 4:
            break
    out.update(boundaries=boundaries, global_steps=engine.global_steps, lr1=engine.get_lr(),
               grad_norm=engine.get_global_grad_norm(), applied=engine.was_step_applied(),
               micro_shape=tuple(x.shape))
    return out


def monitors_worker(config):
    torch.manual_seed(0)
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**TINY)), config=config)
    x = torch.randint(0, 256, (engine.train_micro_batch_size_per_gpu(), 16))
    for _ in range(2):
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    return engine.global_steps
