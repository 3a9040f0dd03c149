"""Activation checkpointing: keep only a segment's inputs in forward, recompute its inside in backward.

    import ds_lab as deepspeed                                   # deepspeed.checkpointing is this module
    deepspeed.checkpointing.configure(mpu, partition_activations=True)
    x = deepspeed.checkpointing.checkpoint(block, x)             # instead of x = block(x)

What it saves (b batch, s sequence, h hidden, fp32). A transformer block keeps 16·b·s·h elements
for backward: its input, and inside it the ln_1 output, qkv (3), the attention output, the ln_2
input and output, the MLP's 4h input and output of GeLU (4 + 4), plus LayerNorm statistics and
attention's log-sum-exp (per token, not per element). A checkpointed block keeps only its input,
b·s·h elements; in backward it runs its forward again (with the random state of the first run, so
dropout draws the same masks) and then its backward, so one block's inside exists at a time:

    activations ~ L·16·b·s·h  ->  L·b·s·h + 15·b·s·h          (L blocks, every block checkpointed)

Price: one more forward of every checkpointed segment (the flops profiler's `recompute_fwd_factor` = 1).

Options (DeepSpeed's `activation_checkpointing` config section, or `configure`'s keywords):

    partition_activations         each of the T ranks of the model-parallel group keeps 1/T of every
                                  floating-point input (flattened; padded to a multiple of T) and
                                  all-gathers it before the recompute: b·s·h/T elements kept per
                                  block, and (T-1)/T of the input's bytes received per segment in
                                  backward. With T = 1 it keeps the whole input.
    cpu_checkpointing             the kept inputs go to host memory and come back for the recompute.
                                  On a CPU they already are in host memory: nothing moves.
    contiguous_memory_optimization  DeepSpeed copies the kept partitions into one preallocated buffer
                                  per checkpoint so that CUDA's caching allocator does not fragment.
                                  Here it is accepted (with `number_checkpoints`, as DeepSpeed
                                  requires) and does nothing: the tensors are kept where they are;
                                  a warning says so.
    synchronize_checkpoint_boundary  wait for the accelerator at each segment's start and end
                                  (torch.cuda.synchronize; nothing to wait for on a CPU).
    profile                       print each segment's forward and backward time (rank 0).

The memory ledger sees what is kept: the inputs are saved with `ctx.save_for_backward`, so the
engine's saved-tensor hooks (monitor/memory.py) count them during forward; and when the ledger
measured the forward, the recompute in backward is counted by the same hooks, so `activations_peak`
includes the one block whose activations exist again while it back-propagates.
"""
from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, fields

import torch

from ds_lab import comm
from ds_lab.comm.topology import get_grid
from ds_lab.config.features import ActivationCheckpointingConfig
from ds_lab.monitor.memory import ActivationTracker
from ds_lab.parallel.random import (device_rng_state, get_cuda_rng_tracker,  # noqa: F401 (re-exported)
                                    get_rng_tracker, model_parallel_cuda_manual_seed, set_device_rng_state)

SECTION = "activation_checkpointing"
OPTIONS = tuple(f.name for f in fields(ActivationCheckpointingConfig))  # the config section's keys


@dataclass
class Settings(ActivationCheckpointingConfig):
    """The module's state, as DeepSpeed keeps it in globals (PARTITION_ACTIVATIONS, CPU_CHECKPOINT, ...):
    the config section's options, plus where they came from."""

    configured: bool = False
    mpu: object = None  # what names the model-parallel group: an mpu, or the engine's grid
    from_engine: bool = False  # set by an engine from its config: the next engine replaces them


settings = Settings()


def _forget_mpu() -> None:
    """comm.destroy's hook: the mpu named process groups that are gone; holding it would keep them
    (and their backend threads) alive."""
    settings.mpu = None


comm.at_destroy(_forget_mpu)


def _section(deepspeed_config) -> dict:
    """The `activation_checkpointing` section of a config given as a path, a dict or a DeepSpeedConfig."""
    if isinstance(deepspeed_config, str):
        with open(deepspeed_config, encoding="utf-8") as f:
            deepspeed_config = json.load(f)
    if isinstance(deepspeed_config, dict):
        section = deepspeed_config.get(SECTION, {}) or {}
    else:  # a parsed config: a dataclass or a dict under the same name
        section = getattr(deepspeed_config, SECTION, None) or {}
        if not isinstance(section, dict):
            section = {key: getattr(section, key) for key in OPTIONS if hasattr(section, key)}
    unknown = sorted(set(section) - set(OPTIONS))
    if unknown:
        raise ValueError(f"activation_checkpointing: unknown key(s) {unknown}; the section takes {list(OPTIONS)}")
    return dict(section)


