"""ZeRO stage 3: optimizer states, gradients and parameters are partitioned.   model states (2+2+K)Ψ/N

What each of the N data-parallel ranks holds (mixed precision, Ψ parameters, K = 12):
    parameters   2Ψ/N   its chunk of every module's parameters; a module's whole parameters exist
                        only while that module runs (plus what is prefetched)
    gradients    2Ψ/N   its chunk of the averaged gradient
    optimizer    12Ψ/N  its chunk of fp32 master weights + Adam m + v

Each module with parameters of its own is one "unit" (see `partition.py`). Around it:
    forward pre-hook    all-gather the unit (wait for it if it was prefetched), and start the async
                        all-gather of the next units in forward order not yet gathered, up to
                        `stage3_prefetch_bucket_size` elements: the nearest one alone, the others in
                        one collective (each rank sends its chunks side by side)
    forward post-hook   release the whole parameters (param.data becomes an empty tensor; autograd
                        keeps a reference to the Parameter, not to its data), and hook the
                        module's outputs so that their gradient arriving triggers...
    output grad hook    ...the all-gather again, just before the module's backward needs it
    grads ready         add the unit's gradients into its flat bucket, free them, release the whole
                        parameters again; consecutive ready units are reduce-scattered together, in
                        one async collective of up to `reduce_bucket_size` elements
Units smaller than `stage3_param_persistence_threshold` elements are kept whole on every rank
(gathering tiny tensors costs more in latency than it saves in memory).

Parameters read outside their own module (a tied head `h @ self.emb.weight.t()` in the parent's
forward) are *external* to the module that reads them: the first read of a released parameter while
a module runs registers it with that module (as DeepSpeed's ZeROOrderedDict does), and from then on
it is gathered around that module like its own. `register_external_parameter(module, param)` says
so ahead of time.

Reentrant activation checkpointing re-runs forwards inside backward: those re-runs gather what
they need and keep it until its gradients are in. At the end of every backward, and before every
optimizer step or checkpoint load, `drain()` waits for any all-gather still in flight and releases
every whole parameter, so no gather started before the step can hand out old weights after it.

What crosses the wire per step (per rank, ring algorithm, Ψ elements, no accumulation):
    forward all-gather  (N-1)/N Ψ  +  backward all-gather (N-1)/N Ψ_b  +  gradient reduce-scatter (N-1)/N Ψ
Ψ_b is what backward gathers again. `stage3_max_reuse_distance` D (`reuse.py`, DeepSpeed's meaning)
keeps a unit whole from forward to backward when fewer than D elements are used in between: for a
module used once, 2x the elements of the modules after it in forward. D = 0: Ψ_b = Ψ, 3(N-1)/N Ψ,
1.5x data parallel's 2(N-1)/N Ψ (the ZeRO paper's 3Ψ vs 2Ψ). DeepSpeed's default D = 1e9 keeps all
of a model with 2Ψ < D: Ψ_b = 0, 1x (from step 2: step 1 records the order). After the step only
    the persistent units are all-gathered (in one collective); every other rank just casts its
    updated master chunk into its parameter chunk.
How many collectives carry that: with the defaults (buckets larger than a small model), a GPT
step issues two all-gathers in forward (the first module's, then everything prefetched), two in
backward, one reduce-scatter and one all-gather of the persistent units, where one per module and
pass would be dozens (each costs a fixed latency).
`offload_param` keeps the parameter chunks in host memory, `offload_optimizer` the masters (`offload.py`).
"""
from __future__ import annotations

import torch

from ds_lab import comm
from ds_lab.monitor.memory import storage_key
from ds_lab.zero.init import forget_init_shards
from ds_lab.zero.offload import Offload, send_buffer, to_device
from ds_lab.zero.reuse import reuse_trace, used_again_within
from ds_lab.zero.stage3_units import _Gathering, _GatheringParameters, _tensors, module_units
from ds_lab.zero.stage2 import ZeroStage2


