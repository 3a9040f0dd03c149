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

The sharded step (identical for all stages, once each rank has its averaged gradient chunks):
  1. overflow: any inf/nan in any rank's chunk  -> all-reduce(MAX) of one flag; skip if set
  2. global gradient norm = sqrt(all-reduce(SUM) of each rank's sum of squares): every element
     is owned by exactly one rank and padding is zero, so nothing is counted twice
  3. unscale (fp16) and clip by that norm; the optimizer updates the fp32 shard
  4. the updated shard, cast to the model dtype, is all-gathered back into the full parameters
     (stage 3 keeps it as the rank's parameter shard instead: no all-gather until the next use)
"""
from __future__ import annotations

import math

import torch

from ds_lab import comm
from ds_lab.runtime.precision import has_overflow


def param_shape(p) -> tuple:
    """A parameter's real shape, also when zero.Init left only an empty tensor in it."""
    return getattr(p, "ds_shape", tuple(p.shape))


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


class ZeroOptimizerBase:
    """Owns the units, the fp32 master shards and the sharded step. Subclasses decide where
    gradients are reduced and where the full parameters live."""

    stage = None

    def __init__(self, module, groups: list, units: list, dp_group, model_dtype, device):
        self.module, self.units, self.dp_group = module, units, dp_group
        self.world_size, self.rank = comm.get_world_size(dp_group), comm.get_rank(dp_group)
        self.model_dtype, self.device = model_dtype, device
        shard_sizes = [0] * len(groups)
        for unit in units:
            unit.shard_offset = shard_sizes[unit.group]
            shard_sizes[unit.group] += unit.chunk
        # the fp32 master shards, taken from the parameters' values *before* any cast to 2 bytes
        self.masters = []
        for g, size in enumerate(shard_sizes):
            master = torch.zeros(size, dtype=torch.float32, device=device)
            for unit in (u for u in units if u.group == g):
                master[unit.shard_offset:unit.shard_offset + unit.chunk] = \
                    unit.flatten(self.unit_values(unit), torch.float32)[unit.mine]
            self.masters.append(torch.nn.Parameter(master))
        self.optimizer = None  # bound by the engine (client or config optimizer over self.masters)
        self.grad_norm = None

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

    # ---- the sharded step ------------------------------------------------------------------------
    def _all_ranks_any(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=self.device)
        if self.world_size > 1:
            with comm.tag("overflow_check"):
                comm.all_reduce(t, op=comm.ReduceOp.MAX, group=self.dp_group)
        return bool(t.item())

    def step(self, loss_scale: float, clip: float, check_overflow: bool) -> bool:
        """One optimizer step over the shards; returns True if it was skipped (overflow)."""
        chunks = [self.grad_chunk(u) for u in self.units]
        if check_overflow and self._all_ranks_any(has_overflow(chunks)):
            return True
        for g, master in enumerate(self.masters):  # fp32 gradient of the shard, only for the step
            master.grad = self.grad_shard(g).float()
        sq = torch.stack([m.grad.pow(2).sum() for m in self.masters]).sum().reshape(1)
        if self.world_size > 1:
            with comm.tag("grad_norm"):
                comm.all_reduce(sq, group=self.dp_group)
        self.grad_norm = math.sqrt(sq.item()) / loss_scale
        coef = 1.0 / loss_scale
        if clip > 0:
            coef *= min(clip / (self.grad_norm + 1e-6), 1.0)
        if coef != 1.0:
            torch._foreach_mul_([m.grad for m in self.masters], coef)
        self.optimizer.step()
        for m in self.masters:
            m.grad = None
        self.publish_params()
        return False

    def publish_params(self) -> None:
        """Updated master chunks -> full model parameters, by one all-gather per unit."""
        handles = []
        with comm.tag("param_allgather"):
            for unit in self.units:
                handles.append(self.gather_into(unit, self.master_chunk(unit).to(self.model_dtype)))
        for h in handles:
            if h is not None:
                h.wait()

    def gather_into(self, unit, chunk, async_op=True):
        """All-gather every rank's `chunk` of `unit` into its whole flat parameter vector
        (which the parameters are views of, so they change in place)."""
        return comm.all_gather(unit.flat, chunk, group=self.dp_group, async_op=async_op)

    # ---- measurement and state -------------------------------------------------------------------
    def ledger_categories(self) -> dict:
        raise NotImplementedError

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

    def load_shards(self, shards: list, load_optimizer_states: bool = True) -> None:
        """Load a checkpoint saved by any number of ranks into this layout (resharding): merge the
        saved chunks into whole tensors, cut them again for this rank."""
        from ds_lab.zero.checkpoint import full_tensors_by_name
        with torch.no_grad():
            masters = full_tensors_by_name(shards, "masters")
            for g, master in enumerate(self.masters):
                master.copy_(self._shard_of(g, masters))
        if load_optimizer_states:
            saved = shards[0]["optimizer"]
            state = {}
            for index, slots in saved["state"].items():
                state[index] = {}
                for slot, value in slots.items():
                    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() > 1:
                        value = self._shard_of(int(index), full_tensors_by_name(shards, ("optimizer", slot), {int(index)}))
                    state[index][slot] = value
            self.optimizer.load_state_dict(dict(saved, state=state))
        self.publish_params()

    def _shard_of(self, group: int, by_name: dict) -> torch.Tensor:
        """This rank's shard of group `group`, cut from whole tensors given by parameter name."""
        names = self.param_names()
        parts = [unit.flatten([by_name[names[p]] for p in unit.params], torch.float32)[unit.mine]
                 for unit in self.units if unit.group == group]
        return torch.cat(parts).to(self.device)
