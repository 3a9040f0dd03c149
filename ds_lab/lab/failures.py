"""Rank functions that fail on purpose, one per common failure (chapter 11), so the chapter can
cause each on real ranks with `ds_lab.launch` and read the message it gives.

    try:
        ds_lab.launch(crash_on_rank, 2, 1, timeout=5)
    except ds_lab.RankError as err:
        print(err)                                  # "rank 1 failed:" + its traceback

    crash_on_rank(bad_rank)        a rank raises in the middle of a step (a bug, a bad sample)
    hang(timeout)                  rank 0 enters an all-reduce that rank 1 never calls
    mismatched_sizes()             both ranks all-reduce, with tensors of different sizes
    mismatched_ops()               rank 0 all-reduces while rank 1 broadcasts
    bad_config(config)             `initialize` with a config that has a typo in it
    out_of_memory(cap_bytes, ...)  a real address-space cap (RLIMIT_AS) inside the rank, then training

The memory cap is real, not simulated: `resource.setrlimit(RLIMIT_AS)` limits the rank's virtual
address space to what it already maps plus `cap_bytes`, so the next allocation past that fails
inside torch's allocator exactly as a full host does ("can't allocate memory"). On a GPU the same
mistake gives "CUDA out of memory"; the cure is the same (a higher ZeRO stage, a smaller micro batch,
activation checkpointing). Linux only: it reads /proc/self/status.
"""
from __future__ import annotations

import ctypes
import os
import resource
import time

import torch

import ds_lab
from ds_lab import comm
from ds_lab.models import GPT, GPTConfig


def crash_on_rank(bad_rank: int, steps: int = 3):
    """Every rank all-reduces `steps` times; `bad_rank` raises at step 1, as a bug in a loss would."""
    for step in range(steps):
        if comm.get_rank() == bad_rank and step == 1:
            raise ValueError(f"loss is nan at step {step}: the batch held an empty sequence")
        comm.all_reduce(torch.ones(4))
    return "done"


def hang(sleep_s: float = 60.0):
    """Rank 0 enters an all-reduce; rank 1 is stuck elsewhere (here: sleeping) and never joins.
    With launch(..., timeout=T) rank 0's collective fails after T seconds and names itself."""
    if comm.get_rank() == 0:
        comm.all_reduce(torch.ones(1000))
    else:
        time.sleep(sleep_s)
    return "done"


def mismatched_sizes(stderr_path: str | None = None):
    """Both ranks all-reduce, but rank 1's tensor has a different number of elements. gloo notices
    and aborts the process from C++ (SIGABRT), writing its reason to file descriptor 2, which
    Python never sees: pass `stderr_path` to have each rank's fd 2 written to `stderr_path.rank`."""
    if stderr_path is not None:
        log = open(f"{stderr_path}.{comm.get_rank()}", "w")
        os.dup2(log.fileno(), 2)
    comm.all_reduce(torch.ones(1000 + 24 * comm.get_rank()))
    return "done"


def mismatched_ops():
    """Rank 0 all-reduces, rank 1 broadcasts: the two never meet in the same collective."""
    x = torch.ones(1000)
    if comm.get_rank() == 0:
        comm.all_reduce(x)
    else:
        comm.broadcast(x, src=1)
    return "done"


def bad_config(config: dict, model: dict):
    """`initialize` with `config`: a typo in it raises ConfigError before any training."""
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**model)), config=config)
    return "initialized"


_M_ARENA_MAX = -8  # glibc's malloc.h


def mapped_bytes() -> int:
    """This process's virtual address space now (VmSize), in bytes: what RLIMIT_AS is compared with."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status (RLIMIT_AS demo needs Linux)")


def out_of_memory(cap_bytes: int, config: dict, model: dict, batch):
    """Cap the address space at (what is mapped now + cap_bytes), then build, initialize and train
    one step. Returns the ledger when it fits; raises torch's allocator error when it does not.

    glibc gives each thread that allocates its own malloc arena of 64 MB of address space; one
    arena (mallopt M_ARENA_MAX = 1) keeps the address space close to what the tensors need."""
    ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1)
    resource.setrlimit(resource.RLIMIT_AS, (mapped_bytes() + cap_bytes, resource.RLIM_INFINITY))
    torch.manual_seed(0)
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**model)), config=config)
    rank, world_size = comm.get_rank(), comm.get_world_size()
    rows = batch.shape[0] // world_size
    x = batch[rank * rows:(rank + 1) * rows]
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    return engine.memory_report()
