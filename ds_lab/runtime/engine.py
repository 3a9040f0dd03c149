"""The engine: forward, backward, step, with DeepSpeed's names and semantics.

    engine, optimizer, _, _ = ds_lab.initialize(model=model, config=cfg)
    for batch in loader:
        loss = engine(**batch).loss
        engine.backward(loss)          # loss / accumulation steps (x loss scale in fp16)
        engine.step()                  # acts only at the accumulation boundary

One optimizer step = `gradient_accumulation_steps` micro-steps on every data-parallel rank:
    train_batch_size = micro_batch_per_gpu x gradient_accumulation_steps x data-parallel size

At the boundary `step()` does, in order: (fp16) check for inf/nan and skip the step if any, with
the loss scaler adjusting; copy gradients to the fp32 master weights (bf16/fp16); unscale and clip
them to `gradient_clipping` by their global norm; run the optimizer; copy the master weights back;
step the LR scheduler; zero the gradients. Gradients were already averaged over the data-parallel
ranks during backward: all-reduced in buckets at stage 0 (`runtime/data_parallel.py`), or
reduce-scattered into each rank's shard under ZeRO (`zero/stage1.py`, `stage2.py`, `stage3.py`,
which then also own the fp32 master shards and the sharded step: `zero/partition.py`).
"""
from __future__ import annotations

import math
import time

import torch

from ds_lab import comm
from ds_lab.config import ConfigError, DeepSpeedConfig
from ds_lab.monitor import events
from ds_lab.monitor.monitors import build_monitors
from ds_lab.monitor.memory import ActivationTracker, cuda_allocator, ledger, optimizer_state_tensors
from ds_lab.optim import build_optimizer
from ds_lab.runtime import checkpoint
from ds_lab.runtime.data_parallel import BucketedAllReduce
from ds_lab.runtime.lr_schedules import build_scheduler
from ds_lab.zero.partition import param_shape
from ds_lab.runtime.precision import DTYPES, has_overflow, make_loss_scaler


