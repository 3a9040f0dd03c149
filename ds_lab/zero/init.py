"""zero.Init and GatheredParameters: build a model already partitioned; gather it on purpose.

    with ds_lab.zero.Init():            # every module, right after its own __init__, keeps only
        model = GPT(config)             # this rank's chunk of its parameters: the whole model never
                                        # exists on one rank (peak: the largest single module)
    engine, *_ = ds_lab.initialize(model=model, config={..., "zero_optimization": {"stage": 3}})

`Init` wraps the `__init__` of every `torch.nn.Module` subclass while it is active. When a module's
`__init__` returns, its own freshly created parameters are flattened, rank 0's values are broadcast
(so every rank agrees whatever its random state), and each rank keeps chunk r of the padded flat
vector; `param.data` becomes an empty tensor. The engine (stage 3) later turns these into its units.

Note: `Init` must wrap the model's construction. Calling it on a model that already exists (as in
`engine.zero.Init(module=model)` after `initialize`) is too late: the whole model was already
built in memory, which is what Init exists to prevent.

    with ds_lab.zero.GatheredParameters(model.lm_head.weight, modifier_rank=0):
        if rank == 0:
            model.lm_head.weight.zero_()   # changed on rank 0, broadcast, re-partitioned on exit
"""
from __future__ import annotations

import functools
import math

import torch

from ds_lab import comm


class _InitShard:
    """What Init leaves on a module: its chunk of the module's own parameters."""

    def __init__(self, params, world_size, rank, dtype):
        self.params = params
        self.shapes = [tuple(p.shape) for p in params]
        self.numel = sum(p.numel() for p in params)
        self.chunk = max(1, math.ceil(self.numel / world_size))
        self.padded, self.rank, self.dtype = self.chunk * world_size, rank, dtype

    def full(self, group) -> torch.Tensor:
        flat = torch.empty(self.padded, dtype=self.dtype, device=self.shard.device)
        comm.all_gather(flat, self.shard, group=group)
        return flat

    def view(self, flat, p) -> torch.Tensor:
        """Parameter `p`'s whole value inside the gathered `flat` vector."""
        offset = 0
        for q, shape in zip(self.params, self.shapes):
            n = math.prod(shape)
            if q is p:
                return flat[offset:offset + n].view(shape)
            offset += n
        raise KeyError("parameter not in this Init shard")


def _partition_module(module, group) -> None:
    own = [p for p in module._parameters.values() if p is not None and not hasattr(p, "ds_init")]
    if not own:
        return
    world, rank = comm.get_world_size(group), comm.get_rank(group)
    dtypes = {p.dtype for p in own}
    shard = _InitShard(own, world, rank, dtypes.pop() if len(dtypes) == 1 else torch.float32)
    flat = torch.zeros(shard.padded, dtype=shard.dtype, device=own[0].device)
    offset = 0
    for p in own:
        flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
        offset += p.numel()
    if world > 1:
        comm.broadcast(flat, src=comm.get_global_rank(group, 0), group=group)
    shard.shard = flat[rank * shard.chunk:(rank + 1) * shard.chunk].clone()
    for p in own:
        p.ds_init, p.ds_shape = shard, tuple(p.shape)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    module._ds_init_shard = shard
    Init.peak_bytes = max(Init.peak_bytes, flat.numel() * flat.element_size())


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


class Init:
    """Context manager: modules constructed inside are partitioned as they are built."""

    peak_bytes = 0  # the largest whole flat vector Init had to hold at once (one module's params)

    def __init__(self, module=None, data_parallel_group=None, enabled=True, **unused):
        if module is not None:
            raise TypeError("ds_lab's zero.Init does not take module=: converting a model that already "
                            "exists saves nothing, the whole model is in memory by then (stage 3 partitions "
                            "it anyway in initialize()). Build the model inside `with ds_lab.zero.Init():`")
        self.group, self.enabled, self.patched = data_parallel_group, enabled, []

    def __enter__(self):
        if not self.enabled:
            return self
        comm.init_distributed()
        for cls in [torch.nn.Module, *_all_subclasses(torch.nn.Module)]:
            if "__init__" in cls.__dict__:
                original = cls.__dict__["__init__"]
                cls.__init__ = self._wrap(original)
                self.patched.append((cls, original))
        return self

    def _wrap(self, original):
        group = self.group

        @functools.wraps(original)
        def init(module, *args, **kwargs):
            depth = getattr(module, "_ds_init_depth", 0)
            object.__setattr__(module, "_ds_init_depth", depth + 1)  # subclass inits call super()
            try:
                original(module, *args, **kwargs)
            finally:
                object.__setattr__(module, "_ds_init_depth", depth)
            if depth == 0:
                _partition_module(module, group)
        return init

    def __exit__(self, *exc):
        for cls, original in reversed(self.patched):
            cls.__init__ = original
        self.patched = []


def forget_init_shards(module) -> None:
    """Once stage 3 has cut its own units from them, the Init chunks are no longer needed."""
    for mod in module.modules():
        mod.__dict__.pop("_ds_init_shard", None)
        for p in mod._parameters.values():
            if p is not None and hasattr(p, "ds_init"):
                del p.ds_init


class GatheredParameters:
    """Gather whole parameters for the duration of the block. With `modifier_rank`, that rank's
    values are broadcast on exit and re-partitioned (the fp32 master chunks follow)."""

    def __init__(self, params, modifier_rank=None, enabled=True):
        self.params = [params] if isinstance(params, torch.nn.Parameter) else list(params)
        self.modifier_rank, self.enabled = modifier_rank, enabled

    def _units(self):
        zero = getattr(self.params[0], "ds_zero", None) if self.params else None
        if zero is None:
            return None, []
        units = []
        for p in self.params:
            unit = zero.unit_of[p]
            if unit not in units:
                units.append(unit)
        return zero, units

    def __enter__(self):
        if not self.enabled:
            return self
        self.zero, self.units = self._units()
        self.init_shards = []
        if self.zero is None:  # built under Init, no engine yet
            for p in self.params:
                shard = getattr(p, "ds_init", None)
                if shard is not None and shard not in self.init_shards:
                    self.init_shards.append(shard)
            for shard in self.init_shards:
                flat = shard.full(None)
                for q in shard.params:
                    q.data = shard.view(flat, q).clone()
        else:
            for unit in self.units:
                self.zero.gather(unit)
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return
        src = self.modifier_rank
        if self.zero is None:
            for shard in self.init_shards:
                flat = torch.zeros(shard.padded, dtype=shard.dtype)
                offset = 0
                for q in shard.params:
                    flat[offset:offset + q.numel()].copy_(q.detach().reshape(-1))
                    offset += q.numel()
                if src is not None and comm.get_world_size() > 1:
                    comm.broadcast(flat, src=src)
                shard.shard = flat[shard.rank * shard.chunk:(shard.rank + 1) * shard.chunk].clone()
                for q in shard.params:
                    q.data = torch.empty(0, dtype=q.dtype, device=q.device)
            return
        for unit in self.units:
            if src is not None:
                flat = unit.flatten([p.detach() for p in unit.params], self.zero.model_dtype)
                if comm.get_world_size(self.zero.dp_group) > 1:
                    comm.broadcast(flat, src=comm.get_global_rank(self.zero.dp_group, src), group=self.zero.dp_group)
                unit.shard.copy_(flat[unit.mine])
                self.zero.master_chunk(unit).copy_(flat[unit.mine].float())
                if unit.flat is not None:
                    unit.flat.copy_(flat)
            self.zero._release(unit)
