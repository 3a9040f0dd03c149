"""The one seam between the engine and a parallel mode: what differs between data parallel (stage 0),
ZeRO-1/2/3 — and what 1-bit Adam or a tensor-parallel variant implements next.

The engine runs one path for every mode:

    backward_start(boundary)  ->  loss.backward()  ->  backward_end(boundary)    where gradients go
    step(loss_scale, clip, check_overflow)                                        the optimizer step
    zero_grad(), ledger_categories(), model_state(), shard_state(), load(...)     bookkeeping

and a mode is a subclass of `GradientMode`. The optimizer step is written once, here:

    1. overflow (fp16): any inf/nan in the gradients any rank owns -> one all-reduce(MAX) of a flag
       over the whole grid, so every rank skips together
    2. fp32 master gradients (`prepare_master_grads`, the mode knows where its gradients live)
    3. the global gradient norm, counting every parameter exactly once over the grid (below)
    4. unscale (fp16) and clip by that norm, as `torch.nn.utils.clip_grad_norm_` computes it
    5. the optimizer updates the fp32 masters; `publish_params` brings the model up to date

The global norm. A rank holds some gradient pieces; each piece is either split across an axis of
the grid (ZeRO shards over `data`, tensor-parallel shards over `model`, pipeline stages over `pipe`)
or replicated along it (data parallel's full gradient over `data`; a LayerNorm weight over `model`).
    ||g||^2 = sum over ranks of the squares of the pieces the rank is the *owner* of
where a rank owns a replicated piece only at coordinate 0 of every axis it is replicated on. When
nothing is split (plain data parallel), every rank already holds everything: no collective at all.
"""
from __future__ import annotations

import torch

from ds_lab import comm
from ds_lab.runtime.precision import has_overflow


def param_shape(p) -> tuple:
    """A parameter's real shape, also when ZeRO-3 left only an empty tensor in it."""
    return getattr(p, "ds_shape", tuple(p.shape))


def is_model_parallel(p) -> bool:
    """Megatron's attribute: the parameter is a tensor-parallel shard (split over the model axis)."""
    return bool(getattr(p, "tensor_model_parallel", False))


def copies_along(p) -> tuple:
    """The grid axes along which a parameter (not ZeRO-partitioned) has identical copies: always data;
    model unless it is a tensor-parallel shard; pipe when it is tied across pipeline stages
    (`pipe_tied`, e.g. an embedding shared by the first and last stage)."""
    return ("data",) + (() if is_model_parallel(p) else ("model",)) + \
        (("pipe",) if getattr(p, "pipe_tied", False) else ())


