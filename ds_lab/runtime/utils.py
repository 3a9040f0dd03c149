"""DeepSpeed's `deepspeed.runtime.utils.set_random_seed`: one call seeds every generator training uses.

    from ds_lab.runtime.utils import set_random_seed
    set_random_seed(1234)     # python's random, numpy's global generator, torch (CPU and every CUDA device)

As in DeepSpeed (deepspeed/runtime/utils.py): numpy takes the seed modulo 2**32 and torch modulo 2**63
(the largest seeds each accepts). `torch.manual_seed` also seeds every CUDA device (lazily: no CUDA
context is created), which is how DeepSpeed's version reaches the accelerator too.
"""
from __future__ import annotations

import random

import torch

__all__ = ["set_random_seed"]


def set_random_seed(seed: int) -> None:
    """Seed python's `random`, numpy (when installed) and torch with `seed`."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"set_random_seed takes an int seed, got {seed!r}")
    random.seed(seed)
    try:
        import numpy
    except ImportError:  # DeepSpeed requires numpy; ds_lab runs without it
        numpy = None
    if numpy is not None:
        numpy.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed % (2 ** 63))
