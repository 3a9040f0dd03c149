"""The per-rank memory ledger: bytes by category, counted from tensors that really exist.

Nothing here is estimated. Each category is a list of live tensors; a tensor's bytes are those of
its *storage* (so a view of a flat buffer counts the buffer, once), and a storage already counted
in an earlier category is not counted again. Categories, in counting order:

    params            the model's parameters (fp32, or bf16/fp16 in mixed precision)
    grads             gradients (for data parallel: the flat buffer the buckets reduce in place)
    master_params     fp32 master weights (mixed precision only)
    optimizer_states  the optimizer's state tensors (Adam: m and v)
    buffers           model buffers and communication scratch space
    activations_peak  peak bytes of tensors autograd saved for backward during the last forward
                      and backward (via saved-tensor hooks), parameters excluded

On CUDA the report adds the caching allocator's own figures, which include what PyTorch
allocates that no category above names (workspace, fragmentation).

Placement: each category's bytes are also split into `host` and `device` (`Ledger.placement`), by
where the mode *designates* each tensor to live: ZeRO-Offload keeps the optimizer (and at stage 3
the parameter chunks) in host memory (`ds_lab/zero/offload.py`). On a machine without a GPU the
device is the CPU too, so a tensor's `.device` cannot tell; the mode's list of host tensors does.
"""
from __future__ import annotations

import torch

CATEGORIES = ("params", "grads", "master_params", "optimizer_states", "buffers")


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (s.data_ptr(), t.device), s.nbytes()


def storage_key(t: torch.Tensor):
    """What identifies a tensor's memory: two views of one buffer share it."""
    return _storage_key(t)[0]


def storage_bytes(tensors, seen: set | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (skipping those already in `seen`)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.is_meta:
            continue
        key, nbytes = _storage_key(t)
        if key[0] == 0 or key in seen:  # empty storages have data_ptr 0
            continue
        seen.add(key)
        total += nbytes
    return total


class Ledger(dict):
    """{category: bytes}, and `.placement`: {category: {"host": bytes, "device": bytes}}."""

    placement: dict


def ledger(categories: dict, host=()) -> Ledger:
    """{category: iterable of tensors} -> {category: bytes}, deduplicated across categories.
    `host`: the tensors designated to live in host memory; the rest are on the device."""
    host_keys = {_storage_key(t)[0] for t in host if isinstance(t, torch.Tensor) and not t.is_meta}
    seen: set = set()
    out = Ledger()
    out.placement = {}
    for name, tensors in categories.items():
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        on_host = storage_bytes([t for t in tensors if not t.is_meta and _storage_key(t)[0] in host_keys], seen)
        out[name] = on_host + storage_bytes(tensors, seen)
        out.placement[name] = {"host": on_host, "device": out[name] - on_host}
    return out


def optimizer_state_tensors(optimizer) -> list:
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def cuda_allocator(device) -> dict:
    if device.type != "cuda":
        return {}
    return dict(allocated=torch.cuda.memory_allocated(device),
                max_allocated=torch.cuda.max_memory_allocated(device),
                reserved=torch.cuda.memory_reserved(device))


class _Saved:
    """What the pack hook hands autograd: the tensor plus a token whose death releases its bytes."""

    __slots__ = ("tensor", "tracker", "key", "__weakref__")

    def __init__(self, tensor, tracker, key):
        self.tensor, self.tracker, self.key = tensor, tracker, key

    def __del__(self):
        self.tracker._release(self.key)


class ActivationTracker:
    """Counts the bytes autograd saves for backward, live and peak, deduplicated by storage.

    Use as `with tracker.track(): out = model(x)`; saved tensors are released when the graph is
    freed (after backward), which is when their bytes leave the count.
    """

    def __init__(self, exclude=(), live_param_storages=None):
        self.exclude_tensors = list(exclude)
        self.live_param_storages = live_param_storages if live_param_storages is not None else set()
        self.refs: dict = {}
        self.sizes: dict = {}
        self.live = 0
        self.peak = 0

    def _excluded(self) -> set:
        return {_storage_key(t)[0] for t in self.exclude_tensors}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _pack(self, t):
        if not isinstance(t, torch.Tensor) or isinstance(t, torch.nn.Parameter) or t.is_meta \
                or t.layout != torch.strided:
            return t  # parameters are counted as parameters, not as activations
        key, nbytes = _storage_key(t)
        if key in self._skip or key in self.live_param_storages:
            return t  # a view of a parameter (e.g. a transposed weight) is not an activation
        if self.refs.get(key, 0) == 0:
            self.sizes[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def track(self):
        self._skip = self._excluded()
        self.reset_peak()
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
