"""Train the small GPT on the shipped corpus: the worker every rank runs, and its defaults.

    ds-lab train --world-size 2 --steps 200         # from the shell
    ds_lab.launch(train_worker, 2, steps=200)        # from Python / a notebook

Each rank builds the same model (same seed; the engine also broadcasts rank 0's weights), takes
its own slice of every global batch from `DistributedLoader`, and trains with the engine. The
worker returns what it measured: losses, tokens/s, the memory ledger, and its comm log.
Rank 0 shows a tqdm progress bar (loss, tokens/s): one redrawn line in a terminal, one line every
10 s when the output goes to a log file.
"""
from __future__ import annotations

import shutil
import sys
import time

import torch

import ds_lab
from ds_lab import comm
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.monitor import events
from ds_lab.models import GPT, GPTConfig

LOG_INTERVAL_S = 10.0  # seconds between progress lines when the output is a log file, not a terminal
DEFAULT_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}},
    "gradient_clipping": 1.0,
}


class _Lines:
    """A file for tqdm that writes each refresh as its own line: a log file gets readable lines
    instead of one line of carriage returns."""

    def __init__(self, file):
        self.file = file

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.file.write(text + "\n")

    def flush(self) -> None:
        self.file.flush()


def progress_bar(steps: int, tty: bool | None = None, log_interval: float = LOG_INTERVAL_S):
    """A tqdm bar over `steps`: one redrawn line in a terminal; in a log (stdout not a terminal),
    a line every `log_interval` seconds, so the file does not fill."""
    from tqdm import tqdm

    tty = sys.stderr.isatty() if tty is None else tty
    if tty:
        # a launched rank's stderr is a pipe to the parent, which owns the terminal: size the bar from it
        return tqdm(total=steps, unit="step", ncols=min(120, shutil.get_terminal_size().columns), file=sys.stderr)
    return tqdm(total=steps, unit="step", ncols=100, ascii=True, mininterval=log_interval, maxinterval=log_interval,
                file=_Lines(sys.stderr))


def train_worker(config=None, model=None, steps=200, seed=0, progress=True, tty=None):
    """Runs on every rank; returns this rank's measurements. Rank 0 shows a progress bar when
    `progress` (`tty`: whether the bar goes to a terminal; None: ask stderr)."""
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
    bar = progress_bar(steps, tty) if progress and rank == 0 else None
    for step in range(1, steps + 1):
        step_loss = 0.0
        for _ in range(ga):
            out = engine(**next(batches))
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.item() / ga
        losses.append(step_loss)
        if bar is not None:
            tokens_per_s = tokens_per_step * step / (time.perf_counter() - t_start)
            bar.set_postfix_str(f"loss {step_loss:.3f}, {tokens_per_s:,.0f} tok/s", refresh=False)
            bar.update(1)  # redraws at most every mininterval seconds
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t_start
    return dict(rank=rank, losses=losses, seconds=seconds, tokens_per_s=tokens_per_step * steps / seconds,
                num_parameters=engine.num_parameters(), memory=engine.memory_report(),
                comm=comm.summarize(), precision=engine.precision, world_size=comm.get_world_size(),
                watch_seconds=events.publish_seconds)


def format_memory(results) -> str:
    """Steady bytes by category (after a step), model states per parameter, and the step's peak:
    the most the five categories held at once inside backward and the optimizer step."""
    cats = ["params", "grads", "master_params", "optimizer_states", "buffers", "activations_peak"]
    lines = [f"{'rank':<6}" + "".join(f"{c:>18}" for c in cats) + f"{'model states/Ψ':>16}{'step peak':>16}"]
    for r in results:
        m = r["memory"]
        states = m["params"] + m["grads"] + m["master_params"] + m["optimizer_states"]
        lines.append(f"{r['rank']:<6}" + "".join(f"{m[c]:>18,}" for c in cats)
                     + f"{states / r['num_parameters']:>15.2f}B{m.get('peak', {}).get('total', 0):>16,}")
    return "\n".join(lines)
