"""ZeRO stage 1: the optimizer states are partitioned.                model states 4Ψ + KΨ/N

What each of the N data-parallel ranks holds (mixed precision, Ψ parameters, K = 12):
    parameters   2Ψ     the whole model, in bf16/fp16, as in data parallel
    gradients    2Ψ     the whole gradient, accumulated locally over micro-steps
    optimizer    12Ψ/N  only its shard: fp32 master weights (4) + Adam m (4) + v (4)

What crosses the wire per optimizer step (per rank, ring algorithm, message Ψ elements):
    reduce-scatter of the gradients   (N-1)/N x Ψ     each rank gets the average of its shard
    all-gather of the new parameters  (N-1)/N x Ψ     each rank sends its updated shard to all
  = 2(N-1)/N x Ψ: exactly what data parallel's one all-reduce moves (an all-reduce *is* a
    reduce-scatter followed by an all-gather). ZeRO-1 saves memory at no extra traffic.

Only the boundary micro-step communicates (as in data parallel): gradients accumulate in the full
local buffer, then each bucket ("unit", see `partition.py`) is reduce-scattered as soon as its
gradients are ready, overlapping the rest of backward.

`data_types.grad_accum_dtype: "fp32"` with bf16/fp16 (DeepSpeed's BF16_Optimizer): each micro-step's
2-byte gradient is added into an fp32 buffer (2Ψ + 4Ψ of gradients), and at the boundary that fp32
sum is cast to the wire dtype, reduced and scaled as stage 0 does (engine.allreduce_bucket: the 1/N
after the sum by default), landing back in fp32.
"""
from __future__ import annotations

import torch

from ds_lab import comm
from ds_lab.runtime.grad_reduce import GradientReduction
from ds_lab.runtime.ready import ReadyInOrder
from ds_lab.zero.partition import ZeroOptimizerBase


class ZeroStage1(ZeroOptimizerBase):
    stage = 1
    reduction = GradientReduction()  # modes.py sets the config's wire dtype (runtime/grad_reduce.py)
    supports_no_sync = True  # the full local gradient accumulates until the next synchronising backward
    reduce_every_micro_step = False
    grad_accum_dtype = None  # data_types.grad_accum_dtype (modes.py); None: the model's dtype

    def attach(self) -> None:
        """Parameters and gradients become views into one flat vector per unit."""
        for unit in self.units:
            unit.flat = unit.flatten([p.detach() for p in unit.params], self.model_dtype)
            unit.grad_flat = torch.zeros(unit.padded, dtype=self.model_dtype, device=self.device)
            unit.accum = torch.zeros(unit.padded, dtype=self.grad_accum_dtype, device=self.device) \
                if self.grad_accum_dtype not in (None, self.model_dtype) else None  # the fp32 sum
            for p, view, grad in zip(unit.params, unit.views(unit.flat), unit.views(unit.grad_flat)):
                p.data, p.grad = view, grad
        self.grad_view = {p: p.grad for p in (q for u in self.units for q in u.params)}
        self.pending = []
        self.tracker = ReadyInOrder([u.params for u in self.units], self._reduce, self._reattach,
                                    names=self.param_names())

    def _reattach(self, p) -> None:
        view = self.grad_view[p]
        if p.grad is not view:  # .grad was set to None by someone: put it back into the buffer
            view.copy_(p.grad)
            p.grad = view

    def _reduce(self, index: int) -> None:
        unit = self.units[index]
        if unit.accum is not None:  # BF16_Optimizer: the fp32 sum goes out as stage 0 sends it
            self._accumulate(unit)
            wire = self.reduction.before_all_reduce(unit.accum, self.world_size)
        else:
            wire = self.reduction.before_reduce_scatter(unit.grad_flat, self.world_size)  # cast, / N
        out = torch.empty(unit.chunk, dtype=wire.dtype, device=self.device)
        with comm.tag("grad_reduce_scatter"):
            handle = comm.reduce_scatter(out, wire, group=self.dp_group, async_op=True)
        self.pending.append((unit, out, handle))

    def backward_start(self, boundary: bool) -> None:
        if boundary:
            self.tracker.start()

    def backward_end(self, boundary: bool) -> None:
        if not boundary:
            for unit in (u for u in self.units if u.accum is not None):
                self._accumulate(unit)
            return
        self.tracker.flush()
        for unit, out, handle in self.pending:
            handle.wait()
            if unit.accum is not None:  # post-scaled, cast back into the fp32 chunk
                self.reduction.after_all_reduce(out, unit.accum[unit.mine], self.world_size)
            else:
                unit.grad_flat[unit.mine].copy_(out)  # the averaged shard lands in this rank's own chunk
        self.pending = []

    @staticmethod
    def _accumulate(unit) -> None:
        """This micro-step's 2-byte gradient joins the fp32 sum (BF16_Optimizer.update_hp_grads)."""
        unit.accum.add_(unit.grad_flat)
        unit.grad_flat.zero_()

    def grad_chunk(self, unit) -> torch.Tensor:
        return (unit.grad_flat if unit.accum is None else unit.accum)[unit.mine]

    def zero_grad(self) -> None:
        for unit in self.units:
            unit.grad_flat.zero_()
            if unit.accum is not None:
                unit.accum.zero_()

    def ledger_categories(self) -> dict:
        return dict(params=[u.flat for u in self.units],
                    grads=[u.grad_flat for u in self.units] + [u.accum for u in self.units if u.accum is not None],
                    master_params=self.masters)

    def detach(self) -> None:
        """Hooks off; every parameter its own whole tensor again (out of the flat vector), no gradient."""
        self.tracker.remove()
        for unit in self.units:
            for p in unit.params:
                p.data, p.grad = p.data.clone(), None
            unit.flat = unit.grad_flat = unit.accum = None
