"""PipelineEngine: `train_batch()` runs one batch of m micro-batches through P stages by executing
the stage's schedule (schedule.py), then one optimizer step on every stage.

    engine, _, _, _ = ds_lab.initialize(model=PipelineModule(...), config=cfg)
    loss = engine.train_batch(data_iter)     # data_iter yields (inputs, labels), m times per batch

Per batch, on the stage's ranks:
    ForwardPass / BackwardPass   the stage's layers on one micro-batch (the last stage backpropagates
                                 loss / m, so the gradients sum to the batch mean's)
    Send/Recv Activation, Grad   p2p.py, through ds_lab.comm
    ReduceTiedGrads              tied weights: g = sum over the stages holding them (module.py)
    ReduceGrads                  the mode's data-parallel sync (all-reduce, or ZeRO-1's reduce-scatter):
                                 mode.backward_start(True); mode.backward_end(True), once per batch, after
                                 the tied sum (ZeRO-1 keeps only its averaged chunk, so the sum must come first)
    OptimizerStep                the engine's one step (mode.step: global norm over the whole grid,
                                 clipping, optimizer), on every stage

The loss returned is DeepSpeed's: the mean of loss_fn over the m micro-batches on the last stage,
averaged over data-parallel replicas, broadcast along the pipe — the same value on every rank.
ZeRO-2/3 are refused: they reduce (2) or gather (3) per micro-batch backward, which a pipeline
runs m times per stage per batch (DeepSpeed refuses them too).

Measured on every batch: `engine.timeline` (each forward/backward/reduce/step span, the stage's row
of the Gantt chart; bubble.py turns them into the idle share), `engine.peak_live_micro_batches` and,
on the engine's measured steps, the saved-activation peak in `memory_report()["activations_peak"]`
(1F1B: P - s micro-batches' worth on stage s; AFAB: m). Checkpoints: checkpoint.py.
"""
from __future__ import annotations

import contextlib
import time

import torch

from ds_lab import comm
from ds_lab.config import ConfigError
from ds_lab.monitor import events
from ds_lab.pipe import checkpoint as pipe_checkpoint
from ds_lab.pipe.p2p import StageLink, as_tuple
from ds_lab.pipe.schedule import InferenceSchedule, make_schedule
from ds_lab.runtime.engine import DeepSpeedEngine


class PipelineError(RuntimeError):
    """A call that a pipeline engine does not take (DeepSpeed's name)."""


