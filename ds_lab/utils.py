"""DeepSpeed's documented route to a partitioned model's fp32 state: `deepspeed.utils.safe_*`.

    from ds_lab.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    whole = safe_get_full_fp32_param(model.head.weight)      # collective: every rank calls it
    safe_set_full_fp32_param(model.head.weight, whole * 0)   # local: every rank passes the same value

Under ZeRO the fp32 master weights, Adam's moments and the averaged gradient exist only as each
rank's chunk (`zero/partition.py`); these functions assemble or overwrite the whole value of one
parameter. As in DeepSpeed (deepspeed/utils/tensor_fragment.py):
  - the getters are collective at stages 1-3: each rank puts its part into a zero tensor of the
    parameter's shape and one all-reduce (SUM) over the data-parallel group adds the parts (every
    element is owned by exactly one rank, so the sum is exact); they return fp32 tensors
  - the setters are local: each rank copies its own part of `value` (so pass the same value everywhere)
  - `safe_get_full_grad` is the averaged gradient, available after backward at the accumulation
    boundary and before `engine.step()` (DeepSpeed: "only available immediately after backward and
    before engine step"); with fp16 it is still multiplied by the loss scale, as there
  - an optimizer-state key before the first step raises (the state does not exist yet), as there
Where ds_lab departs (better, and said so): `safe_set_full_fp32_param` also updates the model's own
parameter (its 16-bit copy, or its chunk at stage 3), so the next forward already sees the value, where
DeepSpeed changes only the master and the model catches up at the next step; at stage 0, where
DeepSpeed returns None when no optimizer wrapper holds a master (fp32, fp16), ds_lab returns the
parameter's fp32 value or its fp32 master.

How a parameter finds its engine: ZeRO-3 parameters carry `ds_zero`; the engine marks every
parameter of its model with its mode (`_ds_lab_mode`).

Also here, as in `deepspeed.utils`: `RepeatingLoader(loader)`, an endless iterator over a loader
that starts it again at its end (deepspeed/runtime/dataloader.py).
"""
from __future__ import annotations

import math

import torch

from ds_lab import comm

__all__ = ["safe_get_full_fp32_param", "safe_set_full_fp32_param", "safe_get_full_optimizer_state",
           "safe_set_full_optimizer_state", "safe_get_full_grad", "RepeatingLoader"]

def _mode_of(param):
    """The engine's mode (runtime/mode.py) that trains `param`, or None: ZeRO-3 marks its
    parameters (`ds_zero`), and the engine marks every parameter of its model (`_ds_lab_mode`)."""
    mode = getattr(param, "ds_zero", None) or getattr(param, "_ds_lab_mode", None)
    return None if mode is None or getattr(mode, "detached", False) else mode


def _place(mode, param):
    """(unit, offset of `param` in the unit's flat vector) under ZeRO; None at stage 0."""
    units = getattr(mode, "units", None)
    if units is None:
        return None
    unit_of = getattr(mode, "unit_of", None)
    unit = unit_of.get(param) if unit_of is not None else next((u for u in units if any(q is param for q in u.params)), None)
    if unit is None:
        raise KeyError("this parameter is not trained by the engine's optimizer (not in any param group)")
    index = next(i for i, q in enumerate(unit.params) if q is param)
    return unit, unit.offsets[index]


def _overlap(unit, offset, numel):
    """The elements of [offset, offset + numel) in the unit that this rank owns: (start in the param,
    start in this rank's chunk, count); count 0 when it owns none."""
    mine = unit.mine
    start, stop = max(offset, mine.start), min(offset + numel, mine.stop)
    return start - offset, start - mine.start, max(0, stop - start)


def _state(mode, master, key):
    state = mode.optimizer.state.get(master, {}) if mode.optimizer is not None else {}
    if key not in state:
        raise ValueError(f"{key!r} not found in the optimizer state (it exists after the first step; "
                         f"keys now: {sorted(state)})")
    return state[key]


def _master_source(mode, unit, key):
    """This rank's chunk of `unit` in the master shard (key None) or in an optimizer state."""
    master = mode.masters[unit.group]
    flat = master.data if key is None else _state(mode, master, key)
    return flat[unit.shard_offset:unit.shard_offset + unit.chunk]


