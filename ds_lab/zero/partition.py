"""What ZeRO stages 1, 2 and 3 share: units, shards, and the sharded optimizer step.

A *unit* is a group of parameters that travels together (stages 1/2: a gradient bucket of about
`reduce_bucket_size` elements, in backward order; stage 3: one module's own parameters). Its
parameters are laid end to end in one flat vector, padded with zeros to a multiple of N (the
data-parallel size), and cut into N equal chunks: rank r owns chunk r of *every* unit.

    unit (Ψ_u elements, padded to N*c):  [ chunk 0 | chunk 1 | ... | chunk N-1 ]
                                            rank 0    rank 1        rank N-1

Because every unit is cut the same way, one reduce-scatter per unit hands each rank exactly the
averaged gradient of its own chunk, and one all-gather per unit rebuilds the updated parameters
from everybody's chunks: no padding sent beyond N-1 elements per unit.

A rank's *shard* is its chunks of all units (of one optimizer param group), concatenated: the
fp32 master weights and the Adam moments exist only for the shard, which is what gives every stage
its 12Ψ/N of optimizer state (K = 12 in mixed precision: master 4 + m 4 + v 4).

The step is the engine's one step (`runtime/mode.py`); what ZeRO gives it:
  - the gradients this rank owns are its chunks: the overflow flag and the squared norm are summed
    over ranks, and every element is owned by exactly one rank (padding is zero), so nothing is
    counted twice
  - the optimizer updates the fp32 shard only
  - `publish_params`: the updated shard, cast to the model dtype, is all-gathered back into the
    full parameters (stage 3 keeps it as the rank's parameter shard instead: no all-gather)

With `offload_optimizer` (`offload.py`) the master shards, their fp32 gradients and the optimizer
states are host buffers: the gradient shard is copied to the host for the step, and each updated
master chunk copied back to the device before its all-gather.
"""
from __future__ import annotations

import math

import torch

from ds_lab import comm
from ds_lab.runtime.mode import GradientMode, copies_along, param_shape
from ds_lab.runtime.precision import master_values
from ds_lab.zero.offload import Offload, host_tensors, to_device


class Unit:
    def __init__(self, index: int, params: list, group: int, world_size: int, rank: int):
        self.index, self.params, self.group = index, params, group
        self.shapes = [param_shape(p) for p in params]
        self.numel = sum(math.prod(s) for s in self.shapes)
        self.chunk = max(1, math.ceil(self.numel / world_size))
        self.padded = self.chunk * world_size
        self.rank = rank
        self.offsets, offset = [], 0
        for shape in self.shapes:
            self.offsets.append(offset)
            offset += math.prod(shape)
        self.shard_offset = 0  # where this unit's chunk sits in the rank's group shard

    @property
    def mine(self) -> slice:
        return slice(self.rank * self.chunk, (self.rank + 1) * self.chunk)

    def flatten(self, tensors, dtype) -> torch.Tensor:
        flat = torch.zeros(self.padded, dtype=dtype, device=tensors[0].device)
        for t, offset in zip(tensors, self.offsets):
            flat[offset:offset + t.numel()].copy_(t.reshape(-1))
        return flat

    def views(self, flat):
        """The unit's parameters as views into a full flat vector."""
        return [flat[o:o + math.prod(shape)].view(shape) for o, shape in zip(self.offsets, self.shapes)]


def make_units(groups: list, world_size: int, rank: int, split) -> list:
    """Cut each param group into units with `split(params) -> list of param lists`."""
    units = []
    for g, params in enumerate(groups):
        for members in split(params):
            units.append(Unit(len(units), members, g, world_size, rank))
    return units


def buckets_in_backward_order(bucket_size: int):
    """The stage-1/2 split: buckets of about `bucket_size` elements, last parameters first."""
    def split(params):
        out, current, size = [], [], 0
        for p in reversed(params):
            current.append(p)
            size += p.numel()
            if size >= bucket_size:
                out.append(current)
                current, size = [], 0
        return out + ([current] if current else [])
    return split