def configure(mpu_, deepspeed_config=None, partition_activations=None, contiguous_checkpointing=None,
              num_checkpoints=None, checkpoint_in_cpu=None, synchronize=None, profile=None) -> None:
    """DeepSpeed's `deepspeed.checkpointing.configure`: defaults, then the config's section, then the
    keywords given (each overrides the config). `mpu_`: an object with get_model_parallel_{group,
    rank,world_size} (or Megatron's get_tensor_model_parallel_*), e.g. the engine's grid; None keeps
    the one set before, else the grid of `ds_lab.parallel.initialize_model_parallel`, else no model
    parallelism (T = 1)."""
    reset_settings = Settings(configured=True, mpu=mpu_ if mpu_ is not None else settings.mpu)
    values = _section(deepspeed_config) if deepspeed_config is not None else {}
    keywords = dict(partition_activations=partition_activations,
                    contiguous_memory_optimization=contiguous_checkpointing, number_checkpoints=num_checkpoints,
                    cpu_checkpointing=checkpoint_in_cpu, synchronize_checkpoint_boundary=synchronize, profile=profile)
    values.update({k: v for k, v in keywords.items() if v is not None})
    new = Settings(**{**reset_settings.__dict__, **values})
    if new.contiguous_memory_optimization:
        if not new.partition_activations:
            raise ValueError("contiguous_memory_optimization needs partition_activations: set "
                             "\"partition_activations\": true (as DeepSpeed requires)")
        if new.number_checkpoints is None:
            raise ValueError("contiguous_memory_optimization needs number_checkpoints (the number of "
                             "checkpointed segments per forward): set it, as DeepSpeed requires")
        warnings.warn("activation_checkpointing.contiguous_memory_optimization is accepted and does nothing "
                      "in ds_lab: kept activations are not copied into one preallocated buffer (it only "
                      "avoids CUDA caching-allocator fragmentation)", stacklevel=2)
    settings.__dict__.update(new.__dict__)


def configure_from(config, grid) -> None:
    """The engine's call: the engine's grid names the model-parallel group, and a config section
    that sets anything is applied as `configure(grid, deepspeed_config=config)` would, unless the
    script configured the module itself (DeepSpeed applies the section only when a script calls
    `configure`; ds_lab honours it either way, since an accepted key is never ignored)."""
    if settings.configured and not settings.from_engine:  # the script's own configure() stands
        if settings.mpu is None:
            settings.mpu = grid
        return
    section, defaults = _section(config), Settings()
    if any(getattr(defaults, key) != value for key, value in section.items()):
        configure(grid, deepspeed_config=config)
    else:  # no section: DeepSpeed's defaults, not "configured", with this engine's grid
        settings.__dict__.update(Settings(mpu=grid).__dict__)
    settings.from_engine = True


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    """DeepSpeed's switch for partition_activations alone."""
    settings.partition_activations = bool(partition_activation)


def set_num_layers(nlayers: int) -> None:
    """DeepSpeed's setter for number_checkpoints."""
    settings.number_checkpoints = nlayers


def is_configured() -> bool:
    """True once `configure` ran (DeepSpeed's meaning); checkpoint() works without it, T = 1."""
    return settings.configured


def reset() -> None:
    """DeepSpeed frees the contiguous buffers here (call it after forwards without backward). There
    are no such buffers in ds_lab, so nothing is held between calls: a no-op kept for the API."""


def _model_parallel():
    """(group, rank, size) of the model-parallel axis the partitions are spread over."""
    mpu = settings.mpu if settings.mpu is not None else get_grid()
    if mpu is None:
        return None, 0, 1
    if hasattr(mpu, "get_tensor_model_parallel_rank"):
        return (mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_rank(),
                mpu.get_tensor_model_parallel_world_size())
    size = mpu.get_model_parallel_world_size()
    group = mpu.get_model_parallel_group() if size > 1 else None
    return group, mpu.get_model_parallel_rank(), size


def _is_activation(item, size: int) -> bool:
    """DeepSpeed's rule: floating-point tensors (not marked `no_checkpointing`) are partitioned."""
    return (torch.is_tensor(item) and item.is_floating_point() and item.numel() >= size
            and not getattr(item, "no_checkpointing", False))


def _synchronize() -> None:
    if settings.synchronize_checkpoint_boundary and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _rng_state() -> dict:
    """The default generators (CPU, CUDA) and the tensor-parallel tracker's named streams."""
    return dict(device_rng_state(), tracker=dict(get_rng_tracker().states))


def _set_rng_state(state: dict) -> None:
    set_device_rng_state(state)
    get_rng_tracker().states = dict(state["tracker"])


