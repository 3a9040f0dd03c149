"""The engine: forward, backward, step, with DeepSpeed's names and semantics.

    engine, optimizer, _, _ = ds_lab.initialize(model=model, config=cfg)
    for batch in loader:
        loss = engine(**batch).loss
        engine.backward(loss)          # loss / accumulation steps (x loss scale in fp16)
        engine.step()                  # acts only at the accumulation boundary

One optimizer step = `gradient_accumulation_steps` micro-steps on every data-parallel rank:
    train_batch_size = micro_batch_per_gpu x gradient_accumulation_steps x data-parallel size

Every mode runs this one path. What differs between data parallel (stage 0), ZeRO-1/2/3 — and,
next, 1-bit Adam and the tensor-parallel variants — sits behind one small interface, the *mode*
(`runtime/mode.py`): where a gradient goes when it is ready (`backward_start`/`backward_end`),
what the optimizer steps (`optimizer_params`), the step itself with its overflow check, global
norm and clipping (written once, in `GradientMode.step`), what the ledger counts and what a
checkpoint keeps. This file never asks which mode it runs. Every process group comes from one
grid (`comm/topology.py`: pipe x data x model), built by `initialize` or taken from an `mpu`.

At the boundary `step()` does, in order: (fp16) check every rank's gradients for inf/nan and skip
the step if any, with the loss scaler adjusting; give the fp32 masters their gradients; unscale and
clip them by the global norm; run the optimizer; bring the model's parameters up to date; step the
LR scheduler; zero the gradients. DeepSpeed's accessors and checkpoint calls: engine_api.py.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from ds_lab import comm, ops
from ds_lab.config import ConfigError, DeepSpeedConfig
from ds_lab.monitor import events
from ds_lab.monitor.monitors import build_monitors
from ds_lab.monitor.memory import (CATEGORIES, ActivationTracker, cuda_allocator, ledger,
                                   optimizer_state_tensors)
from ds_lab.optim import build_optimizer
from ds_lab.profiling.flops_profiler import FlopsProfiler
from ds_lab.runtime import activation_checkpointing
from ds_lab.runtime.engine_api import EngineAPI, local_rank_from_env
from ds_lab.runtime.lr_schedules import build_scheduler
from ds_lab.runtime.mode import param_shape
from ds_lab.runtime.precision import DTYPES, cast_inputs_half, make_loss_scaler


class DeepSpeedEngine(EngineAPI, torch.nn.Module):
    def __init__(self, model, config: DeepSpeedConfig, grid, build_mode, optimizer=None, model_parameters=None,
                 lr_scheduler=None, training_data=None, collate_fn=None, mpu=None):
        """Built by `ds_lab.initialize`, which gives the process grid and `build_mode(module, param
        lists, grid, model dtype, device)`, the constructor of the mode the config selects."""
        super().__init__()
        previous = getattr(model, "_ds_lab_mode", None)
        if previous is not None:  # the model already has an engine (a re-run notebook cell): take over
            previous.detach()
        self.module = model
        self.config = config
        self.mpu, self.grid = mpu, grid
        self.dp_group = grid.group("data")
        self.dp_world_size, self.dp_rank = grid.size("data"), grid.rank_in("data")
        self.device = comm.device()
        self.local_rank = local_rank_from_env()  # DeepSpeed's three: LOCAL_RANK, the rank, the world size
        self.global_rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.precision = config.precision
        ops.set_fused_kernels(config.fused_kernels is not False)  # null: kernels where GPU + CuPy, else torch
        self.global_steps = self.global_samples = self.micro_steps = self.skipped_steps = 0
        self._global_grad_norm = None
        self._step_applied = False
        self._boundary_override = None  # set_gradient_accumulation_boundary()
        self.inside_no_sync = False
        self.losses = []  # this optimizer step's micro-batch losses (unscaled), for monitors

        model.to(self.device)
        self._broadcast_model()
        groups = self._param_groups(optimizer, model_parameters)
        # the mode copies its fp32 masters (from the values rounded to 2 bytes, as DeepSpeed) before the cast
        self.mode = build_mode(model, [params for params, _ in groups], grid, DTYPES[self.precision], self.device)
        self.optimizer = self._configure_optimizer(optimizer, groups, self.mode.optimizer_params)
        if self.precision != "fp32":
            model.to(DTYPES[self.precision])  # same Parameter objects, now 2 bytes each
        self.mode.attach()
        self.mode.optimizer = self.optimizer
        object.__setattr__(model, "_ds_lab_mode", self.mode)  # a later engine on this model detaches it
        for p in model.parameters():  # ds_lab.utils' safe_* functions find a parameter's mode here
            p._ds_lab_mode = self.mode
        self.loss_scaler = make_loss_scaler(config.fp16, **self.mode.loss_scaler_options)
        self.lr_scheduler = self._configure_scheduler(lr_scheduler)
        self.training_dataloader = self._dataloader(training_data, collate_fn) if training_data is not None else None
        self.activations = ActivationTracker(exclude=list(model.parameters()),
                                             live_param_storages=getattr(self.mode, "live_storages", None))
        self.timers = {"forward": 0.0, "backward": 0.0, "step": 0.0}
        self.track_activations = False
        self._measuring, self.peaks, self.last_peaks = True, {}, {}
        self.mode.probe = self._probe  # the mode reports its own peak moments (buckets, fp32 grads)
        self.monitors = build_monitors(config, rank=comm.get_rank())
        comm.configure_logger(**dataclasses.asdict(config.comms_logger))
        activation_checkpointing.configure_from(config, grid)  # the config's section; the grid's model axis
        self.flops_profiler = FlopsProfiler.for_engine(self)  # None unless flops_profiler.enabled

    # ---- construction ----------------------------------------------------------------------------
    def _broadcast_model(self) -> None:
        """Every rank starts from the weights of data-parallel rank 0 (DeepSpeed does the same)."""
        if self.dp_world_size == 1:
            return
        src = comm.get_global_rank(self.dp_group, 0)
        with torch.no_grad():
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                comm.broadcast(t.data, src=src, group=self.dp_group)

    def _param_groups(self, client_optimizer, model_parameters) -> list:
        """[(params, hyper-parameters)] for each optimizer param group."""
        if isinstance(client_optimizer, torch.optim.Optimizer):
            if client_optimizer.state:
                raise ConfigError("the client optimizer already has state; pass it to initialize() "
                                  "before its first step")
            return [(list(g["params"]), {k: v for k, v in g.items() if k != "params"})
                    for g in client_optimizer.param_groups]
        params = list(model_parameters) if model_parameters is not None else list(self.module.parameters())
        if params and isinstance(params[0], dict):
            return [(list(g["params"]), {k: v for k, v in g.items() if k != "params"}) for g in params]
        return [([p for p in params if p.requires_grad], {})]

    def _configure_optimizer(self, client_optimizer, groups, to_masters):
        """The client's optimizer, a callable's, or the config's, pointed at what the mode says the
        optimizer steps (`to_masters(group index, params)`: fp32 masters) for every group."""
        remapped = [dict(hyper, params=to_masters(i, params)) for i, (params, hyper) in enumerate(groups)]
        if isinstance(client_optimizer, torch.optim.Optimizer):
            for group, new in zip(client_optimizer.param_groups, remapped):
                group["params"] = new["params"]
            client_optimizer.state.clear()
            return client_optimizer
        if callable(client_optimizer):
            return client_optimizer(remapped)
        if self.config.optimizer is not None:
            try:
                return build_optimizer(self.config.optimizer, remapped, group=self.dp_group)
            except TypeError as err:
                raise ConfigError(f"optimizer.params {self.config.optimizer.params}: {err}") from err
        return None

    def _configure_scheduler(self, client_scheduler):
        """DeepSpeed's rule: a client scheduler (or a callable making one) wins over the config's."""
        if client_scheduler is not None:
            if callable(client_scheduler) and not hasattr(client_scheduler, "step"):
                return client_scheduler(self.optimizer)
            return client_scheduler
        if self.config.scheduler is not None:
            if self.optimizer is None:
                raise ConfigError("the config has a 'scheduler' but there is no optimizer")
            return build_scheduler(self.config.scheduler, self.optimizer)
        return None

    def _dataloader(self, dataset, collate_fn):
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=self.dp_world_size,
                                                      rank=self.dp_rank)
        return torch.utils.data.DataLoader(dataset, batch_size=self.train_micro_batch_size_per_gpu(),
                                           sampler=sampler, collate_fn=collate_fn, drop_last=True)

    # ---- training --------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        t0 = time.time()
        if self.config.fp16.enabled and self.config.fp16.auto_cast:
            args = cast_inputs_half(args)  # DeepSpeed casts positional inputs only
        # Saved-tensor hooks cost a Python call per saved tensor (a few % of a small model's step),
        # so activations are measured on the first step, whenever a dashboard watches, or always
        # when `engine.track_activations = True`; the peak only changes with the input's shape.
        watch = self.track_activations or self.global_steps == 0 or events.enabled()
        self._measuring = watch  # the peak ledger samples this step too (see _probe)
        if torch.is_grad_enabled() and self.module.training and watch:
            with self.activations.track():
                out = self.module(*args, **kwargs)
        else:
            out = self.module(*args, **kwargs)
        self._phase_done("forward", t0)
        return out

    def backward(self, loss, retain_graph: bool = False, scale_wrt_gas: bool = True):
        """Returns the loss divided by the accumulation steps (scale_wrt_gas), before any fp16 loss
        scaling, as DeepSpeed does."""
        t0 = time.time()
        self.losses.append(loss.detach().float())
        if scale_wrt_gas and self.gradient_accumulation_steps() > 1:
            loss = loss / self.gradient_accumulation_steps()
        gas_scaled_loss = loss
        if self.loss_scaler is not None:
            loss = loss.float() * self.loss_scaler.loss_scale
        boundary = self.is_gradient_accumulation_boundary() and not self.inside_no_sync
        self.mode.backward_start(boundary)
        loss.backward(retain_graph=retain_graph)
        t_computed = time.time()
        self._probe("backward")  # buckets still in flight, gathered ZeRO-3 units: all exist now
        self.mode.backward_end(boundary)  # wait for the gradient collectives still in flight
        if events.enabled():  # the wait is drawn apart, so overlap with backward stays visible
            events.span("grad sync wait", "comm", t_computed, time.time(), self.global_steps)
        self._phase_done("backward", t0, end=t_computed)
        return gas_scaled_loss

    def zero_grad(self) -> None:
        self.mode.zero_grad()

    def step(self, lr_kwargs=None) -> None:
        """lr_kwargs: keyword arguments for the LR scheduler's step(), as DeepSpeed passes them."""
        if self.inside_no_sync:
            raise RuntimeError("engine.step() inside no_sync(): leave the context first (its gradients "
                               "are not synchronised yet), as DeepSpeed requires")
        t0, step = time.time(), self.global_steps
        self._step_applied = False
        if self.is_gradient_accumulation_boundary():
            if self.optimizer is None:
                raise ConfigError("engine.step() needs an optimizer: pass optimizer= to initialize() "
                                  "or add an 'optimizer' section to the config")
            self._take_model_step(lr_kwargs)
        self.micro_steps += 1
        if self.flops_profiler is not None:  # the profiled step: print its profile (rank 0)
            self.flops_profiler.after_step()
        self._phase_done("step", t0, step)

    def _phase_done(self, phase: str, t0: float, step=None, end=None) -> None:
        """Account a phase's time; when a dashboard is watching, publish its span (t0 to `end`)
        and the ledger (stamped with the optimizer step the phase belongs to)."""
        self.timers[phase] += time.time() - t0
        t1 = end or time.time()
        if events.enabled():
            step = self.global_steps if step is None else step
            events.span(phase, "compute", t0, t1, step)
            self.publish_memory(step, phase, t1)

    def publish_memory(self, step: int, phase: str, t: float) -> None:
        """The ledger now, and the last step's peak, as a dashboard event (watching costs, counted)."""
        t_ledger = time.perf_counter()
        snapshot = self._ledger()
        events.publish_seconds += time.perf_counter() - t_ledger
        peak = {c: v for c, v in self.last_peaks.items() if c not in ("total_at", "by_moment")}
        events.publish("memory", dict(step=step, phase=phase, time=t, bytes=snapshot, peak=peak))

    def _take_model_step(self, lr_kwargs=None) -> None:
        overflow = self.mode.step(self.loss_scale, self.config.gradient_clipping,
                                  check_overflow=self.loss_scaler is not None)
        if not overflow:
            self._global_grad_norm = self.mode.grad_norm
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))
        if self.loss_scaler is not None:  # may raise (ZeRO, at the minimum scale) before counting, as DeepSpeed
            self.loss_scaler.update_scale(overflow)
        self.skipped_steps += int(overflow)
        self._step_applied = not overflow
        self.zero_grad()
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        self.last_peaks, self.peaks = self.peaks, {}
        self._report(overflow)
        self.losses = []

    def _report(self, overflow: bool) -> None:
        if not self.losses:
            return
        loss = torch.stack(self.losses).mean().item()
        events.current_step = self.global_steps
        events.publish("loss", dict(step=self.global_steps - 1, loss=loss))
        for monitor in self.monitors:
            monitor.write([("Train/Samples/train_loss", loss, self.global_samples),
                           ("Train/Samples/lr", self.get_lr()[0], self.global_samples)]
                          + ([("Train/Samples/loss_scale", self.loss_scale, self.global_samples)]
                             if self.loss_scaler else []))
        every = self.config.steps_per_print
        if every and self.global_steps % every == 0 and comm.get_rank() == 0:
            print(f"[ds_lab] step={self.global_steps}, skipped={self.skipped_steps}, "
                  f"lr={self.get_lr()}, loss={loss:.4f}" + (" (overflow, step skipped)" if overflow else ""))
            if self.config.wall_clock_breakdown:
                ms = {k: 1e3 * v / every for k, v in self.timers.items()}
                print("[ds_lab] time (ms) per step | " + " | ".join(f"{k}: {v:.2f}" for k, v in ms.items()))
                self.timers = dict.fromkeys(self.timers, 0.0)

    # ---- measurement -----------------------------------------------------------------------------
    def _ledger(self) -> dict:
        params = list(self.module.parameters())
        parts = self.mode.ledger_categories()
        report = ledger({
            "params": parts["params"] + params,
            "grads": parts["grads"] + [p.grad for p in params] + [m.grad for m in self.mode.masters],
            "master_params": parts["master_params"],
            "optimizer_states": optimizer_state_tensors(self.optimizer),
            "buffers": parts.get("buffers", []) + self.mode.transient + list(self.module.buffers()),
        }, host=getattr(self.mode, "host_tensors", list)())  # ZeRO-Offload's host-resident tensors
        report["activations"] = self.activations.live
        return report

    def _probe(self, moment: str) -> None:
        """Sample the ledger at a moment of (possible) peak: the end of backward, inside the step.
        Keeps, for this optimizer step, each category's largest value and the largest total."""
        if not self._measuring:
            return
        snapshot = self._ledger()
        for category in CATEGORIES:
            self.peaks[category] = max(self.peaks.get(category, 0), snapshot[category])
        total = sum(snapshot[c] for c in CATEGORIES)
        if total > self.peaks.get("total", -1):
            self.peaks["total"], self.peaks["total_at"] = total, moment
        at = self.peaks.setdefault("by_moment", {}).setdefault(moment, {})
        for category in CATEGORIES:
            at[category] = max(at.get(category, 0), snapshot[category])

    def memory_report(self) -> dict:
        """Bytes on this rank by category, from the tensors that exist now (see monitor/memory.py),
        plus `peak`: each category's largest value inside the last measured step's backward and
        optimizer step (reduce buckets in flight, fp32 gradient copies, gathered units)."""
        report = self._ledger()
        report["activations_peak"] = self.activations.peak
        report["padding_elements"] = self.mode.padding_elements()
        report["placement"] = report.placement  # {category: {"host": bytes, "device": bytes}}
        report["peak"] = dict(self.last_peaks)
        allocator = cuda_allocator(self.device)
        if allocator:
            report["allocator"] = allocator
        return report

    def num_parameters(self) -> int:
        """Ψ: counted from the parameters' real shapes (ZeRO-3 keeps only chunks in them)."""
        return sum(math.prod(param_shape(p)) for p in self.module.parameters())

    def __getattr__(self, name):
        # unknown attributes go to the wrapped model, as DeepSpeed's engine does
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = super().__getattr__("module")
            if hasattr(module, name):
                return getattr(module, name)
            raise