class DeepSpeedEngine(torch.nn.Module):
    def __init__(self, model, config: DeepSpeedConfig, optimizer=None, model_parameters=None,
                 lr_scheduler=None, training_data=None, collate_fn=None, mpu=None):
        super().__init__()
        self.module = model
        self.config = config
        self.mpu = mpu
        self.dp_group = mpu.get_data_parallel_group() if mpu is not None else None
        self.dp_world_size = comm.get_world_size(self.dp_group)
        self.dp_rank = comm.get_rank(self.dp_group)
        self.device = comm.device()
        self.precision = config.precision
        self.global_steps = self.global_samples = self.micro_steps = self.skipped_steps = 0
        self._global_grad_norm = None
        self._step_applied = False
        self.losses = []  # this optimizer step's micro-batch losses (unscaled), for monitors

        model.to(self.device)
        self._broadcast_model()
        groups = self._param_groups(optimizer, model_parameters)
        zero = config.zero_optimization
        self.zero, self.reducer = None, None
        if zero.stage == 0:
            self.optimizer, self.master_params = self._configure_optimizer(optimizer, groups, self._stage0_masters)
            self._to_model_dtype()
            self.reducer = BucketedAllReduce(list(model.parameters()), zero.reduce_bucket_size,
                                             group=self.dp_group,
                                             overlap=True if zero.overlap_comm is None else zero.overlap_comm)
        else:  # ZeRO: the masters are fp32 shards made from the fp32 weights, before any cast
            from ds_lab.zero import build_zero_optimizer
            self.zero = build_zero_optimizer(zero, model, [params for params, _ in groups], self.dp_group,
                                             DTYPES[self.precision], self.device)
            self._to_model_dtype()
            self.zero.attach()
            self.optimizer, _ = self._configure_optimizer(optimizer, groups, lambda i, params: [self.zero.masters[i]])
            self.zero.optimizer = self.optimizer
            self.master_params, self.master_of = self.zero.masters, {}
        self.loss_scaler = make_loss_scaler(config.fp16)
        self.lr_scheduler = self._configure_scheduler(lr_scheduler)
        self.training_dataloader = self._dataloader(training_data, collate_fn) if training_data is not None else None
        self.activations = ActivationTracker(exclude=list(model.parameters()),
                                             live_param_storages=getattr(self.zero, "live_storages", None))
        self.timers = {"forward": 0.0, "backward": 0.0, "step": 0.0}
        self.track_activations = False
        self.monitors = build_monitors(config, rank=comm.get_rank())
        if config.comms_logger.enabled and config.comms_logger.verbose:
            comm.add_listener(self._print_comm)

    def _print_comm(self, rec) -> None:
        """comms_logger.verbose: one line per collective as it completes (DeepSpeed's format)."""
        ops = self.config.comms_logger.prof_ops
        if self.config.comms_logger.prof_all or rec.op in ops:
            print(f"[ds_lab] comm op: {rec.op} | time (ms): {rec.seconds * 1e3:.2f} | msg size: {rec.bytes} B | "
                  f"algbw (Gbps): {rec.algbw * 8 / 1e9:.2f} | busbw (Gbps): {rec.busbw * 8 / 1e9:.2f}")

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

    def _stage0_masters(self, index, params):
        """Data parallel: fp32 keeps the parameters themselves; mixed precision adds an fp32
        master copy per parameter (the optimizer never sees the 2-byte weights)."""
        if self.precision == "fp32":
            return params
        for p in params:
            if p not in self.master_of:
                self.master_of[p] = torch.nn.Parameter(p.detach().clone().float())
        return [self.master_of[p] for p in params]

    def _configure_optimizer(self, client_optimizer, groups, to_masters):
        """Return (optimizer, master params): the client's optimizer, a callable's, or the config's,
        pointed at `to_masters(group index, params)` for every group."""
        self.master_of = {}  # model param -> fp32 master (stage 0, mixed precision)
        remapped = [dict(hyper, params=to_masters(i, params)) for i, (params, hyper) in enumerate(groups)]
        if isinstance(client_optimizer, torch.optim.Optimizer):
            for group, new in zip(client_optimizer.param_groups, remapped):
                group["params"] = new["params"]
            client_optimizer.state.clear()
            optimizer = client_optimizer
        elif callable(client_optimizer):
            optimizer = client_optimizer(remapped)
        elif self.config.optimizer is not None:
            try:
                optimizer = build_optimizer(self.config.optimizer, remapped)
            except TypeError as err:
                raise ConfigError(f"optimizer.params {self.config.optimizer.params}: {err}") from err
        else:
            optimizer = None
        return optimizer, list(self.master_of.values())

    def _to_model_dtype(self) -> None:
        if self.precision != "fp32":
            self.module.to(DTYPES[self.precision])  # same Parameter objects, now 2 bytes each

    def _configure_scheduler(self, client_scheduler):
        if self.config.scheduler is not None:
            if self.optimizer is None:
                raise ConfigError("the config has a 'scheduler' but there is no optimizer")
            return build_scheduler(self.config.scheduler, self.optimizer)
        if callable(client_scheduler) and not hasattr(client_scheduler, "step"):
            return client_scheduler(self.optimizer)
        return client_scheduler

    def _dataloader(self, dataset, collate_fn):
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=self.dp_world_size,
                                                      rank=self.dp_rank)
        return torch.utils.data.DataLoader(dataset, batch_size=self.train_micro_batch_size_per_gpu(),
                                           sampler=sampler, collate_fn=collate_fn, drop_last=True)

    # ---- DeepSpeed's accessors -------------------------------------------------------------------
    def train_batch_size(self) -> int:
        return self.config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def get_lr(self) -> list:
        return [g["lr"] for g in self.optimizer.param_groups] if self.optimizer else []

    def get_global_grad_norm(self):
        return self._global_grad_norm

    def was_step_applied(self) -> bool:
        return self._step_applied

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale if self.loss_scaler else 1.0

    # ---- training --------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        t0 = time.time()
        # Saved-tensor hooks cost a Python call per saved tensor (a few % of a small model's step),
        # so activations are measured on the first step, whenever a dashboard watches, or always
        # when `engine.track_activations = True`; the peak only changes with the input's shape.
        watch = self.track_activations or self.global_steps == 0 or events.enabled()
        if torch.is_grad_enabled() and self.module.training and watch:
            with self.activations.track():
                out = self.module(*args, **kwargs)
        else:
            out = self.module(*args, **kwargs)
        self._phase_done("forward", t0)
        return out

    def backward(self, loss, retain_graph: bool = False, scale_wrt_gradient_accumulation_steps: bool = True):
        t0 = time.time()
        self.losses.append(loss.detach().float())
        if scale_wrt_gradient_accumulation_steps and self.gradient_accumulation_steps() > 1:
            loss = loss / self.gradient_accumulation_steps()
        if self.loss_scaler is not None:
            loss = loss.float() * self.loss_scaler.loss_scale
        boundary = self.is_gradient_accumulation_boundary()
        sync = self.zero if self.zero is not None else self.reducer
        sync.backward_start(boundary)
        loss.backward(retain_graph=retain_graph)
        t_computed = time.time()
        sync.backward_end(boundary)  # wait for the gradient collectives still in flight
        if events.enabled():  # the wait is drawn apart, so overlap with backward stays visible
            events.span("grad sync wait", "comm", t_computed, time.time(), self.global_steps)
        self._phase_done("backward", t0, end=t_computed)
        return loss

    def zero_grad(self) -> None:
        (self.zero or self.reducer).zero_grad()

    def step(self) -> None:
        t0, step = time.time(), self.global_steps
        if self.is_gradient_accumulation_boundary():
            if self.optimizer is None:
                raise ConfigError("engine.step() needs an optimizer: pass optimizer= to initialize() "
                                  "or add an 'optimizer' section to the config")
            self._take_model_step()
        self.micro_steps += 1
        self._phase_done("step", t0, step)

    def _phase_done(self, phase: str, t0: float, step=None, end=None) -> None:
        """Account a phase's time; when a dashboard is watching, publish its span (t0 to `end`)
        and the ledger (stamped with the optimizer step the phase belongs to)."""
        self.timers[phase] += time.time() - t0
        t1 = end or time.time()
        if events.enabled():
            step = self.global_steps if step is None else step
            t_ledger = time.perf_counter()
            snapshot = self._ledger()
            events.publish_seconds += time.perf_counter() - t_ledger  # watching costs, counted
            events.span(phase, "compute", t0, t1, step)
            events.publish("memory", dict(step=step, phase=phase, time=t1, bytes=snapshot))

    def _take_model_step(self) -> None:
        if self.zero is not None:
            overflow = self.zero.step(self.loss_scale, self.config.gradient_clipping,
                                      check_overflow=self.loss_scaler is not None)
            if not overflow:
                self._global_grad_norm = self.zero.grad_norm
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
        else:
            overflow = self.loss_scaler is not None and self._overflow()
            if not overflow:
                self._apply_step([p for p in self.module.parameters() if p.requires_grad])
        self.skipped_steps += int(overflow)
        self._step_applied = not overflow
        if self.loss_scaler is not None:
            self.loss_scaler.update_scale(overflow)
        self.zero_grad()
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        self._report(overflow)
        self.losses = []

    def _overflow(self) -> bool:
        """Any inf/nan in any rank's gradients? All ranks must agree, or they would diverge."""
        flag = torch.tensor([float(has_overflow([self.reducer.buffer]))], device=self.device)
        if self.dp_world_size > 1:
            with comm.tag("overflow_check"):
                comm.all_reduce(flag, op=comm.ReduceOp.MAX, group=self.dp_group)
        return bool(flag.item())

    def _apply_step(self, model_params) -> None:
        if self.master_of:
            for p, master in self.master_of.items():
                master.grad = p.grad.float() if p.grad is not None else None
            grads = [m.grad for m in self.master_of.values() if m.grad is not None]
        else:
            grads = [p.grad for p in model_params if p.grad is not None]
        inv_scale = 1.0 / self.loss_scale
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.float() for g in grads]))) * inv_scale
        self._global_grad_norm = norm.item()
        clip = self.config.gradient_clipping
        if clip > 0:  # as torch.nn.utils.clip_grad_norm_ computes it (a float32 tensor), times 1/scale
            torch._foreach_mul_(grads, torch.clamp(clip / (norm + 1e-6), max=1.0) * inv_scale)
        elif inv_scale != 1.0:
            torch._foreach_mul_(grads, inv_scale)
        self.optimizer.step()
        if self.master_of:
            with torch.no_grad():
                for p, master in self.master_of.items():
                    p.copy_(master)
                    master.grad = None  # the fp32 gradient copy lives only during the step
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

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
        if self.zero is not None:
            parts = self.zero.ledger_categories()
        else:
            parts = dict(params=params, grads=[self.reducer.buffer], master_params=self.master_params)
        report = ledger({
            "params": parts["params"] + params,
            "grads": parts["grads"] + [p.grad for p in params],
            "master_params": parts["master_params"],
            "optimizer_states": optimizer_state_tensors(self.optimizer),
            "buffers": parts.get("buffers", []) + list(self.module.buffers()),
        })
        report["activations"] = self.activations.live
        return report

    def memory_report(self) -> dict:
        """Bytes on this rank by category, from the tensors that exist now (see monitor/memory.py)."""
        report = self._ledger()
        report["activations_peak"] = self.activations.peak
        if self.zero is not None:
            report["padding_elements"] = sum(u.padded - u.numel for u in self.zero.units)
        else:
            report["padding_elements"] = 0  # data parallel's flat buffer is exactly Ψ
        allocator = cuda_allocator(self.device)
        if allocator:
            report["allocator"] = allocator
        return report

    def num_parameters(self) -> int:
        """Ψ: counted from the parameters' real shapes (ZeRO-3 keeps only chunks in them)."""
        return sum(math.prod(param_shape(p)) for p in self.module.parameters())

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest: bool = True):
        return checkpoint.save(self, save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False):
        return checkpoint.load(self, load_dir, tag=tag, strict=load_module_strict,
                               load_optimizer_states=load_optimizer_states and not load_module_only,
                               load_lr_scheduler_states=load_lr_scheduler_states and not load_module_only)

    def __getattr__(self, name):
        # unknown attributes go to the wrapped model, as DeepSpeed's engine does
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = super().__getattr__("module")
            if hasattr(module, name):
                return getattr(module, name)
            raise

