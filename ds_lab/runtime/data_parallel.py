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


class _Bucket:
    def __init__(self, index, start):
        self.index, self.start, self.end, self.params, self.ready = index, start, start, [], 0


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
        self.views, self.bucket_of, self.buckets = {}, {}, []
        offset, bucket = 0, None
        for p in reversed(self.params):
            if bucket is None or bucket.end - bucket.start >= bucket_size:
                bucket = _Bucket(len(self.buckets), offset)
                self.buckets.append(bucket)
            view = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            bucket.end = offset
            bucket.params.append(p)
            self.views[p], self.bucket_of[p] = view, bucket
            p.grad = view
        self.active = False  # set by the engine for the boundary micro-step's backward
        self.handles, self.next_bucket = [], 0
        self.hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params]

    # ---- called by autograd -------------------------------------------------------------------
    def _on_grad_ready(self, p) -> None:
        view = self.views[p]
        if p.grad is not view:  # someone set .grad to None (e.g. optimizer.zero_grad()): re-attach
            view.copy_(p.grad)
            p.grad = view
        if not (self.active and self.overlap):
            return
        bucket = self.bucket_of[p]
        bucket.ready += 1
        while self.next_bucket < len(self.buckets) and \
                self.buckets[self.next_bucket].ready == len(self.buckets[self.next_bucket].params):
            self._launch(self.buckets[self.next_bucket], async_op=True)

    def _launch(self, bucket, async_op: bool) -> None:
        flat = self.buffer[bucket.start:bucket.end]
        self.next_bucket = bucket.index + 1
        if self.world_size == 1:
            return
        flat.div_(self.world_size)  # average = sum of (g_r / N): pre-divide to keep fp16 in range
        with comm.tag("grad_allreduce"):
            handle = comm.all_reduce(flat, group=self.group, async_op=async_op)
        if handle is not None:
            self.handles.append(handle)

    # ---- called by the engine -----------------------------------------------------------------
    def start(self) -> None:
        """Before the boundary micro-step's backward."""
        self.active, self.next_bucket, self.handles = True, 0, []
        for bucket in self.buckets:
            bucket.ready = 0

    def finish(self) -> None:
        """After the boundary backward: reduce what is left (unused parameters, or everything
        when overlap is off), then wait until every bucket has arrived."""
        for bucket in self.buckets[self.next_bucket:]:
            self._launch(bucket, async_op=False)
        for handle in self.handles:
            handle.wait()
        self.active, self.handles = False, []

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for p, view in self.views.items():
            p.grad = view

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
