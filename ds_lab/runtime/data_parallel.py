"""Data parallel gradient averaging: one flat buffer, buckets, all-reduce overlapped with backward.

Every rank holds the whole model and computes gradients on its own slice of the global batch;
averaging the gradients over the N ranks gives exactly the gradient of the whole batch:

    g = 1/N * sum_r g_r                  (each g_r is the mean over that rank's B samples)

Wire: one all-reduce of all gradient bytes per optimizer step. Per rank, a ring all-reduce sends
2(N-1)/N x (gradient bytes), the ZeRO paper's "2Ψ".

How (the same idea as torch DDP):
- All gradients live in one flat buffer; each `param.grad` is a view into it, so autograd
  accumulates straight into the buffer and the all-reduce runs in place (no copies, and the
  ledger's grads = exactly Ψ x bytes per element).
- The buffer is laid out in *reverse* parameter order (backward produces the last layer's
  gradients first) and cut into buckets of `bucket_size` elements.
- A post-accumulate-grad hook on every parameter counts the bucket's ready gradients; when a
  bucket is complete its async all-reduce starts while backward goes on computing the earlier
  layers (overlap). Buckets are always launched in bucket order, so every rank issues its
  collectives in the same order.
- With gradient accumulation, only the boundary micro-step communicates (DeepSpeed's stage-0
  rule); earlier micro-steps just accumulate into the buffer.
- `overlap=False` waits for the end of backward, then reduces bucket by bucket: the naive
  schedule, kept so the chapter can measure what overlap buys.
"""
from __future__ import annotations

import torch

from ds_lab import comm


class ReadyInOrder:
    """Calls `on_ready(i)` for unit i as soon as every parameter of units 0..i has its gradient.

    A post-accumulate-grad hook on each parameter counts its unit's ready gradients. Units are
    released strictly in order, so every rank issues its collectives in the same order (the
    order is a property of the model, not of timing). Used by data parallel and by ZeRO 1-3.
    """

    def __init__(self, units: list, on_ready, on_grad=None):
        self.units, self.on_ready, self.on_grad = units, on_ready, on_grad
        self.unit_of = {p: i for i, params in enumerate(units) for p in params}
        self.ready = [0] * len(units)
        self.next, self.active = 0, False
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook) for p in self.unit_of]

    def _hook(self, p) -> None:
        if self.on_grad is not None:
            self.on_grad(p)
        if not self.active:
            return
        self.ready[self.unit_of[p]] += 1
        while self.next < len(self.units) and self.ready[self.next] == len(self.units[self.next]):
            self.next += 1
            self.on_ready(self.next - 1)

    def start(self) -> None:
        self.ready, self.next, self.active = [0] * len(self.units), 0, True

    def flush(self) -> None:
        """End of backward: release the units still waiting (parameters that got no gradient)."""
        while self.next < len(self.units):
            self.next += 1
            self.on_ready(self.next - 1)
        self.active = False

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


class BucketedAllReduce:
    def __init__(self, params, bucket_size: int, group=None, overlap: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.group, self.overlap = group, overlap
        self.world_size = comm.get_world_size(group)
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise TypeError(f"data parallel needs one parameter dtype, got {sorted(map(str, dtypes))}")
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.buffer = torch.zeros(total, dtype=dtypes.pop() if dtypes else torch.float32, device=device)
        self.views, self.buckets, buckets = {}, [], []  # buckets: (start, end) in the buffer
        offset, start = 0, 0
        for p in reversed(self.params):
            if not buckets or offset - start >= bucket_size:
                buckets.append([])
                start = offset
                self.buckets.append([offset, offset])
            self.views[p] = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            self.buckets[-1][1] = offset
            buckets[-1].append(p)
            p.grad = self.views[p]
        self.handles = []
        self.tracker = ReadyInOrder(buckets, self._launch if overlap else (lambda i: None), self._reattach)
        self.deferred = not overlap

    def _reattach(self, p) -> None:
        view = self.views[p]
        if p.grad is not view:  # someone set .grad to None (e.g. optimizer.zero_grad()): re-attach
            view.copy_(p.grad)
            p.grad = view

    def _launch(self, index: int, async_op: bool = True) -> None:
        if self.world_size == 1:
            return
        start, end = self.buckets[index]
        flat = self.buffer[start:end]
        flat.div_(self.world_size)  # average = sum of (g_r / N): pre-divide to keep fp16 in range
        with comm.tag("grad_allreduce"):
            handle = comm.all_reduce(flat, group=self.group, async_op=async_op)
        if handle is not None:
            self.handles.append(handle)

    # ---- called by the engine -----------------------------------------------------------------
    def backward_start(self, boundary: bool) -> None:
        """Before backward: only the boundary micro-step communicates."""
        if boundary:
            self.handles = []
            self.tracker.start()

    def backward_end(self, boundary: bool) -> None:
        if boundary:
            self.finish()

    def finish(self) -> None:
        """After the boundary backward: reduce what is left (unused parameters, or everything
        when overlap is off), then wait until every bucket has arrived."""
        self.tracker.flush()
        if self.deferred:  # the naive schedule: all communication after backward, one by one
            for index in range(len(self.buckets)):
                self._launch(index, async_op=False)
        for handle in self.handles:
            handle.wait()
        self.handles = []

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for p, view in self.views.items():
            p.grad = view

    def remove(self) -> None:
        self.tracker.remove()
