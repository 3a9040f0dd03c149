"""ZeRO stage 2: optimizer states and gradients are partitioned.        model states 2Ψ + (2+K)Ψ/N

What each of the N data-parallel ranks holds (mixed precision, Ψ parameters, K = 12):
    parameters   2Ψ     the whole model, in bf16/fp16
    gradients    2Ψ/N   only the averaged gradient of its own shard
    optimizer    12Ψ/N  its shard of fp32 master weights + Adam m + v

How the full gradient is never kept: during backward, each parameter's gradient is copied into
its bucket's ("unit", see `partition.py`) flat buffer the moment it is ready, and freed; when a
bucket is complete, one async reduce-scatter leaves each rank with the average of its own chunk,
which it adds to its gradient shard. Only the buckets being filled or in flight occupy full-size
gradient memory.

What crosses the wire per optimizer step (per rank, ring algorithm):
    reduce-scatter of the gradients   (N-1)/N x Ψ   (per micro-step: DeepSpeed's rule for stages
                                                      2 and 3, since no full gradient is kept to
                                                      accumulate in)
    all-gather of the new parameters  (N-1)/N x Ψ
  = 2(N-1)/N x Ψ with no gradient accumulation: the same as data parallel.
"""
from __future__ import annotations

import torch

from ds_lab import comm
from ds_lab.runtime.data_parallel import ReadyInOrder
from ds_lab.zero.partition import ZeroOptimizerBase


class ZeroStage2(ZeroOptimizerBase):
    stage = 2
    reduce_every_micro_step = True

    def attach(self) -> None:
        for unit in self.units:
            unit.flat = unit.flatten([p.detach() for p in unit.params], self.model_dtype)
            for p, view in zip(unit.params, unit.views(unit.flat)):
                p.data = view
        self.attach_gradient_shards(self.units)

    def attach_gradient_shards(self, backward_order: list) -> None:
        """Gradient shards, and a reduce-scatter per unit as soon as backward has its gradients."""
        self.grad_shards = [torch.zeros_like(m, dtype=self.model_dtype) for m in self.masters]
        self.pending, self.in_flight = [], []
        self.slot = {p: (unit, offset) for unit in self.units for p, offset in zip(unit.params, unit.offsets)}
        for unit in self.units:
            unit.bucket = None
        self.tracker = ReadyInOrder([u.params for u in backward_order],
                                    lambda i: self.reduce_unit(backward_order[i]), on_grad=self.take_grad)

    def take_grad(self, p) -> None:
        """A gradient is ready: copy it into its unit's flat bucket and free it at once, so a unit's
        gradients never exist twice (as DeepSpeed's contiguous bucket does)."""
        unit, offset = self.slot[p]
        if unit.bucket is None:
            unit.bucket = torch.zeros(unit.padded, dtype=self.model_dtype, device=self.device)
            self.in_flight.append(unit.bucket)
        unit.bucket[offset:offset + p.grad.numel()].copy_(p.grad.reshape(-1))
        p.grad = None

    def reduce_unit(self, unit) -> None:
        """Average the unit's gradients over the ranks, each rank receiving only its own chunk."""
        flat = unit.bucket if unit.bucket is not None else \
            torch.zeros(unit.padded, dtype=self.model_dtype, device=self.device)  # no gradient at all
        unit.bucket = None
        flat.div_(self.world_size)
        out = torch.empty(unit.chunk, dtype=self.model_dtype, device=self.device)
        with comm.tag("grad_reduce_scatter"):
            handle = comm.reduce_scatter(out, flat, group=self.dp_group, async_op=True)
        self.pending.append((unit, out, handle))

    def backward_start(self, boundary: bool) -> None:
        self.tracker.start()

    def backward_end(self, boundary: bool) -> None:
        self.tracker.flush()
        for unit, out, handle in self.pending:
            handle.wait()
            self.grad_chunk(unit).add_(out)  # accumulate over micro-steps, in the shard only
        self.pending, self.in_flight = [], []

    def grad_shard(self, group: int) -> torch.Tensor:
        return self.grad_shards[group]  # already laid out as the master shard: no concatenation

    def grad_chunk(self, unit) -> torch.Tensor:
        return self.grad_shards[unit.group][unit.shard_offset:unit.shard_offset + unit.chunk]

    def zero_grad(self) -> None:
        for shard in self.grad_shards:
            shard.zero_()

    def ledger_categories(self) -> dict:
        return dict(params=[u.flat for u in self.units], grads=list(self.grad_shards),
                    master_params=self.masters, buffers=list(self.in_flight))
