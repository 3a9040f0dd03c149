"""DeepSpeed's engine API beyond forward/backward/step: its accessors and its checkpoint calls, with
DeepSpeed 0.19.8's names, signatures, defaults and return values.

    engine.local_rank, engine.global_rank, engine.world_size    LOCAL_RANK, the rank, the world size
    engine.fp16_enabled(), engine.bfloat16_enabled()            the precision the config selects
    engine.zero_optimization(), zero_optimization_stage()       stage > 0, the stage
    engine.save_checkpoint(dir) / load_checkpoint(dir)          (load_path, client_state)
    engine.save_16bit_model(dir, "pytorch_model.bin")           a plain state dict, from rank 0

`DeepSpeedEngine` (engine.py) inherits these; they only read the config, the mode and the counters.
Where ds_lab differs, on purpose: DeepSpeed's `engine.optimizer` is its ZeRO optimizer, which wraps the
torch optimizer; ds_lab keeps `engine.optimizer` the torch optimizer over the fp32 masters and names
the ZeRO optimizer `engine.zero_optimizer` (the mode, at stages 1-3; None at stage 0). `engine.zero`
does not exist, as in DeepSpeed: the article's `engine.zero.Init(module=model)` raises
AttributeError: 'DeepSpeedEngine' object has no attribute 'zero'.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ds_lab.runtime import checkpoint

_COMM_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def local_rank_from_env() -> int:
    """DeepSpeed's `engine.local_rank`: LOCAL_RANK (set by every launcher; 0 when run as one process)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))


class EngineAPI:
    """Mixed into DeepSpeedEngine: `self.config`, `self.mode`, `self.optimizer` and the counters exist."""

    # ---- batch sizes and the accumulation boundary -------------------------------------------------
    def train_batch_size(self) -> int:
        return self.config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    def is_gradient_accumulation_boundary(self) -> bool:
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """DeepSpeed's manual override: the caller says which micro-step ends the accumulation
        (set it before each forward/backward; the last one True), instead of counting micro-steps."""
        self._boundary_override = bool(is_boundary)

    @contextlib.contextmanager
    def no_sync(self):
        """DeepSpeed's context: backward inside it keeps gradients local (no collective), so they
        accumulate until a backward outside it synchronises them all. Stages 0 and 1 only: stages
        2 and 3 keep no full local gradient to accumulate in."""
        if not self.mode.supports_no_sync:
            raise RuntimeError(f"no_sync is incompatible with gradient partitioning ({self.mode.name}, "
                               f"ZeRO stage {self.mode.stage}); use ZeRO stage 0 or 1")
        if self.inside_no_sync:
            raise RuntimeError("no_sync contexts cannot be nested")
        self.inside_no_sync = True
        try:
            yield
        finally:
            self.inside_no_sync = False

    # ---- what the config selects -------------------------------------------------------------------
    def fp16_enabled(self) -> bool:
        return self.config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        return self.config.bf16.enabled

    def zero_optimization(self) -> bool:
        """DeepSpeed's `zero_enabled`: True at ZeRO stages 1-3."""
        return self.zero_optimization_stage() > 0

    def zero_optimization_stage(self) -> int:
        return self.mode.stage

    def zero_optimization_partition_gradients(self) -> bool:
        return self.zero_optimization_stage() >= 2

    def zero_optimization_partition_weights(self) -> bool:
        return self.zero_optimization_stage() >= 3

    def zero_offload_optimizer(self):
        """The `offload_optimizer` section, or None when the optimizer is not offloaded (DeepSpeed's default)."""
        return self._offload_section("offload_optimizer")

    def zero_offload_param(self):
        """The `offload_param` section, or None when the parameters are not offloaded."""
        return self._offload_section("offload_param")

    def _offload_section(self, key: str):
        section = getattr(self.config.zero_optimization, key, None)
        return None if section is None or getattr(section, "device", "none") == "none" else section

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        return bool(getattr(self.config.zero_optimization, "stage3_gather_16bit_weights_on_model_save", False))

    def gradient_clipping(self) -> float:
        return self.config.gradient_clipping

    def steps_per_print(self):
        return self.config.steps_per_print

    def dynamic_loss_scale(self) -> bool:
        """True when fp16.loss_scale is 0 (DeepSpeed asks this whatever the precision)."""
        return self.config.fp16.loss_scale == 0

    @property
    def communication_data_type(self) -> torch.dtype:
        """The dtype gradients cross the wire in: the config's, else the training precision's."""
        chosen = getattr(self.config, "communication_data_type", None)
        if chosen is not None:
            return _COMM_DTYPES[chosen] if isinstance(chosen, str) else chosen
        if self.fp16_enabled():
            return torch.float16
        return torch.bfloat16 if self.bfloat16_enabled() else torch.float32

    @communication_data_type.setter
    def communication_data_type(self, value) -> None:
        self.config.communication_data_type = value

    # ---- the optimizer's state ---------------------------------------------------------------------
    @property
    def zero_optimizer(self):
        """The ZeRO optimizer (the mode, at ZeRO stages 1-3; None at stage 0). DeepSpeed's
        `engine.optimizer` is its ZeRO optimizer; ds_lab keeps `engine.optimizer` the torch optimizer
        over the fp32 masters, so the ZeRO side has this name of its own."""
        return self.mode.zero_optimizer

    @property
    def reducer(self):
        """Data parallel's bucketed all-reduce, for chapters that count its buckets."""
        return getattr(self.mode, "reducer", None)

    def get_lr(self) -> list:
        return [g["lr"] for g in self.optimizer.param_groups] if self.optimizer else []

    def get_global_grad_norm(self):
        """The global gradient norm of the last applied step (before clipping), or None before one."""
        return self._global_grad_norm

    def was_step_applied(self) -> bool:
        return self._step_applied

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale if self.loss_scaler else 1.0

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False):
        """exclude_frozen_parameters: leave parameters with requires_grad=False out of the module
        state; loading such a checkpoint then needs load_module_strict=False (as in DeepSpeed)."""
        return checkpoint.save(self, save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest,
                               exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn=None):
        """Returns (load_path, client_state); (None, None) when there is no `latest` and no tag.
        custom_load_fn(src=module state dict, dst=engine.module) replaces loading the module's weights
        (the fp32 masters then follow the module's values)."""
        return checkpoint.load(self, load_dir, tag=tag, strict=load_module_strict,
                               load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states,
                               load_module_only=load_module_only, custom_load_fn=custom_load_fn)

    def save_16bit_model(self, save_dir, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """The model's weights in its training dtype (fp32 when training in fp32) as one plain state
        dict, written by rank 0; every rank must call it. At ZeRO-3 only with
        zero_optimization.stage3_gather_16bit_weights_on_model_save (else False, nothing written)."""
        return checkpoint.save_16bit_model(self, save_dir, save_filename, exclude_frozen_parameters)

    def save_fp16_model(self, save_dir, save_filename: str = "pytorch_model.bin") -> bool:
        """DeepSpeed's old name for save_16bit_model."""
        return self.save_16bit_model(save_dir, save_filename)
