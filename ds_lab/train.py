"""Train the small GPT on the shipped corpus: the worker every rank runs, and its defaults.

    ds-lab train --world-size 2 --steps 200         # from the shell
    ds_lab.launch(train_worker, 2, steps=200)        # from Python / a notebook

Each rank builds the same model (same seed; the engine also broadcasts rank 0's weights), takes
its own slice of every global batch from `DistributedLoader`, and trains with the engine. The
worker returns what it measured: losses, tokens/s, the memory ledger, and its comm log.
"""
from __future__ import annotations

import time

import torch

import ds_lab
from ds_lab import comm
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.monitor import events
from ds_lab.models import GPT, GPTConfig

DEFAULT_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}},
    "gradient_clipping": 1.0,
}


def _progress(step, steps, loss, tokens_per_s, width=30):
    done = int(width * step / steps)
    bar = "#" * done + "." * (width - done)
    end = "\n" if step == steps else ""
    print(f"\r[{bar}] step {step}/{steps}  loss {loss:.3f}  {tokens_per_s:,.0f} tok/s", end=end, flush=True)


def train_worker(config=None, model=None, steps=200, seed=0, progress=True):
    """Runs on every rank; returns this rank's measurements."""
    config = dict(config or DEFAULT_CONFIG)
    model_cfg = GPTConfig(**{**DEFAULT_MODEL, **(model or {})})
    torch.manual_seed(seed)
    engine, _, _, _ = ds_lab.initialize(model=GPT(model_cfg), config=config)
    loader = DistributedLoader(corpus_tokens(), model_cfg.block_size, engine.train_micro_batch_size_per_gpu(),
                               dp_rank=engine.dp_rank, dp_size=engine.dp_world_size, seed=seed)
    rank, ga = comm.get_rank(), engine.gradient_accumulation_steps()
    tokens_per_step = engine.train_batch_size() * model_cfg.block_size
    losses, t_start = [], time.perf_counter()
    comm.reset_log()
    batches = iter(loader)
    for step in range(1, steps + 1):
        step_loss = 0.0
        for _ in range(ga):
            out = engine(**next(batches))
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.item() / ga
        losses.append(step_loss)
        if progress and rank == 0:
            _progress(step, steps, step_loss, tokens_per_step * step / (time.perf_counter() - t_start))
    seconds = time.perf_counter() - t_start
    return dict(rank=rank, losses=losses, seconds=seconds, tokens_per_s=tokens_per_step * steps / seconds,
                num_parameters=engine.num_parameters(), memory=engine.memory_report(),
                comm=comm.summarize(), precision=engine.precision, world_size=comm.get_world_size(),
                watch_seconds=events.publish_seconds)


def format_memory(results) -> str:
    cats = ["params", "grads", "master_params", "optimizer_states", "buffers", "activations_peak"]
    lines = [f"{'rank':<6}" + "".join(f"{c:>18}" for c in cats) + f"{'model states/Ψ':>16}"]
    for r in results:
        m = r["memory"]
        states = m["params"] + m["grads"] + m["master_params"] + m["optimizer_states"]
        lines.append(f"{r['rank']:<6}" + "".join(f"{m[c]:>18,}" for c in cats)
                     + f"{states / r['num_parameters']:>15.2f}B")
    return "\n".join(lines)