def _stage0_tensor(mode, param, key):
    master = getattr(mode, "master_of", {}).get(param, param)
    return master.data if key is None else _state(mode, master, key)


def _get_full(param, key=None):
    mode = _mode_of(param)
    if mode is None:
        return None
    place = _place(mode, param)
    if place is None:
        return _stage0_tensor(mode, param, key).detach().float().clone()
    unit, offset = place
    shape = getattr(param, "ds_shape", tuple(param.shape))
    whole = torch.zeros(math.prod(shape), dtype=torch.float32, device=mode.device)
    start, chunk_start, count = _overlap(unit, offset, whole.numel())
    if count:
        whole[start:start + count] = _master_source(mode, unit, key)[chunk_start:chunk_start + count]
    if mode.world_size > 1:
        with comm.tag("safe_get_full"):
            comm.all_reduce(whole, group=mode.dp_group)
    return whole.view(shape)


def _set_full(param, value, key=None) -> None:
    mode = _mode_of(param)
    if mode is None:
        return
    value = value.detach().reshape(-1)
    place = _place(mode, param)
    with torch.no_grad():
        if place is None:
            _stage0_tensor(mode, param, key).copy_(value.view(param.shape))
            if key is None and param in getattr(mode, "master_of", {}):
                param.copy_(value.view(param.shape))  # the 16-bit copy follows its master
            return
        unit, offset = place
        start, chunk_start, count = _overlap(unit, offset, value.numel())
        if count:
            _master_source(mode, unit, key)[chunk_start:chunk_start + count].copy_(value[start:start + count])
        if key is not None:
            return
        shard = getattr(unit, "shard", None)  # stage 3: the parameter chunk in the model dtype
        if count and shard is not None:
            shard[chunk_start:chunk_start + count].copy_(value[start:start + count])
        if getattr(unit, "flat", None) is not None:  # whole parameters present (stages 1/2, persistent units)
            unit.flat[offset:offset + value.numel()].copy_(value)


def safe_get_full_fp32_param(param):
    """The whole fp32 value of `param` (its master). Collective under ZeRO. None if no engine trains it."""
    return _get_full(param)


def safe_set_full_fp32_param(param, value) -> None:
    """Overwrite `param`'s fp32 master (and the model's parameter) with the whole `value`. Local."""
    _set_full(param, value)


def safe_get_full_optimizer_state(param, optim_state_key):
    """The whole fp32 optimizer state `optim_state_key` (e.g. "exp_avg") of `param`. Collective under ZeRO."""
    return _get_full(param, optim_state_key)


def safe_set_full_optimizer_state(param, value, optim_state_key) -> None:
    """Overwrite `param`'s optimizer state `optim_state_key` with the whole `value`. Local."""
    _set_full(param, value, optim_state_key)


def safe_get_full_grad(param):
    """The whole averaged gradient of `param` in fp32, between backward (at the accumulation boundary)
    and `engine.step()`. Collective under ZeRO. None if no engine trains it or it has no gradient."""
    mode = _mode_of(param)
    if mode is None:
        return None
    place = _place(mode, param)
    if place is None:
        return None if param.grad is None else param.grad.detach().float().clone()
    unit, offset = place
    shape = getattr(param, "ds_shape", tuple(param.shape))
    whole = torch.zeros(math.prod(shape), dtype=torch.float32, device=mode.device)
    start, chunk_start, count = _overlap(unit, offset, whole.numel())
    if count:
        whole[start:start + count] = mode.grad_chunk(unit)[chunk_start:chunk_start + count].float()
    if mode.world_size > 1:
        with comm.tag("safe_get_full"):
            comm.all_reduce(whole, group=mode.dp_group)
    return whole.view(shape)


class RepeatingLoader:
    """Iterate `loader` forever: at its end (StopIteration) start a fresh pass with `iter(loader)`,
    so a DataLoader reshuffles (and a DistributedSampler needs `set_epoch` from you, as in DeepSpeed).
    The first iterator is made at construction, as DeepSpeed does. An empty loader raises StopIteration."""

    def __init__(self, loader):
        self.loader = loader
        self.data_iter = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)
