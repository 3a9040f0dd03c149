"""ZeRO stage 2: optimizer states and gradients are partitioned.        model states 2Ψ + (2+K)Ψ/N

What each of the N data-parallel ranks holds (mixed precision, Ψ parameters, K = 12):
    parameters   2Ψ     the whole model, in bf16/fp16
    gradients    2Ψ/N   only the averaged gradient of its own shard
    optimizer    12Ψ/N  its shard of fp32 master weights + Adam m + v

How the full gradient is never kept: during backward, each parameter's gradient is added into
its bucket's ("unit", see `partition.py`) flat buffer the moment it is ready, and freed; when a
bucket is complete, one async reduce-scatter leaves each rank with the average of its own chunk,
which it adds to its gradient shard. Only the buckets being filled or in flight occupy full-size
gradient memory. Under reentrant activation checkpointing a gradient can arrive in several parts
(one per segment that uses the parameter): they are added up, and a part that comes after its
bucket was sent is reduced again on its own (`runtime/ready.py`).

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
from ds_lab.runtime.grad_reduce import GradientReduction
from ds_lab.runtime.ready import ReadyInOrder
from ds_lab.zero.partition import ZeroOptimizerBase


def coalesce(units: list, bucket_size: int) -> list:
    """Consecutive units (in backward order) packed into buckets of at most `bucket_size` elements
    (a unit larger than that is a bucket of its own): one reduce-scatter per bucket."""
    buckets, size = [], 0
    for unit in units:
        if not buckets or size + unit.padded > bucket_size:
            buckets.append([])
            size = 0
        buckets[-1].append(unit)
        size += unit.padded
    return buckets


class ZeroStage2(ZeroOptimizerBase):
    stage = 2
    reduction = GradientReduction()  # modes.py sets the config's wire dtype (runtime/grad_reduce.py)
    reduce_every_micro_step = True
    grad_accum_dtype = None  # data_types.grad_accum_dtype (modes.py): the shards' dtype; None: the model's
    # units sent together in one reduce-scatter, up to this many elements; stage 2's units already are
    # `reduce_bucket_size` buckets (partition.py), stage 3's are modules and get coalesced (stage3.py)
    reduce_bucket_size = 0
    max_in_flight = 2  # reduce-scatters sent and not yet added into the shard (see `retire`)

    def attach(self) -> None:
        for unit in self.units:
            unit.flat = unit.flatten([p.detach() for p in unit.params], self.model_dtype)
            for p, view in zip(unit.params, unit.views(unit.flat)):
                p.data = view
        self.attach_gradient_shards(self.units)

    def attach_gradient_shards(self, backward_order: list) -> None:
        """Gradient shards, and a reduce-scatter per bucket of units as soon as backward has their gradients."""
        accum_dtype = self.grad_accum_dtype or self.model_dtype  # fp32: each averaged micro-step is added in fp32
        self.grad_shards = [torch.zeros_like(m, dtype=accum_dtype, device=self.device) for m in self.masters]
        self.pending, self.in_flight = [], {}
        self.slot = {p: (unit, offset) for unit in self.units for p, offset in zip(unit.params, unit.offsets)}
        self.buckets = coalesce(backward_order, self.reduce_bucket_size)
        self.bucket_ending_with = {bucket[-1]: bucket for bucket in self.buckets}
        for unit in self.units:
            unit.bucket, unit.reduced = None, False
        # a late gradient (one more than the first backward had, see runtime/ready.py) is reduced again
        # on its own: reduce-scatter is linear, and backward_end adds every result into the shard
        self.tracker = ReadyInOrder([u.params for u in backward_order], lambda i: self.unit_ready(backward_order[i]),
                                    on_grad=self.take_grad, relaunch_late=True, names=self.param_names())

    def take_grad(self, p) -> None:
        """A gradient is ready: add it into its unit's flat bucket and free it at once, so a unit's
        gradients never exist twice (as DeepSpeed's contiguous bucket does). Added, not copied: under
        reentrant checkpointing a parameter's gradient can arrive in several parts."""
        unit, offset = self.slot[p]
        if unit.bucket is None:
            unit.bucket = torch.zeros(unit.padded, dtype=self.model_dtype, device=self.device)
            self.in_flight[id(unit.bucket)] = unit.bucket
        unit.bucket[offset:offset + p.grad.numel()].add_(p.grad.reshape(-1))
        p.grad = None

    def unit_ready(self, unit) -> None:
        """All of the unit's gradients are in: send its bucket of units once the last of them is."""
        if unit.reduced:  # a late gradient, after the unit was sent: reduced on its own
            if unit.bucket is not None:
                self.reduce([unit])
            return
        unit.reduced = True
        bucket = self.bucket_ending_with.get(unit)
        if bucket is not None:
            self.reduce(bucket)

    def reduce(self, units: list) -> None:
        """Average the units' gradients over the ranks in one reduce-scatter, each rank receiving only
        its own chunk of each. Several units go as one tensor laid out rank by rank
        [u1 chunk 0 | u2 chunk 0 | ... | u1 chunk 1 | u2 chunk 1 | ...], so rank r receives
        [u1 chunk r | u2 chunk r | ...]."""
        flats = [u.bucket if u.bucket is not None else  # no gradient at all: zeros
                 torch.zeros(u.padded, dtype=self.model_dtype, device=self.device) for u in units]
        for u in units:
            if u.bucket is not None:
                del self.in_flight[id(u.bucket)]
            u.bucket = None
        flat = flats[0] if len(units) == 1 else torch.cat([f.view(self.world_size, -1) for f in flats], dim=1).view(-1)
        self.retire()
        flat = self.reduction.before_reduce_scatter(flat, self.world_size)  # cast to the wire dtype, / N
        self.in_flight[id(flat)] = flat
        out = torch.empty(sum(u.chunk for u in units), dtype=flat.dtype, device=self.device)
        with comm.tag("grad_reduce_scatter"):
            handle = comm.reduce_scatter(out, flat, group=self.dp_group, async_op=True)
        self.pending.append((units, out, handle, flat))

    def retire(self, wait: bool = False) -> None:
        """Add the results of finished reduce-scatters into the gradient shard and free their buckets,
        so only a few buckets ever exist: at most `max_in_flight` are sent and not yet retired (the
        oldest is waited for to make room, as DeepSpeed alternates its two reduce buckets; gloo cannot
        say whether a reduce-scatter has finished, NCCL can). `wait`: retire all. In launch order,
        so the additions happen in the same order on every run."""
        while self.pending and (wait or len(self.pending) >= self.max_in_flight
                                or self.pending[0][2].is_completed()):
            units, out, handle, flat = self.pending.pop(0)
            handle.wait()
            for unit, part in zip(units, out.split([u.chunk for u in units])):
                self.grad_chunk(unit).add_(part)  # accumulate over micro-steps, in the shard only
            del self.in_flight[id(flat)]

    def backward_start(self, boundary: bool) -> None:
        for unit in self.units:
            unit.reduced = False
        self.tracker.start()

    def backward_end(self, boundary: bool) -> None:
        self.tracker.flush()
        self.retire(wait=True)

    def grad_shard(self, group: int) -> torch.Tensor:
        return self.grad_shards[group]  # already laid out as the master shard: no concatenation

    def grad_chunk(self, unit) -> torch.Tensor:
        return self.grad_shards[unit.group][unit.shard_offset:unit.shard_offset + unit.chunk]

    def zero_grad(self) -> None:
        for shard in self.grad_shards:
            shard.zero_()

    def ledger_categories(self) -> dict:
        return dict(params=[u.flat for u in self.units], grads=list(self.grad_shards),
                    master_params=self.masters, buffers=list(self.in_flight.values()))

    def detach(self) -> None:
        """Hooks off; every parameter its own whole tensor again (out of the flat vector), no gradient."""
        self.tracker.remove()
        for unit in self.units:
            for p in unit.params:
                p.data, p.grad = p.data.clone(), None
            unit.flat = None