class ZeroStage3(ZeroStage2):
    """Stage 2 (gradient shards, reduce-scatter as backward goes) plus partitioned parameters."""

    stage = 3
    partitions_parameters = True  # the module holds chunks: checkpoints keep no whole parameters

    @classmethod
    def build(cls, zero_config, module, groups, grid, model_dtype, device):
        units, needs = module_units(module, groups, grid.size("data"), grid.rank_in("data"))
        self = cls(module, groups, units, grid, model_dtype, device, Offload.from_config(zero_config))
        forget_init_shards(module)
        self.needs = needs
        self.prefetch_elements = zero_config.stage3_prefetch_bucket_size
        self.persistence_threshold = zero_config.stage3_param_persistence_threshold
        self.max_reuse_distance = zero_config.stage3_max_reuse_distance
        self.reduce_bucket_size = zero_config.reduce_bucket_size
        return self

    # ---- setting up ------------------------------------------------------------------------------
    def unit_values(self, unit) -> list:
        """Parameters built under zero.Init hold only a chunk: gather that module's flat vector
        (one module at a time, so the whole model never exists here)."""
        values = []
        for p in unit.params:
            init = getattr(p, "ds_init", None)
            if init is None:
                values.append(p.detach())
                continue
            if getattr(self, "_init_cache", (None,))[0] is not init:
                self._init_cache = (init, init.full(self.dp_group))
            values.append(init.view(self._init_cache[1], p))
        return values

    def attach(self) -> None:
        self._init_cache = None
        self.live_bytes = self.peak_live_bytes = 0
        self.live_storages = set()  # storages of whole parameters now: not activations, for the ledger
        self.unit_of = {p: unit for unit in self.units for p in unit.params}
        for unit in self.units:
            unit.persistent = unit.numel < self.persistence_threshold
            # in fp32 the parameter chunk *is* the master chunk (no copy to keep or refresh), unless
            # one of them is offloaded: then the chunk is a copy, on the host under offload_param
            if self.offload.params != self.offload.optimizer:
                unit.shard = self.offload.to_host(self.master_chunk(unit), self.model_dtype) if self.offload.params \
                    else to_device(self.master_chunk(unit), self.device, self.model_dtype)
            else:
                unit.shard = self.master_chunk(unit).to(self.model_dtype)
            unit.flat, unit.handle, unit.done = None, None, False
            for p, shape in zip(unit.params, unit.shapes):
                p.ds_zero, p.ds_shape = self, shape  # the real shape, once .data is only a chunk
            if unit.persistent:
                unit.flat = torch.empty(unit.padded, dtype=self.model_dtype, device=self.device)
                comm.all_gather(unit.flat, send_buffer(self, [unit]), group=self.dp_group)
                self._point_params(unit)
            else:
                self._release(unit)
        self.attach_gradient_shards(list(reversed(self.units)))  # backward meets modules last to first
        self.order, self.first_position, self.position, self.recorded = [], {}, 0, False
        self.running, self.in_backward = [], False  # modules whose forward is running, innermost last
        self.reuse = {}  # (backward follows, trace position, unit index) -> keep it whole (reuse.py)
        self.hooks = [self.module.register_forward_pre_hook(self._start_forward),
                      self.module.register_forward_hook(self._end_forward)]
        for mod in self.module.modules():  # every module: a parent may read a child's parameter
            self.hooks += [mod.register_forward_pre_hook(self._pre_forward),
                           mod.register_forward_hook(self._post_forward)]
            object.__setattr__(mod, "_parameters", _GatheringParameters(mod._parameters))

    def _point_params(self, unit) -> None:
        for p, view in zip(unit.params, unit.views(unit.flat)):
            p.data = view

    def add_external(self, module, p) -> None:
        """`module` reads `p`, owned by another module: gather p's unit around `module` too."""
        unit = self.unit_of[p]
        if unit not in self.needs.setdefault(module, []):
            self.needs[module].append(unit)
            self.reuse = {}  # the trace changed

    def read_while_running(self, p) -> None:
        """A parameter was read while modules run. Not needed by any of them: it is external to the
        innermost one (registered for every later forward); gather it now if it is released."""
        unit = self.unit_of.get(p)
        if unit is None:
            return
        if not any(unit in self.needs.get(mod, ()) for mod in self.running):
            self.add_external(self.running[-1], p)
        if unit.flat is None:
            self.gather(unit)

    # ---- gather / release ------------------------------------------------------------------------
    def _issue_gathers(self, units) -> None:
        """Start one async all-gather for every unit in `units` not whole or in flight yet: each rank
        sends its chunks of all of them side by side, so the result is laid out rank by rank,
        [u1 chunk 0 | u2 chunk 0 | ... | u1 chunk 1 | ...], and each unit is cut out when first needed."""
        units = [u for u in units if u.flat is None and u.handle is None]
        if not units:
            return
        whole = torch.empty(self.world_size, sum(u.chunk for u in units), dtype=self.model_dtype, device=self.device)
        shards = send_buffer(self, units)  # offload_param: copied host -> device, dropped after use
        with comm.tag("param_allgather"):
            handle = comm.all_gather(whole.view(-1), shards, group=self.dp_group, async_op=True)
        gathering = _Gathering(units, handle, whole)
        for unit in units:
            unit.handle, unit.pending_flat = gathering, whole
        self._count(whole.numel() * whole.element_size())

    def _finish(self, gathering) -> None:
        """Wait for a gather in flight; every unit it brought becomes whole."""
        if gathering.handle is None:
            return
        gathering.handle.wait()
        gathering.handle = None
        parts = gathering.whole.split([u.chunk for u in gathering.units], dim=1)
        for unit, part in zip(gathering.units, parts):
            if unit.handle is gathering:
                # one unit: `part` is the whole buffer, no copy; several: each unit its own storage
                unit.flat, unit.handle, unit.pending_flat = part.contiguous().view(-1), None, None
                self.live_storages.add(storage_key(unit.flat))
                self._point_params(unit)

    def gather(self, unit) -> None:
        """Make the unit's whole parameters exist (waiting for a prefetch if one is in flight)."""
        if unit.flat is not None:
            return
        if unit.handle is None:
            self._issue_gathers([unit])
        self._finish(unit.handle)

    def _release(self, unit) -> None:
        if unit.persistent:
            return
        if unit.handle is not None:  # prefetched but never used: finish the gather, then drop it
            self._finish(unit.handle)
        if unit.flat is not None:
            self._count(-unit.flat.numel() * unit.flat.element_size())
            self.live_storages.discard(storage_key(unit.flat))
        unit.flat = None
        for p in unit.params:
            p.data = torch.empty(0, dtype=self.model_dtype, device=self.device)

    def _held(self, unit) -> bool:
        """Still needed by a module whose forward is running (a parent that reads it, or re-entry)."""
        return any(unit in self.needs.get(mod, ()) for mod in self.running)

    def drain(self) -> None:
        """Wait for every all-gather in flight and release every whole (non-persistent) unit: after
        this, nothing gathered before an optimizer step can be used after it."""
        for unit in self.units:
            if unit.handle is not None or unit.flat is not None:
                self._release(unit)

    def _count(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)

    # ---- hooks -----------------------------------------------------------------------------------
    def _start_forward(self, module, args):
        self.position, self.running = 0, []

    def _end_forward(self, module, args, output):
        self.recorded = True

    def _pre_forward(self, mod, args):
        self.running.append(mod)
        if self.in_backward:  # reentrant checkpointing re-runs this forward inside backward
            for unit in self.needs.get(mod, ()):
                self.gather(unit)
            return
        if not self.recorded:
            self.order.append(mod)
            self.first_position.setdefault(mod, len(self.order) - 1)
        needs = self.needs.get(mod, [])
        self._issue_gathers(needs)
        if self.recorded:
            self._issue_ahead(self._prefetch(self.order[self.position + 1:]))
        for unit in needs:
            self.gather(unit)
        self.position += 1

    def _prefetch(self, upcoming) -> list:
        """The units the next modules will need (in forward order during forward, in reverse during
        backward), within `stage3_prefetch_bucket_size` elements, for `_issue_ahead`. In backward,
        a unit whose gradients are already in is never prefetched (nothing will use it)."""
        budget, out = self.prefetch_elements, []  # whole elements ahead of the current module, in flight or not
        for mod in upcoming:
            for unit in self.needs.get(mod, ()):
                if self.in_backward and (unit.reduced or unit.done):
                    continue
                if unit.padded > budget:
                    return out
                budget -= unit.padded
                if unit not in out:
                    out.append(unit)
        return out

    def _issue_ahead(self, units) -> None:
        """Prefetch: the unit needed first in one all-gather (the next module waits only for it),
        all the others in a second one."""
        units = [u for u in units if u.flat is None and u.handle is None]
        self._issue_gathers(units[:1])
        self._issue_gathers(units[1:])

    def _post_forward(self, mod, args, output):
        if self.running and self.running[-1] is mod:
            self.running.pop()
        needs = self.needs.get(mod, ())
        if not self.in_backward:  # a re-run inside backward keeps them: its backward comes next
            for unit in needs:
                if not self._held(unit) and not self._reused_soon(unit):
                    self._release(unit)
        if needs and torch.is_grad_enabled():
            # where this call stands in forward order (a re-run inside backward: its first call)
            position = self.first_position.get(mod, 0) if self.in_backward else self.position - 1
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(lambda grad, mod=mod, position=position: self._pre_backward(mod, position))
        return None

    def _reused_soon(self, unit) -> bool:
        """`stage3_max_reuse_distance` (reuse.py): the recorded trace uses this unit again before that
        many elements of other uses. The step that records the trace keeps nothing, as DeepSpeed's."""
        if not self.recorded or unit.persistent or self.max_reuse_distance <= 0:
            return False
        key = (torch.is_grad_enabled(), self.position, unit.index)
        if key not in self.reuse:
            trace = reuse_trace(self.order, self.needs, with_backward=key[0])
            self.reuse[key] = used_again_within(trace, self.position, unit, self.max_reuse_distance)
        return self.reuse[key]

    def _pre_backward(self, mod, position: int) -> None:
        needs = self.needs[mod]
        self._issue_gathers(needs)
        if position > 0:
            self._issue_ahead(self._prefetch(self.order[position - 1::-1]))
        for unit in needs:
            self.gather(unit)

    # ---- backward: gradients in, whole parameters out ---------------------------------------------
    def backward_start(self, boundary: bool) -> None:
        for unit in self.units:
            unit.done = False
        self.in_backward = True
        super().backward_start(boundary)

    def take_grad(self, p) -> None:
        """As stage 2; and once every parameter of the unit has had this round's gradient (one per
        backward, or one per checkpointed segment that uses them), its whole parameters go: a later
        segment that uses them again gathers them again."""
        super().take_grad(p)
        unit, fired = self.slot[p][0], self.tracker.fired
        if all(fired.get(q, 0) >= fired.get(p, 0) for q in unit.params) and not self._held(unit):
            unit.done = True
            self._release(unit)

    def unit_ready(self, unit) -> None:
        self._release(unit)  # the module's backward is done: its whole parameters can go
        super().unit_ready(unit)

    def backward_end(self, boundary: bool) -> None:
        super().backward_end(boundary)
        self.in_backward, self.running = False, []
        self.drain()

    # ---- the step and loading: nothing gathered before them may be used after ----------------------
    def step(self, loss_scale: float, clip: float, check_overflow: bool) -> bool:
        self.drain()  # in fp32 the shard being gathered *is* the master the optimizer updates
        return super().step(loss_scale, clip, check_overflow)

    def load(self, *args, **kwargs) -> None:
        self.drain()
        return super().load(*args, **kwargs)

    def publish_params(self) -> None:
        """Stage 3 keeps only chunks: the new master chunk becomes the parameter chunk, no traffic
        (persistent units, kept whole, are all-gathered)."""
        self.drain()
        for unit in self.units:
            if unit.shard.data_ptr() != self.master_chunk(unit).data_ptr():
                unit.shard.copy_(self.master_chunk(unit))
        persistent = [u for u in self.units if u.persistent]
        if persistent:  # small units: one all-gather for all of them, laid out rank by rank
            whole = torch.empty(self.world_size, sum(u.chunk for u in persistent), dtype=self.model_dtype,
                                device=self.device)
            with comm.tag("param_allgather"):
                comm.all_gather(whole.view(-1), send_buffer(self, persistent), group=self.dp_group)
            for unit, part in zip(persistent, whole.split([u.chunk for u in persistent], dim=1)):
                unit.flat.view(self.world_size, unit.chunk).copy_(part)

    def ledger_categories(self) -> dict:
        whole = [u.flat for u in self.units if u.flat is not None]
        prefetched = [u.pending_flat for u in self.units if u.handle is not None]
        return dict(params=[u.shard for u in self.units] + whole + prefetched, grads=list(self.grad_shards),
                    master_params=self.masters, buffers=list(self.in_flight.values()))

    def full_state_dict(self) -> dict:
        """Every parameter whole, fp32, gathered unit by unit (collective: all ranks call it)."""
        from ds_lab.runtime.checkpoint_files import state_dict_params
        names = self.param_names()
        out = {}
        for unit in self.units:
            flat = torch.empty(unit.padded, dtype=torch.float32, device=self.device)
            comm.all_gather(flat, self.master_chunk(unit).to(self.device), group=self.dp_group)
            for p, view in zip(unit.params, unit.views(flat)):
                out[names[p]] = view.clone()
        state = {k: v.float() for k, v in self.module.state_dict().items() if v.numel() > 0}
        for key, p in state_dict_params(self.module).items():
            state[key] = out[names[p]]
        return state

    def detach(self) -> None:
        """Hooks off; every parameter an ordinary whole tensor again (model dtype, gathered from the
        chunks: a collective, as building the engine was), no gradient, no ZeRO attributes."""
        if getattr(self, "detached", False):
            return
        self.drain()
        self.tracker.remove()
        for hook in self.hooks:
            hook.remove()
        for mod in self.module.modules():
            if isinstance(mod._parameters, _GatheringParameters):
                object.__setattr__(mod, "_parameters", dict(mod._parameters))
        for unit in self.units:
            flat = unit.flat
            if flat is None:
                flat = torch.empty(unit.padded, dtype=self.model_dtype, device=self.device)
                comm.all_gather(flat, send_buffer(self, [unit]), group=self.dp_group)
            for p, view in zip(unit.params, unit.views(flat)):
                p.data, p.grad = view.clone(), None
                del p.ds_zero, p.ds_shape
            unit.flat, unit.shard = None, None
        self.live_storages.clear()
        self.detached = True