def _log(what: str, t0: float) -> None:
    if settings.profile and (not comm.is_initialized() or comm.get_rank() == 0):
        print(f"[ds_lab] activation checkpoint {what}: {1e3 * (time.perf_counter() - t0):.2f} ms")


def _ledger_hooks():
    """The memory ledger's saved-tensor hooks, when it is measuring this forward (else None)."""
    top_of_stack = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # torch >= 2.1
    top = top_of_stack(False) if top_of_stack is not None else None
    return top if top is not None and isinstance(getattr(top[0], "__self__", None), ActivationTracker) else None


def _counted(hooks):
    """The recompute's saved tensors go to the same ledger as the forward's (its peak includes them)."""
    return torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else contextlib.nullcontext()


class CheckpointFunction(torch.autograd.Function):
    """Forward without a graph, keeping the inputs (or this rank's 1/T of them); backward re-runs the
    forward with the same random state and back-propagates through it (torch.utils.checkpoint's
    reentrant form, as DeepSpeed's)."""

    @staticmethod
    def forward(ctx, run_function, all_outputs, *args):
        _synchronize()
        t0 = time.perf_counter()
        group, rank, size = _model_parallel() if settings.partition_activations else (None, 0, 1)
        ctx.run_function, ctx.group, ctx.rank, ctx.size = run_function, group, rank, size
        ctx.rng = _rng_state()
        ctx.ledger_hooks = _ledger_hooks()
        with torch.no_grad():
            outputs = run_function(*args)
        kept, ctx.layout = [], []  # per argument: (kind, shape, requires_grad, device), or ("object", it)
        for arg in args:
            if not torch.is_tensor(arg):
                ctx.layout.append(("object", arg))
                continue
            if settings.partition_activations and _is_activation(arg, size):
                flat = arg.detach().reshape(-1)
                chunk = -(-flat.numel() // size)  # ceil: pad the last rank's piece
                flat = torch.nn.functional.pad(flat, (0, chunk * size - flat.numel()))
                piece = flat.narrow(0, rank * chunk, chunk).clone()
                ctx.layout.append(("partition", arg.shape, arg.requires_grad, arg.device))
            else:
                piece = arg.detach() if settings.cpu_checkpointing else arg
                ctx.layout.append(("tensor", arg.shape, arg.requires_grad, arg.device))
            if settings.cpu_checkpointing and _is_activation(arg, size):
                piece = piece.to("cpu")
            kept.append(piece)
        ctx.save_for_backward(*kept)
        single = torch.is_tensor(outputs)
        outputs = (outputs,) if single else tuple(outputs)
        ctx.mark_non_differentiable(*[o for o in outputs if torch.is_tensor(o) and not o.is_floating_point()])
        all_outputs.extend(outputs)
        _log("forward", t0)
        _synchronize()
        return outputs[0] if single else tuple(o for o in outputs if torch.is_tensor(o))

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("activation checkpointing does not work with torch.autograd.grad(); "
                               "use loss.backward()")
        _synchronize()
        t0 = time.perf_counter()
        kept, inputs = list(ctx.saved_tensors), []
        for entry in ctx.layout:
            if entry[0] == "object":
                inputs.append(entry[1])
                continue
            kind, shape, requires_grad, device = entry
            piece = kept.pop(0).to(device)
            if kind == "partition":
                if ctx.size > 1:
                    flat = torch.empty(piece.numel() * ctx.size, dtype=piece.dtype, device=device)
                    comm.all_gather(flat, piece, group=ctx.group)
                else:
                    flat = piece
                piece = flat[:shape.numel()].view(shape)
            inputs.append(piece.detach().requires_grad_(requires_grad))
        outside = _rng_state()
        _set_rng_state(ctx.rng)  # the forward's random state: dropout draws the same masks again
        try:
            with torch.enable_grad(), _counted(ctx.ledger_hooks):
                outputs = ctx.run_function(*inputs)
        finally:
            _set_rng_state(outside)
        outputs = (outputs,) if torch.is_tensor(outputs) else tuple(o for o in outputs if torch.is_tensor(o))
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        _log("backward", t0)
        _synchronize()
        return (None, None) + tuple(x.grad if torch.is_tensor(x) else None for x in inputs)


def checkpoint(function, *args, **kwargs):
    """DeepSpeed's `checkpoint(function, *args)`: `function(*args)` whose activations are recomputed
    in backward. Keyword tensors take part like positional ones. Returns what `function` returns."""
    if kwargs:
        run, keys, count = function, tuple(kwargs), len(args)

        def function(*all_args):
            return run(*all_args[:count], **dict(zip(keys, all_args[count:])))

        args = args + tuple(kwargs.values())
    all_outputs: list = []
    CheckpointFunction.apply(function, all_outputs, *args)
    return all_outputs[0] if len(all_outputs) == 1 else tuple(all_outputs)

