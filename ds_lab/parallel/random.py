"""Random numbers under tensor parallel: which dropout masks must agree across tensor ranks, and which differ.

Outside a tensor-parallel region every tensor rank holds the same activation (the residual stream
after g), so its dropout mask must be the same on every rank: the default generator, seeded alike.
Inside a region each rank holds a different piece (its attention heads, or under sequence parallel
its s/T positions); one shared stream would drop the same pattern in every piece, which is not what
one process does. So a second, per-rank stream is kept aside and swapped in for those regions:

    model_parallel_manual_seed(seed)       default generator <- seed                     (same on every rank)
                                           tracker "model-parallel-rng" <- seed + 2718 + tensor_rank
    with get_rng_tracker().fork():         draw from the per-rank stream; the default one is untouched
        y = F.dropout(x, p)

(Megatron-LM's `model_parallel_cuda_manual_seed` / `get_cuda_rng_tracker`; here the CPU generator is
tracked too, and the CUDA one when there is a GPU.)
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ds_lab.parallel.state import model_parallel_rank

MODEL_PARALLEL_RNG = "model-parallel-rng"
SEED_OFFSET = 2718  # Megatron's: keeps the tensor streams away from the default seed


def device_rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_device_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


class RNGStatesTracker:
    """Named generator states that can be swapped in for a block of code (`fork`)."""

    def __init__(self):
        self.states: dict = {}

    def reset(self) -> None:
        self.states = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists; call reset() first")
        outside = device_rng_state()
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
        self.states[name] = device_rng_state()
        set_device_rng_state(outside)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states:
            raise RuntimeError(f"no RNG state {name!r}: call ds_lab.parallel.model_parallel_manual_seed(seed) "
                               f"on every rank before using dropout inside a tensor-parallel region")
        outside = device_rng_state()
        set_device_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = device_rng_state()  # the stream continues where it stopped
            set_device_rng_state(outside)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


get_cuda_rng_tracker = get_rng_tracker  # Megatron's name


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default generator with `seed` (equal on all ranks: the model is built identically and
    replicated regions drop alike) and the tracker with seed + 2718 + tensor rank (differs per rank)."""
    torch.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + SEED_OFFSET + model_parallel_rank())


model_parallel_cuda_manual_seed = model_parallel_manual_seed  # Megatron's name


def tensor_parallel_dropout(x, p: float, training: bool):
    """Dropout on a tensor that differs across tensor ranks (a shard): drawn from the per-rank stream."""
    if p == 0.0 or not training:
        return x
    with _TRACKER.fork():
        return F.dropout(x, p, training=True)
