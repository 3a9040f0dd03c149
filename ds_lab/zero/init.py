"""zero.Init and GatheredParameters: build a model already partitioned; gather it on purpose.

    with ds_lab.zero.Init():            # every module, right after its own __init__, keeps only
        model = GPT(config)             # this rank's chunk of its parameters: the whole model never
                                        # exists on one rank (peak: the largest single module)
    engine, *_ = ds_lab.initialize(model=model, config={..., "zero_optimization": {"stage": 3}})

`Init` wraps the `__init__` of every `torch.nn.Module` subclass while it is active. When a module's
`__init__` returns, its own freshly created parameters are flattened, rank 0's values are broadcast
(so every rank agrees whatever its random state), and each rank keeps chunk r of the padded flat
vector; `param.data` becomes an empty tensor. The engine (stage 3) later turns these into its units.

A model that already exists can be partitioned the same way, as in DeepSpeed:
`ds_lab.zero.Init(module=model)` partitions every module's own parameters as if the model had been
built inside the context (children before their parent, as their `__init__`s return), so training
afterwards is the same. It saves no peak memory: the whole model already exists on every rank,
which is what building inside the context avoids.

    with ds_lab.zero.GatheredParameters(model.lm_head.weight, modifier_rank=0):
        if rank == 0:
            model.lm_head.weight.zero_()   # changed on rank 0, broadcast, re-partitioned on exit
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from ds_lab import comm
from ds_lab.config import DeepSpeedConfig


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


def _partition_module(module, group, dtype=None) -> None:
    own = [p for p in module._parameters.values() if p is not None and not hasattr(p, "ds_init")]
    if not own:
        return
    if dtype is not None:  # zero.Init(dtype=...): floating parameters are converted, as in DeepSpeed
        for p in own:
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
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


def _partition_built(module, group, dtype, seen: set) -> None:
    """Init(module=model): partition `module`'s tree in the order construction inside the context
    would have: each child (in registration order) before its parent; a module or parameter shared
    by two parents is partitioned once, by the first."""
    for child in module.children():
        if id(child) not in seen:
            seen.add(id(child))
            _partition_built(child, group, dtype, seen)
    _partition_module(module, group, dtype)


_DTYPES = (torch.half, torch.bfloat16, torch.float)


def _refuse_unsupported(**given) -> None:
    """zero.Init arguments DeepSpeed has and ds_lab does not: a value other than the default is refused."""
    why = {"pin_memory": "pinned CPU memory only speeds up offloading, which ds_lab does not do",
           "zero_param_parallel_group": "ZeRO++ hierarchical partitioning (hpZ) is not in ds_lab",
           "zero_quantized_weights": "ZeRO++ quantized weights (qwZ) are not in ds_lab",
           "zero_quantized_nontrainable_weights": "ZeRO++ quantized weights (qwZ) are not in ds_lab",
           "param_swapper": "NVMe parameter swapping is not in ds_lab",
           "tensor_overrides": "ds_lab's Init overrides nothing but the dtype (pass dtype=)"}
    remote_device = given.pop("remote_device")
    if remote_device not in (None, "none", "cpu"):
        raise ValueError(f"zero.Init(remote_device={remote_device!r}) is not supported by ds_lab (no offloading); "
                         f"use None, 'none' or 'cpu'")
    for name, value in given.items():
        if value not in (None, False):
            raise ValueError(f"zero.Init({name}=...) is not supported: {why[name]}; remove the argument")


def _resolve_dtype(dtype, config_dict_or_path, mpu, group):
    """The dtype Init converts parameters to: `dtype`, else the config's precision, else None (keep)."""
    if dtype is None and config_dict_or_path is not None:
        comm.init_distributed()  # as DeepSpeed's Init does; the config's batch sizes need the world size
        world_size = mpu.get_data_parallel_world_size() if mpu is not None else comm.get_world_size(group)
        precision = DeepSpeedConfig.from_any(config_dict_or_path, world_size=world_size).precision
        dtype = {"fp16": torch.half, "bf16": torch.bfloat16, "fp32": torch.float}[precision]
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"zero.Init(dtype={dtype}) must be one of torch.half, torch.bfloat16, torch.float")
    return dtype


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