class GradientMode:
    """How gradients are synchronised and the optimizer is stepped. Subclasses: see module docstring."""

    name = "mode"
    stage = 0  # DeepSpeed's ZeRO stage number, for checkpoints and reports
    split_axes: tuple = ()  # grid axes over which this mode partitions gradients (ZeRO: "data")
    zero_optimizer = None  # a ZeRO mode is its own ZeRO optimizer (engine.zero_optimizer)
    supports_no_sync = False  # True: a full local gradient exists to accumulate in (engine.no_sync)
    # DeepSpeed's loss scaler behaves differently at stage 0 and under ZeRO (runtime/precision.py)
    loss_scaler_options: dict = {}

    def __init__(self, grid, device):
        self.grid, self.device = grid, device
        self.dp_group = grid.group("data")
        self.world_size, self.rank = grid.size("data"), grid.rank_in("data")
        self.optimizer = None  # bound by the engine, over `self.masters`
        self.masters: list = []  # what the optimizer steps: fp32 tensors, one list entry per param group
        self.grad_norm = None
        self.transient: list = []  # short-lived communication buffers, for the peak ledger

    @staticmethod
    def probe(moment: str) -> None:
        """Called at the mode's own moments of peak memory; the engine sets it to sample its ledger."""

    # ---- what each mode implements -----------------------------------------------------------------
    def optimizer_params(self, group_index: int, params: list) -> list:
        """The tensors the optimizer sees for one param group (fp32 masters)."""
        raise NotImplementedError

    def attach(self) -> None:
        """After the model is cast to its dtype: lay out gradients, register hooks."""
        raise NotImplementedError

    def backward_start(self, boundary: bool) -> None:
        """Before backward. `boundary`: this backward ends the accumulation and must synchronise."""
        raise NotImplementedError

    def backward_end(self, boundary: bool) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def owned_grads(self) -> list:
        """The (model-dtype) gradients this rank owns after the boundary sync: for the overflow check."""
        raise NotImplementedError

    def prepare_master_grads(self) -> list:
        """Give every master its fp32 `.grad`; return [(grad, replicated_axes)] for the norm."""
        raise NotImplementedError

    def release_master_grads(self) -> None:
        for m in self.masters:
            m.grad = None  # the fp32 gradient copy lives only during the step

    def publish_params(self) -> None:
        """Updated masters -> the model's parameters (a copy, or an all-gather of the shards)."""
        raise NotImplementedError

    def ledger_categories(self) -> dict:
        """Tensors this mode owns, by category: params, grads, master_params, buffers."""
        raise NotImplementedError

    def padding_elements(self) -> int:
        return 0

    def model_state(self, names: dict) -> dict:
        """What goes into the model-states file next to the module (stage 0: optimizer and masters)."""
        return {}

    def shard_state(self):
        """This rank's own file of partitioned state, or None when the mode partitions nothing."""
        return None

    partitions_parameters = False  # True: the module holds only chunks, its parameters are not saved whole

    def load(self, weights: dict, model_state: dict, shards: list, names: dict,
             load_optimizer_states: bool) -> None:
        """Take over a checkpoint: `weights` = every parameter's whole fp32 value by name (a name
        missing when loading non-strictly keeps its current value); `model_state` = what
        `model_state()` saved; `shards` = the saved partitioned files (empty: weights only)."""
        raise NotImplementedError

    def detach(self) -> None:
        """Remove every hook; leave each parameter an ordinary whole tensor (a new engine may take over)."""
        raise NotImplementedError

    # ---- the one optimizer step ---------------------------------------------------------------------
    def step(self, loss_scale: float, clip: float, check_overflow: bool) -> bool:
        """One optimizer step; returns True if it was skipped for an overflow."""
        if check_overflow and self.any_rank(has_overflow(self.owned_grads())):
            return True
        pieces = self.prepare_master_grads()
        self.probe("step: fp32 gradients")
        norm = global_norm(pieces, self.grid, self.device, self.split_axes) / loss_scale
        self.grad_norm = norm.item()
        grads = [m.grad for m in self.masters if m.grad is not None]
        if clip > 0:  # clip_grad_norm_'s float32 coefficient, times 1/scale
            torch._foreach_mul_(grads, (torch.clamp(clip / (norm + 1e-6), max=1.0) / loss_scale).to(grads[0].device))
        elif loss_scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / loss_scale)
        self.optimizer.step()
        self.release_master_grads()
        self.publish_params()
        return False

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank of the grid."""
        t = torch.tensor([float(flag)], device=self.device)
        if self.grid.world_size > 1:
            with comm.tag("overflow_check"):
                comm.all_reduce(t, op=comm.ReduceOp.MAX, group=self.grid.world_group)
        return bool(t.item())


LONG = 1 << 16  # tensors this long (flat ZeRO shards) have their squares summed in float64 directly


def global_norm(pieces, grid, device, split_axes=()) -> torch.Tensor:
    """sqrt of the sum of squares of every gradient element of the model, each counted once.

    pieces: [(tensor, replicated_axes)] held by this rank. split_axes: the axes this mode partitions
    gradients over (ZeRO: data); the model and pipe axes always split the model when larger than 1.
    Returns a float32 tensor (as torch's clip_grad_norm_ does), equal on every rank.
    """
    axes = [a for a in grid.axes if grid.size(a) > 1]
    split = any(a in axes for a in set(split_axes) | {"model", "pipe"})  # the same on every rank
    owned = [t.float() for t, replicated in pieces
             if not split or all(grid.rank_in(a) == 0 for a in replicated if a in axes)]
    if not split:  # every rank holds every gradient: exactly clip_grad_norm_'s arithmetic
        norms = torch._foreach_norm(owned) if owned else [torch.zeros((), device=device)]
        return torch.linalg.vector_norm(torch.stack(norms))
    # partial sums of squares, added over ranks: in float64, so that a long flat ZeRO shard rounds
    # no worse than clip_grad_norm_'s per-parameter norms (a float32 sum of 1e6 squares drifts ~1e-5)
    small = [t for t in owned if t.numel() < LONG]
    sq = torch.zeros(1, dtype=torch.float64, device=device)
    if small:  # per-tensor norms in one fused call, their squares added in float64
        sq += torch.stack(torch._foreach_norm(small)).double().pow(2).sum()
    for t in owned:
        if t.numel() >= LONG:
            sq += t.double().pow(2).sum()
    with comm.tag("grad_norm"):
        comm.all_reduce(sq, group=grid.world_group)
    return sq.sqrt()[0].float()