class ZeroOptimizerBase(GradientMode):
    """Owns the units and the fp32 master shards. Subclasses decide where gradients are reduced
    and where the full parameters live."""

    name, stage = "ZeRO", None
    split_axes = ("data",)  # each rank owns a different chunk of every unit
    # DeepSpeed's ZeRO optimizers use hysteresis and refuse to go below min_loss_scale
    loss_scaler_options = dict(use_hysteresis=True, raise_below_minimum=True)

    def __init__(self, module, groups: list, units: list, grid, model_dtype, device, offload=None):
        super().__init__(grid, device)
        self.module, self.units = module, units
        self.model_dtype = model_dtype
        self.offload = offload or Offload()
        shard_sizes = [0] * len(groups)
        for unit in units:
            unit.shard_offset = shard_sizes[unit.group]
            shard_sizes[unit.group] += unit.chunk
        # the fp32 master shards, copied from the parameters' values rounded to the model's dtype
        self.masters = []
        for g, size in enumerate(shard_sizes):
            master = self.offload.host_zeros(size, torch.float32) if self.offload.optimizer else \
                torch.zeros(size, dtype=torch.float32, device=device)
            for unit in (u for u in units if u.group == g):
                master[unit.shard_offset:unit.shard_offset + unit.chunk] = \
                    unit.flatten(master_values(self.unit_values(unit), model_dtype), torch.float32)[unit.mine]
            self.masters.append(torch.nn.Parameter(master))
        # offload_optimizer: the fp32 gradient of each shard, a host buffer kept for every step
        self.host_grads = [self.offload.host_zeros(m.numel(), torch.float32) for m in self.masters] \
            if self.offload.optimizer else []
        self.copy_masks = self._copy_masks()

    def _copy_masks(self) -> list:
        """Per group shard: {axes its elements are copied along, besides data: a bool mask of those
        elements, or None when the whole shard is of one kind} — what the global norm needs."""
        masks = []
        for g, master in enumerate(self.masters):
            units = [u for u in self.units if u.group == g]
            kinds = {copies_along(p)[1:] for u in units for p in u.params} or {("model",)}
            if len(kinds) == 1:
                masks.append({kinds.pop(): None})
                continue
            by_axes = {}
            for axes in kinds:
                mask = torch.zeros(master.numel(), dtype=torch.bool, device=master.device)
                for unit in units:
                    flags = torch.zeros(unit.padded, dtype=torch.bool, device=master.device)
                    for p, offset, shape in zip(unit.params, unit.offsets, unit.shapes):
                        flags[offset:offset + math.prod(shape)] = copies_along(p)[1:] == axes
                    mask[unit.shard_offset:unit.shard_offset + unit.chunk] = flags[unit.mine]
                by_axes[axes] = mask
            masks.append(by_axes)
        return masks

    @property
    def zero_optimizer(self):
        return self

    def optimizer_params(self, group_index: int, params: list) -> list:
        return [self.masters[group_index]]

    def unit_values(self, unit) -> list:
        """The whole values of a unit's parameters, to cut the master chunks from."""
        return [p.detach() for p in unit.params]

    # ---- views -----------------------------------------------------------------------------------
    def master_chunk(self, unit) -> torch.Tensor:
        return self.masters[unit.group].data[unit.shard_offset:unit.shard_offset + unit.chunk]

    def grad_chunk(self, unit) -> torch.Tensor:
        """This rank's averaged gradient chunk of `unit` (model dtype). Subclasses store it."""
        raise NotImplementedError

    def grad_shard(self, group: int) -> torch.Tensor:
        """This rank's gradient chunks of one param group, laid out as its master shard."""
        return torch.cat([self.grad_chunk(u) for u in self.units if u.group == group])

    # ---- what the engine's step needs ------------------------------------------------------------
    def owned_grads(self) -> list:
        return [self.grad_chunk(u) for u in self.units]

    def prepare_master_grads(self) -> list:
        for g, master in enumerate(self.masters):  # fp32 gradient of the shard, only for the step
            if self.offload.optimizer:  # device -> host, into the shard's host gradient buffer
                master.grad = self.host_grads[g].copy_(self.grad_shard(g))
            else:
                master.grad = self.grad_shard(g).float()
        # a shard is split over data ranks; along the other axes each element is split or copied as
        # its parameter is (a tensor-parallel slice is split over model ranks, a tied one copied over pipe)
        pieces = []
        for m, masks in zip(self.masters, self.copy_masks):
            for axes, mask in masks.items():
                pieces.append((m.grad if mask is None else m.grad * mask, axes))
        return pieces

    def release_master_grads(self) -> None:
        if not self.offload.optimizer:  # offloaded, the host gradient buffer stays for the next step
            super().release_master_grads()

    def publish_params(self) -> None:
        """Updated master chunks -> full model parameters, by one all-gather per unit."""
        handles, self.transient = [], []
        with comm.tag("param_allgather"):
            for unit in self.units:
                self.transient.append(self.device_chunk(unit))
                handles.append(self.gather_into(unit, self.transient[-1]))
        self.probe("step: all-gather of the updated shards")
        for h in handles:
            if h is not None:
                h.wait()
        self.transient = []

    def device_chunk(self, unit) -> torch.Tensor:
        """The updated master chunk on the device, in the model dtype (offloaded: a host -> device copy)."""
        if self.offload.optimizer:
            return to_device(self.master_chunk(unit), self.device, self.model_dtype)
        return self.master_chunk(unit).to(self.model_dtype)

    def gather_into(self, unit, chunk, async_op=True):
        """All-gather every rank's `chunk` of `unit` into its whole flat parameter vector
        (which the parameters are views of, so they change in place)."""
        return comm.all_gather(unit.flat, chunk, group=self.dp_group, async_op=async_op)

    # ---- measurement and state -------------------------------------------------------------------
    def ledger_categories(self) -> dict:
        raise NotImplementedError

    def host_tensors(self) -> list:
        """What this mode keeps in host memory (offload), for the ledger's host/device placement."""
        return host_tensors(self)

    def param_names(self) -> dict:
        names = {}
        for name, p in self.module.named_parameters():
            names.setdefault(p, name)
        return names

    def shard_state(self) -> dict:
        """This rank's shard of everything: saved per rank, merged by `ds_lab.zero.consolidate`."""
        names = self.param_names()
        return dict(
            stage=self.stage, world_size=self.world_size, rank=self.rank,
            units=[dict(group=u.group, chunk=u.chunk, numel=u.numel, names=[names[p] for p in u.params],
                        shapes=[list(s) for s in u.shapes]) for u in self.units],
            masters=[m.detach() for m in self.masters],
            optimizer=self.optimizer.state_dict(),
        )

    def load(self, weights: dict, model_state: dict, shards: list, names: dict,
             load_optimizer_states: bool) -> None:
        """Load a checkpoint saved by any stage and number of ranks into this layout (resharding):
        `weights` are whole fp32 tensors by name; cut this rank's chunks from them. The optimizer
        state, when asked, is merged from the saved shards the same way."""
        with torch.no_grad():
            for g, master in enumerate(self.masters):
                master.copy_(self._shard_of(g, weights))
        if load_optimizer_states and shards:
            from ds_lab.runtime.checkpoint_files import full_tensors_by_name
            saved = shards[0]["optimizer"]
            state = {}
            for index, slots in saved["state"].items():
                state[index] = {}
                for slot, value in slots.items():
                    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() > 1:
                        value = self._shard_of(int(index), full_tensors_by_name(shards, ("optimizer", slot), {int(index)}),
                                               keep_current=False)
                    state[index][slot] = value
            self.optimizer.load_state_dict(dict(saved, state=state))
        self.publish_params()

    def _shard_of(self, group: int, by_name: dict, keep_current: bool = True) -> torch.Tensor:
        """This rank's shard of group `group`, cut from whole tensors given by parameter name. A name
        missing from `by_name` (a non-strict load) keeps its current master value (gathered: a
        collective, reached by every rank alike) or, with keep_current=False, zeros."""
        names, parts = self.param_names(), []
        for unit in (u for u in self.units if u.group == group):
            if all(names[p] in by_name for p in unit.params):
                flat = unit.flatten([by_name[names[p]].to(self.device) for p in unit.params], torch.float32)
            else:
                flat = torch.zeros(unit.padded, dtype=torch.float32, device=self.device)
                if keep_current:
                    comm.all_gather(flat, self.master_chunk(unit).to(self.device), group=self.dp_group)
                for p, view in zip(unit.params, unit.views(flat)):
                    if names[p] in by_name:
                        view.copy_(by_name[names[p]].reshape(view.shape))
            parts.append(flat[unit.mine])
        return torch.cat(parts).to(self.masters[group].device)
