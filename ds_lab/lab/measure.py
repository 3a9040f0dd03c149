"""Measurements that do not ask the engine: what exists on a rank, counted from the tensors themselves.

The engine's ledger (`engine.memory_report()`) counts the tensors the engine says it holds. The
chapters and tests check claims against something the engine cannot bend:

    tensor_census()        every tensor alive in this process (found by the garbage collector),
                           bytes by dtype, each storage once: a leaked or forgotten buffer shows up
    padded_sizes(...)      the paper's Ψ, padded the way a partitioned unit is (to a multiple of N),
                           computed from the model's modules, not from the engine's units
    bucket_sizes(...)      the gradient buckets, predicted from the parameters and the bucket size
    WholeParameterProbe    hooks of our own that sample, during forward and backward, the bytes of
                           whole (gathered) parameters that exist at that moment
    ConstructionProbe      samples the census while a model is being built (zero.Init or not)

A census sees the tensors Python objects hold. After `engine.step()` that is everything the engine
keeps (nothing is left inside an autograd graph), which is when the chapters take it. It also sees
what a forked rank inherited from its parent (a notebook's own tensors): `census_since` subtracts
a census taken when the rank started.
"""
from __future__ import annotations

import gc
import math
import time
import warnings

import torch


def _storages(tensors):
    for t in tensors:
        yield t
        if t.is_leaf and t.grad is not None:  # .grad of a non-leaf would only warn
            yield t.grad


def tensor_census(dtypes=None, collect=True) -> dict:
    """{dtype name: bytes} of every tensor alive in this process, each storage counted once.

    dtypes: keep only these (e.g. `(torch.bfloat16, torch.float32)`); names are like "bfloat16".
    collect: first free what only reference cycles keep alive (slower; skip it when sampling often)."""
    if collect:
        gc.collect()
    wanted = None if dtypes is None else set(dtypes)
    seen, out = set(), {}
    # torch._C.TensorBase: a plain C type, so isinstance is fast (torch.Tensor's metaclass is not)
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated reduce_op warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [o for o in gc.get_objects() if isinstance(o, torch._C.TensorBase)]
    for t in _storages(tensors):
        if t.is_meta or t.layout != torch.strided or (wanted is not None and t.dtype not in wanted):
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key[0] == 0 or key in seen:  # an empty tensor has no storage
            continue
        seen.add(key)
        name = str(t.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + storage.nbytes()
    return out


def census_since(before: dict, dtypes=None, settle_s: float = 1.0) -> dict:
    """What a census gained since `before` (an earlier census): the tensors this code created.
    A forked rank starts with a copy of its parent's objects (a notebook's models and batches);
    subtracting the census taken when the rank started leaves out what it inherited.

    A collective's temporary buffer can outlive the op by a moment: the backend's thread drops its
    last reference just after the op completes. So the census is taken again, 10 ms later, until two
    in a row agree (for at most `settle_s` seconds)."""
    now = tensor_census(dtypes)
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now, previous = tensor_census(dtypes), now
        if now == previous:
            break
    return {name: now.get(name, 0) - before.get(name, 0) for name in sorted(set(now) | set(before))
            if now.get(name, 0) != before.get(name, 0)}


def own_parameter_counts(model: torch.nn.Module) -> dict:
    """{module name: elements of the parameters it registers itself}, for modules that have any.
    Under ZeRO-3 each of these is one unit; under zero.Init, one flat vector while it is built."""
    counts = {}
    for name, module in model.named_modules():
        n = sum(p.numel() for p in module.parameters(recurse=False))
        if n:
            counts[name] = n
    return counts


def padded(numel: int, world_size: int) -> int:
    """`numel` rounded up to a multiple of N: what a partitioned unit occupies (N equal chunks)."""
    return math.ceil(numel / world_size) * world_size


def padded_sizes(model: torch.nn.Module, world_size: int) -> dict:
    """Each module's own parameters, padded to a multiple of N (ZeRO-3's units, zero.Init's vectors)."""
    return {name: padded(n, world_size) for name, n in own_parameter_counts(model).items()}


def bucket_sizes(model: torch.nn.Module, bucket_size: int) -> list:
    """The gradient buckets of data parallel and ZeRO-1/2, predicted from the model alone: walk the
    parameters in reverse (the order backward produces them) and close a bucket once it holds
    `bucket_size` elements. Elements per bucket, in the order they are sent."""
    buckets = []
    for p in reversed(list(model.parameters())):
        if not buckets or buckets[-1] >= bucket_size:
            buckets.append(0)
        buckets[-1] += p.numel()
    return buckets


def _whole_parameter_bytes(model) -> int:
    """Bytes of the distinct storages behind parameters that hold their whole value right now."""
    seen, total = set(), 0
    for p in model.parameters():
        shape = getattr(p, "ds_shape", tuple(p.shape))
        if p.numel() == 0 or tuple(p.shape) != tuple(shape):
            continue  # released (empty) or a chunk
        storage = p.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class WholeParameterProbe:
    """Samples the bytes of whole parameters at every module's forward (before and after) and at
    every gradient's arrival. Register it *after* `ds_lab.initialize`, so that its forward
    pre-hooks run after the engine's gathers and its post-hooks after the engine's releases.

    It sees the parameters a module is using, not buffers still in flight (a prefetch); for
    those, `first_module_done` holds, per forward, the time the first module finished: compare
    it with the start times of the all-gathers in the comm log."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.peak, self.samples, self.first_module_done = model, 0, 0, []
        self.handles = [model.register_forward_pre_hook(lambda m, args: self.first_module_done.append(None))]
        for module in model.modules():
            self.handles.append(module.register_forward_pre_hook(lambda m, args: self.sample()))
            self.handles.append(module.register_forward_hook(lambda m, args, out: self._done()))
        for p in model.parameters():
            self.handles.append(p.register_post_accumulate_grad_hook(lambda p: self.sample()))

    def sample(self) -> None:
        self.samples += 1
        self.peak = max(self.peak, _whole_parameter_bytes(self.model))

    def _done(self) -> None:
        if self.first_module_done and self.first_module_done[-1] is None:
            self.first_module_done[-1] = time.time()
        self.sample()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ConstructionProbe:
    """`with ConstructionProbe(dtypes) as probe: model = Model()`: the census of `dtypes`, sampled
    each time a module registers a parameter (that is, while each module is being built).
    `probe.peak` is the largest sample above what existed before the block; `probe.after`, what
    the block kept. The samples are taken as parameters are registered, so they miss one moment
    per module: when zero.Init holds the module's flat vector beside its fresh tensors (at most one
    module more than they show)."""

    def __init__(self, dtypes=(torch.float32,)):
        self.dtypes, self.peak, self.samples = tuple(dtypes), 0, 0

    def _total(self) -> int:
        return sum(tensor_census(self.dtypes, collect=False).values())

    def _sample(self, module, name, param):
        self.samples += 1
        self.peak = max(self.peak, self._total() - self.baseline)

    def __enter__(self):
        self.baseline = sum(tensor_census(self.dtypes).values())  # collected: no earlier garbage in it
        self.handle = torch.nn.modules.module.register_module_parameter_registration_hook(self._sample)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        # what the block kept: collected first, so garbage waiting in a reference cycle is not counted
        self.after = sum(tensor_census(self.dtypes).values()) - self.baseline