class PipelineEngine(DeepSpeedEngine):
    def __init__(self, model, config, grid, build_mode, **kwargs):
        if config.zero_optimization.stage >= 2:
            raise ConfigError(f"ZeRO stage {config.zero_optimization.stage} is incompatible with pipeline "
                              f"parallelism: it reduce-scatters (2) or gathers parameters (3) at every micro-batch's "
                              f"backward, and a pipeline stage runs m backwards per batch interleaved with its "
                              f"neighbours'; use zero_optimization.stage 0 or 1 (as DeepSpeed requires)")
        pipe = config.pipeline
        if pipe.stages != "auto" and pipe.stages != model.num_stages:
            raise ConfigError(f"pipeline.stages {pipe.stages} != the PipelineModule's num_stages {model.num_stages}")
        virtual = pipe.virtual_stages or model.virtual_stages
        if virtual != model.virtual_stages:
            raise ConfigError(f"pipeline.virtual_stages {virtual} != the PipelineModule's {model.virtual_stages}; "
                              f"build PipelineModule(..., virtual_stages={virtual})")
        schedule = pipe.schedule if "schedule" in config.raw.get("pipeline", {}) else \
            ("interleaved" if virtual > 1 else "1f1b")
        if (schedule == "interleaved") != (virtual > 1):
            raise ConfigError(f"pipeline.schedule {schedule!r} with virtual_stages {virtual}: the interleaved "
                              f"schedule needs virtual_stages >= 2, the others exactly 1")
        if config.precision == "bf16":  # DeepSpeed's pipelines step bf16 with BF16_Optimizer, which takes
            build_mode = _without_zero_grad_step(build_mode)  # no zero-gradient step at construction
        super().__init__(model, config, grid, build_mode, **kwargs)
        self.schedule_name, self.virtual_stages = schedule, virtual
        self.num_stages, self.stage_id = grid.size("pipe"), grid.rank_in("pipe")
        self.micro_batches = config.gradient_accumulation_steps
        make_schedule(schedule, self.micro_batches, self.num_stages, self.stage_id, virtual)  # refuse early
        self.link = StageLink(grid, self.device)
        self.agg_train_loss = self.agg_eval_loss = None
        self.timeline = []  # the last batch's compute spans: (kind, micro_batch, global chunk, t0, t1)
        self._data_iterator = None
        self.peak_live_micro_batches = 0  # the last batch's most forwarded-but-not-backwarded micro-batches

    # ---- DeepSpeed's pipeline accessors ------------------------------------------------------------
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def set_dataiterator(self, iterator) -> None:
        self._data_iterator = iterator

    def forward(self, *args, **kwargs):
        raise PipelineError("a pipeline engine runs whole batches: call engine.train_batch(data_iter) "
                            "(or eval_batch) instead of engine(...)")

    def backward(self, *args, **kwargs):
        raise PipelineError("a pipeline engine does forward, backward and step inside "
                            "engine.train_batch(data_iter); do not call engine.backward()")

    def step(self, *args, **kwargs):
        raise PipelineError("a pipeline engine steps inside engine.train_batch(data_iter); "
                            "do not call engine.step()")

    # ---- checkpoints: DeepSpeed's per-layer files next to the per-stage ones (checkpoint.py) ----------
    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False):
        if exclude_frozen_parameters:
            raise PipelineError("exclude_frozen_parameters is not supported by ds_lab's pipeline checkpoints "
                                "(per-layer files keep every parameter); save without it")
        return pipe_checkpoint.save(self, save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict: bool = True, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False, custom_load_fn=None):
        if custom_load_fn is not None:
            raise PipelineError("custom_load_fn is not supported by ds_lab's pipeline checkpoints (they load "
                                "per layer); load without it")
        return pipe_checkpoint.load(self, load_dir, tag=tag, strict=load_module_strict,
                                    load_optimizer_states=load_optimizer_states,
                                    load_lr_scheduler_states=load_lr_scheduler_states,
                                    load_module_only=load_module_only)

    # ---- batches -----------------------------------------------------------------------------------
    def train_batch(self, data_iter=None):
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the batch loss."""
        if not torch.is_grad_enabled():
            raise PipelineError("train_batch() needs gradients: do not call it under torch.no_grad()")
        self.module.train()
        sched = make_schedule(self.schedule_name, self.micro_batches, self.num_stages, self.stage_id,
                              self.virtual_stages)
        self._run(sched, self._iterator(data_iter), train=True)
        return self.agg_train_loss

    def eval_batch(self, data_iter, return_logits=False, compute_loss=True, reduce_output="avg"):
        """Forward only over m micro-batches; returns the mean loss (every rank the same value)."""
        if return_logits or not compute_loss or reduce_output != "avg":
            raise PipelineError("eval_batch supports the defaults only: return_logits=False, "
                                "compute_loss=True, reduce_output='avg'")
        was_training = self.module.training
        self.module.eval()
        sched = InferenceSchedule(self.micro_batches, self.num_stages, self.stage_id, self.virtual_stages)
        with torch.no_grad():
            self._run(sched, self._iterator(data_iter), train=False)
        self.agg_eval_loss = self._aggregate_loss()
        self.module.train(was_training)
        return self.agg_eval_loss

    def _iterator(self, data_iter):
        if data_iter is not None:
            return data_iter
        if self._data_iterator is None:
            if self.training_dataloader is None:
                raise PipelineError("train_batch() needs data_iter (or training_data= given to initialize)")
            self._data_iterator = iter(self.training_dataloader)
        return self._data_iterator

    def _run(self, sched, data_iter, train: bool) -> None:
        self._data, self._batches, self._inputs, self._outputs, self._grads = data_iter, {}, {}, {}, {}
        self._losses, self.timeline, self._train = [], [], train
        self.peak_live_micro_batches = 0
        # saved activations are measured over the whole batch (the peak is what the schedule keeps alive:
        # 1F1B at most P - s micro-batches on stage s, AFAB all m), on the engine's usual steps
        watch = train and (self.track_activations or self.global_steps == 0 or events.enabled())
        self._measuring = watch  # the peak ledger samples only the batches measured (see engine._probe)
        with self.activations.track() if watch else contextlib.nullcontext():
            for step in sched:
                for cmd in step:
                    getattr(self, "_exec_" + cmd.name)(cmd)
        self.link.wait()

    # ---- the instructions --------------------------------------------------------------------------
    def _global(self, chunk: int) -> int:
        return chunk * self.num_stages + self.stage_id

    def _exec_LoadMicroBatch(self, cmd) -> None:
        if cmd.micro_batch not in self._batches:  # a stage holding first and last chunk loads once
            inputs, labels = next(self._data)
            self._batches[cmd.micro_batch] = (_to(inputs, self.device), _to(labels, self.device))

    def _exec_ForwardPass(self, cmd) -> None:
        key, t0 = (cmd.micro_batch, cmd.chunk), time.time()
        if self.module.is_first_chunk(cmd.chunk):
            x = self._batches[cmd.micro_batch][0]
        else:
            x = self._inputs[key]
            x = x if len(x) > 1 else x[0]
        out = self.module(x, chunk=cmd.chunk)
        if self.module.is_last_chunk(cmd.chunk):
            loss_fn = self.module.loss_fn
            out = loss_fn(out, self._batches[cmd.micro_batch][1]) if loss_fn is not None else out
            self._losses.append(out.detach().float())
        self._outputs[key] = out
        self.peak_live_micro_batches = max(self.peak_live_micro_batches, len(self._outputs))
        self._span("forward", cmd, t0)

    def _exec_SendActivation(self, cmd) -> None:
        g = self._global(cmd.chunk)
        self.link.send_activation(self._outputs[(cmd.micro_batch, cmd.chunk)], (g + 1) % self.num_stages,
                                  (g + 1, self._train))
        if not self._train:
            del self._outputs[(cmd.micro_batch, cmd.chunk)]

    def _exec_RecvActivation(self, cmd) -> None:
        g = self._global(cmd.chunk)
        received = self.link.recv_activation((g - 1) % self.num_stages, (g, self._train))
        if self._train:
            for t in received:
                if t.is_floating_point():
                    t.requires_grad_()
        self._inputs[(cmd.micro_batch, cmd.chunk)] = received

    def _exec_RecvGrad(self, cmd) -> None:
        g = self._global(cmd.chunk)
        sent = [t for t in as_tuple(self._outputs[(cmd.micro_batch, cmd.chunk)]) if t.is_floating_point()]
        self._grads[(cmd.micro_batch, cmd.chunk)] = self.link.recv_grads(sent, (g + 1) % self.num_stages)

    def _exec_BackwardPass(self, cmd) -> None:
        key, t0 = (cmd.micro_batch, cmd.chunk), time.time()
        out = self._outputs.pop(key)
        self.mode.backward_start(False)  # accumulate only: the data-parallel sync is ReduceGrads
        if self.module.is_last_chunk(cmd.chunk):
            scale = self.loss_scale / self.micro_batches
            (out.float() * scale).backward()
        else:
            outs = [t for t in as_tuple(out) if t.is_floating_point()]
            pairs = [(o, g) for o, g in zip(outs, self._grads.pop(key)) if o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        self.mode.backward_end(False)
        inputs = self._inputs.pop(key, ())
        self._grads[key] = [t.grad if t.grad is not None else torch.zeros_like(t)
                            for t in inputs if t.is_floating_point()]
        self._span("backward", cmd, t0)

    def _exec_SendGrad(self, cmd) -> None:
        g = self._global(cmd.chunk)
        self.link.send_grads(self._grads.pop((cmd.micro_batch, cmd.chunk)), (g - 1) % self.num_stages)

    def _exec_ReduceTiedGrads(self, cmd) -> None:
        self.link.wait()
        self.module.allreduce_tied_weight_gradients()

    def _exec_ReduceGrads(self, cmd) -> None:
        t0 = time.time()
        self.mode.backward_start(True)  # nothing runs backward in between: the mode syncs every unit
        self.mode.backward_end(True)
        self._span("reduce grads", cmd, t0)

    def _exec_OptimizerStep(self, cmd) -> None:
        if self.optimizer is None:
            raise ConfigError("train_batch() needs an optimizer: pass optimizer= to initialize() "
                              "or add an 'optimizer' section to the config")
        t0 = time.time()
        self.agg_train_loss = self._aggregate_loss()
        self.losses = [self.agg_train_loss]  # what the engine's monitors report for this step
        self._take_model_step()
        self.micro_steps += self.micro_batches
        self._span("step", cmd, t0)

    # ---- the loss every rank returns ---------------------------------------------------------------
    def _aggregate_loss(self) -> torch.Tensor:
        """mean over micro-batches (last stage), averaged over data-parallel replicas, broadcast along the pipe."""
        if self.is_last_stage():
            loss = torch.stack(self._losses).mean()
            if self.dp_world_size > 1:
                with comm.tag("pipe_loss"):
                    comm.all_reduce(loss, group=self.dp_group)
                loss = loss / self.dp_world_size
        else:
            loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.num_stages > 1:
            with comm.tag("pipe_loss"):
                comm.broadcast(loss, src=self.link.rank_of(self.num_stages - 1), group=self.grid.group("pipe"))
        return loss

    def _span(self, phase: str, cmd, t0: float) -> None:
        t1 = time.time()
        chunk = self._global(cmd.chunk) if cmd.micro_batch is not None else None
        self.timeline.append((phase, cmd.micro_batch, chunk, t0, t1))
        if events.enabled():  # one legend entry per phase; the micro-batch is in engine.timeline
            step = self.global_steps - 1 if phase == "step" else self.global_steps  # the step just taken
            events.span(phase, "compute", t0, t1, step)
            if phase == "step":
                self.publish_memory(step, phase, t1)


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device) for t in x)
    return x


def _without_zero_grad_step(build_mode):
    """The mode builder, with stage 0's zero-gradient step at init switched off (runtime/data_parallel.py)."""
    def build(*args, **kwargs):
        mode = build_mode(*args, **kwargs)
        mode.zero_grad_step_at_init = False
        return mode
    return build