class Init:
    """Context manager: modules constructed inside are partitioned as they are built.

    Takes DeepSpeed's arguments (deepspeed/runtime/zero/partition_parameters.py `Init`), and no
    others: an unknown keyword is a TypeError, as there. Honoured: data_parallel_group (or its
    deprecated alias sequence_data_parallel_group), enabled, dtype (floating parameters are
    converted to it: torch.half, torch.bfloat16 or torch.float), config_dict_or_path (or the
    deprecated config; its fp16/bf16 section picks the dtype when dtype is not given; mpu gives its
    data-parallel size), remote_device None/"none"/"cpu" (parameters stay where the module makes
    them), module (an already built model: partitioned at once, as if built in the context).
    Refused with a message: pin_memory=True, remote_device="nvme", ZeRO++
    (zero_param_parallel_group, zero_quantized_weights, zero_quantized_nontrainable_weights),
    param_swapper, tensor_overrides. mem_efficient_linear has nothing to switch in ds_lab (it never
    replaces torch.nn.functional.linear), so passing it warns.

    Departs from DeepSpeed: with neither dtype nor a config, parameters keep the dtype the module
    creates (DeepSpeed converts them to fp16); the engine casts them to the config's precision.
    """

    peak_bytes = 0  # the largest whole flat vector Init had to hold at once (one module's params)

    def __init__(self, module=None, data_parallel_group=None, mem_efficient_linear=None, remote_device=None,
                 pin_memory=False, config_dict_or_path=None, config=None, enabled=True, dtype=None, mpu=None,
                 zero_param_parallel_group=None, zero_quantized_weights=False,
                 zero_quantized_nontrainable_weights=False, sequence_data_parallel_group=None, param_swapper=None,
                 tensor_overrides=None):
        _refuse_unsupported(remote_device=remote_device, pin_memory=pin_memory,
                            zero_param_parallel_group=zero_param_parallel_group,
                            zero_quantized_weights=zero_quantized_weights,
                            zero_quantized_nontrainable_weights=zero_quantized_nontrainable_weights,
                            param_swapper=param_swapper, tensor_overrides=tensor_overrides)
        if mem_efficient_linear is not None:
            warnings.warn("zero.Init(mem_efficient_linear=...) has no effect in ds_lab: it never replaces "
                          "torch.nn.functional.linear (its stage 3 gathers whole modules); remove the argument",
                          stacklevel=2)
        if sequence_data_parallel_group is not None:  # as in DeepSpeed: a deprecated name for the same group
            if data_parallel_group is not None:
                raise ValueError("zero.Init got both data_parallel_group and sequence_data_parallel_group; "
                                 "pass only data_parallel_group")
            warnings.warn("zero.Init(sequence_data_parallel_group=) is deprecated (as in DeepSpeed); "
                          "use data_parallel_group=", DeprecationWarning, stacklevel=2)
            data_parallel_group = sequence_data_parallel_group
        if config is not None:
            if config_dict_or_path is not None:
                raise ValueError("zero.Init got both config and config_dict_or_path; pass only config_dict_or_path")
            warnings.warn("zero.Init(config=) is deprecated (as in DeepSpeed); use config_dict_or_path=",
                          DeprecationWarning, stacklevel=2)
            config_dict_or_path = config
        self.group, self.enabled, self.patched = data_parallel_group, enabled, []
        self.dtype = _resolve_dtype(dtype, config_dict_or_path, mpu, data_parallel_group)
        if module is not None and enabled:
            comm.init_distributed()
            _partition_built(module, data_parallel_group, self.dtype, seen={id(module)})

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
        group, dtype = self.group, self.dtype

        @functools.wraps(original)
        def init(module, *args, **kwargs):
            depth = getattr(module, "_ds_init_depth", 0)
            object.__setattr__(module, "_ds_init_depth", depth + 1)  # subclass inits call super()
            try:
                original(module, *args, **kwargs)
            finally:
                object.__setattr__(module, "_ds_init_depth", depth)
            if depth == 0:
                _partition_module(module, group, dtype)
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
    values are broadcast on exit and re-partitioned (the fp32 master chunks follow). Without it the
    block is read-only: an in-place change on any rank (seen, as DeepSpeed sees it, from the
    parameter's version counter or a new `.data`) is dropped on every rank and raises DeepSpeed's
    RuntimeError, so an edit never disappears silently."""

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
        self.versions = [(p, p.data.data_ptr(), p._version) for p in self.params]
        return self

    def _modified_anywhere(self, group) -> bool:
        """DeepSpeed's check (GatheredParameters._exit): did any rank change a parameter in place?"""
        local = any(p.data.data_ptr() != ptr or p._version != version for p, ptr, version in self.versions)
        if comm.get_world_size(group) == 1:
            return local
        flag = torch.tensor([int(local)], device=comm.device())
        comm.all_reduce(flag, op=comm.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def __exit__(self, *exc):
        if not self.enabled:
            return
        if self.zero is None and not self.init_shards:
            return  # no partitioned parameter among them: the block was a no-op, as in DeepSpeed
        src = self.modifier_rank
        group = self.zero.dp_group if self.zero is not None else None
        modified = src is None and exc[0] is None and self._modified_anywhere(group)
        self._repartition(src, restore=modified)
        if modified:
            raise RuntimeError("Detected in-place modification of ZeRO-3 parameters inside GatheredParameters with "
                               "modifier_rank=None. Use modifier_rank=<rank> to broadcast updates across ranks.")

    def _repartition(self, src, restore: bool = False) -> None:
        """Partition again: rank `src`'s values broadcast first, or (src None) the shards as they were;
        `restore`: a unit kept whole on every rank (persistent) is re-assembled from the shards too."""
        if self.zero is None:
            for shard in self.init_shards:
                if src is not None:  # read-only (src None): the shard is still what it was
                    flat = torch.zeros(shard.padded, dtype=shard.dtype)
                    offset = 0
                    for q in shard.params:
                        flat[offset:offset + q.numel()].copy_(q.detach().reshape(-1))
                        offset += q.numel()
                    if comm.get_world_size() > 1:
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
            elif restore and unit.flat is not None and getattr(unit, "persistent", False):
                self.zero.gather_into(unit, unit.shard.clone(), async_op=False)  # kept whole: re-assemble
            self.zero._release(unit)
