"""The config sections for features beyond the core engine: offload, wandb, the flops profiler,
activation checkpointing, data types, and the top-level gradient-reduction keys.

    "zero_optimization": {"offload_optimizer": {"device": "cpu"}}  -> ZeroConfig.offload_optimizer.device == "cpu"
    "communication_data_type": "fp16"                            -> DeepSpeedConfig.communication_data_type
    "flops_profiler": {"enabled": true}                          -> DeepSpeedConfig.flops_profiler.enabled

Defaults are DeepSpeed 0.19.8's (runtime/zero/offload_config.py, monitor/config.py,
profiling/config.py, runtime/activation_checkpointing/config.py, runtime/config.py). One departure:
DeepSpeed's ``offload_optimizer`` / ``offload_param`` default to None; here they default to a section
with ``device: "none"``, which DeepSpeed treats the same way, so code can read ``.device`` directly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from ds_lab.config.checks import (ConfigError, _boolean, _build, _got, _integer, _number, _positive_number,
                                  _section, _string)

# the dtype names DeepSpeed's DtypeEnum accepts for fp16, fp32, bf16 (runtime/config.py)
_DTYPE_NAMES = {"fp16": ("fp16", "float16", "half", "torch.float16"),
                "fp32": ("fp32", "float32", "float", "torch.float32"),
                "bf16": ("bf16", "bfloat16", "torch.bfloat16")}


def _offload_device(value, name):
    if value == "nvme":
        raise ConfigError(f"{name}: 'nvme' is not supported: ds_lab has no NVMe/AIO offload; use device cpu")
    if value not in ("none", "cpu"):
        raise ConfigError(f"{name} must be 'none' or 'cpu' ('nvme' is DeepSpeed's, not ds_lab's), {_got(value)}")
    return value


def _optional_string(value, name):
    return None if value is None else _string(value, name)


@dataclass
class OffloadOptimizerConfig:
    """zero_optimization.offload_optimizer: the fp32 master shard, its gradient and the optimizer
    states live on ``device`` and the optimizer step runs there (ds_lab/zero/offload.py)."""

    device: str = "none"  # "none" or "cpu" ("nvme" refused)
    nvme_path: Optional[str] = None  # NVMe only: accepted, unused
    buffer_count: int = 4  # NVMe only: accepted, unused
    pin_memory: bool = True  # DeepSpeed 0.19.8's default; pins host buffers when CUDA is there
    pipeline_read: bool = False  # NVMe only: accepted, unused
    pipeline_write: bool = False  # NVMe only: accepted, unused
    fast_init: bool = False  # NVMe only: accepted, unused
    ratio: float = 1.0  # fraction of the states offloaded; < 1 is DeepSpeed's ZeRO-3 partial offload


@dataclass
class OffloadParamConfig:
    """zero_optimization.offload_param (stage 3): the partitioned parameters live on ``device``."""

    device: str = "none"
    nvme_path: Optional[str] = None
    buffer_count: int = 5
    buffer_size: int = 100_000_000
    max_in_cpu: int = 1_000_000_000
    pin_memory: bool = True


def _ratio(value, name):
    ratio = _number(value, name)
    if ratio > 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1], {_got(value)}")
    if ratio < 1.0:
        raise ConfigError(f"{name} < 1 (DeepSpeed's ZeRO-3 partial offload) is not supported by ds_lab; "
                          f"remove the key or set it to 1.0")
    return ratio


_OFFLOAD_OPTIMIZER_CHECKERS = {
    "device": _offload_device, "nvme_path": _optional_string, "buffer_count": _integer, "pin_memory": _boolean,
    "pipeline_read": _boolean, "pipeline_write": _boolean, "fast_init": _boolean, "ratio": _ratio}
_DEEPSPEED_OFFLOAD_OPTIMIZER_KEYS = {"super_offload": "", "cpuadam_cores_perc": ""}
_OFFLOAD_PARAM_CHECKERS = {
    "device": _offload_device, "nvme_path": _optional_string, "buffer_count": _integer, "buffer_size": _integer,
    "max_in_cpu": _integer, "pin_memory": _boolean}


def _offload_section(cls, checkers, deepspeed_only):
    def check(value, name):
        if value is None or isinstance(value, cls):  # null is DeepSpeed's default: no offload
            return value or cls()
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a JSON object (a dict), {_got(value)}")
        return _build(cls, value, name, checkers, deepspeed_only)
    return check


_offload_optimizer_section = _offload_section(OffloadOptimizerConfig, _OFFLOAD_OPTIMIZER_CHECKERS,
                                              _DEEPSPEED_OFFLOAD_OPTIMIZER_KEYS)
_offload_param_section = _offload_section(OffloadParamConfig, _OFFLOAD_PARAM_CHECKERS, {})


def fold_legacy_zero(zero, given: dict):
    """DeepSpeed's deprecated zero_optimization spellings, folded into the current fields.

    ``cpu_offload: true`` = ``offload_optimizer: {device: cpu}``, ``cpu_offload_param: true`` =
    ``offload_param: {device: cpu}`` (DeepSpeed's new_param_fn), ``stage3_gather_fp16_weights_on_model_save``
    = ``stage3_gather_16bit_weights_on_model_save``; ``cpu_offload_use_pin_memory`` is dropped, as in
    DeepSpeed (its set_new_param is False). Giving both spellings is an error."""
    for legacy, new, cls in (("cpu_offload", "offload_optimizer", OffloadOptimizerConfig),
                             ("cpu_offload_param", "offload_param", OffloadParamConfig)):
        if given.get(legacy):
            if new in given:
                raise ConfigError(f"zero_optimization has both '{legacy}' (deprecated) and '{new}'; keep only '{new}'")
            setattr(zero, new, cls(device="cpu"))
    if zero.stage3_gather_fp16_weights_on_model_save:
        zero.stage3_gather_16bit_weights_on_model_save = True
    if zero.offload_param.device != "none" and zero.stage != 3:
        # DeepSpeed builds no parameter offload below stage 3 and says nothing; ds_lab says so.
        raise ConfigError(f"zero_optimization.offload_param applies to ZeRO stage 3 only (parameters are "
                          f"partitioned there), but the stage is {zero.stage}; set stage 3 or remove offload_param")
    if zero.offload_optimizer.device != "none" and zero.stage == 0:
        raise ConfigError("zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3 (it offloads the "
                          "partitioned optimizer states); set zero_optimization.stage")
    return zero


@dataclass
class WandbConfig:
    """DeepSpeed's `wandb` monitor section (monitor/config.py WandbConfig)."""

    enabled: bool = False
    group: Optional[str] = None
    team: Optional[str] = None
    project: str = "deepspeed"


_WANDB_CHECKERS = {"enabled": _boolean, "group": _optional_string, "team": _optional_string, "project": _string}


@dataclass
class FlopsProfilerConfig:
    """DeepSpeed's `flops_profiler` section (profiling/config.py)."""

    enabled: bool = False
    recompute_fwd_factor: float = 0.0
    profile_step: int = 1
    module_depth: int = -1  # -1: every depth
    top_modules: int = 1
    detailed: bool = True
    output_file: Optional[str] = None  # None: print to stdout


_FLOPS_PROFILER_CHECKERS = {
    "enabled": _boolean, "recompute_fwd_factor": _number, "profile_step": _integer,
    "module_depth": lambda v, n: _integer(v, n, minimum=-1), "top_modules": _integer, "detailed": _boolean,
    "output_file": _optional_string}


@dataclass
class ActivationCheckpointingConfig:
    """DeepSpeed's `activation_checkpointing` section (runtime/activation_checkpointing/config.py)."""

    partition_activations: bool = False
    contiguous_memory_optimization: bool = False
    cpu_checkpointing: bool = False
    number_checkpoints: Optional[int] = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False


_ACTIVATION_CHECKPOINTING_CHECKERS = {
    "partition_activations": _boolean, "contiguous_memory_optimization": _boolean, "cpu_checkpointing": _boolean,
    "number_checkpoints": lambda v, n: None if v is None else _integer(v, n), "synchronize_checkpoint_boundary":
    _boolean, "profile": _boolean}


def _dtype_name(value, name) -> Optional[str]:
    """None, or "fp16" / "fp32" / "bf16" from any of DeepSpeed's spellings of them."""
    if value is None:
        return None
    for short, spellings in _DTYPE_NAMES.items():
        if isinstance(value, str) and value.lower() in spellings:
            return short
    raise ConfigError(f"{name} must be one of 'fp16', 'bf16', 'fp32' (or null), {_got(value)}")


@dataclass
class DataTypesConfig:
    """DeepSpeed's `data_types` section: the dtype gradients accumulate in across micro-steps."""

    grad_accum_dtype: Optional[str] = None  # None: DeepSpeed's default (the model's dtype); "fp32", "fp16", "bf16"


_DATA_TYPES_CHECKERS = {"grad_accum_dtype": _dtype_name}


def _communication_data_type(value, name):
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in ("fp16", "bf16", "fp32"):
        # DeepSpeed's get_communication_data_type message
        raise ConfigError(f"Invalid {name}. Supported data types: ['fp16', 'bf16', 'fp32']. {_got(value)}")
    return value.lower()


def parse_features(raw: dict, zero, fp16, bf16) -> dict:
    """The DeepSpeedConfig fields this file owns, from the user's top-level dict, checked against the
    ZeRO section. Refusals are DeepSpeed's own, with its words where it has them."""
    section = lambda key: _section(raw, key)  # noqa: E731
    features = {
        "prescale_gradients": _boolean(raw.get("prescale_gradients", False), "prescale_gradients"),
        "gradient_predivide_factor": _positive_number(raw.get("gradient_predivide_factor", 1.0),
                                                      "gradient_predivide_factor"),
        "communication_data_type": _communication_data_type(raw.get("communication_data_type"),
                                                            "communication_data_type"),
        "zero_allow_untested_optimizer": _boolean(raw.get("zero_allow_untested_optimizer", False),
                                                  "zero_allow_untested_optimizer"),
        "data_types": _build(DataTypesConfig, section("data_types"), "data_types", _DATA_TYPES_CHECKERS, {}),
        "wandb": _build(WandbConfig, section("wandb"), "wandb", _WANDB_CHECKERS, {}),
        "flops_profiler": _build(FlopsProfilerConfig, section("flops_profiler"), "flops_profiler",
                                 _FLOPS_PROFILER_CHECKERS, {}),
        "activation_checkpointing": _build(ActivationCheckpointingConfig, section("activation_checkpointing"),
                                           "activation_checkpointing", _ACTIVATION_CHECKPOINTING_CHECKERS, {}),
    }
    stage = zero.stage
    # DeepSpeed's ZeRO-2 (stage_1_and_2.py) and ZeRO-3 (stage3.py) assert these with reduce_scatter on,
    # ds_lab's only mode; its ZeRO-1 divides by the world size before the reduction whatever they say.
    if stage >= 2 and features["gradient_predivide_factor"] != 1.0:
        raise ConfigError(f"gradient_predivide_factor != 1.0 is not yet supported with ZeRO stage {stage} with "
                          f"reduce scatter enabled (DeepSpeed asserts the same); remove the key or use stage 0 or 1")
    if stage >= 2 and features["prescale_gradients"]:
        raise ConfigError(f"pre-scale gradients is not yet supported with ZeRO stage {stage} with reduce scatter "
                          f"enabled (DeepSpeed asserts the same); remove prescale_gradients or use stage 0 or 1")
    fp32_accumulation = features["data_types"].grad_accum_dtype == "fp32" and (fp16.enabled or bf16.enabled)
    if stage == 1 and not fp32_accumulation and (features["prescale_gradients"]
                                                 or features["gradient_predivide_factor"] != 1.0):
        warnings.warn("prescale_gradients / gradient_predivide_factor do not change ZeRO stage 1: like DeepSpeed's "
                      "stage 1 (reduce_scatter on), ds_lab divides each bucket by the world size before reducing "
                      "it; they apply at stage 0 (and to stage 1's fp32 accumulation: DeepSpeed's "
                      "BF16_Optimizer)", stacklevel=4)
    if fp16.fp16_master_weights_and_grads:
        _check_fp16_master_weights(zero)
    _check_grad_accum_dtype(features["data_types"].grad_accum_dtype, zero.stage,
                            "bf16" if bf16.enabled else "fp16" if fp16.enabled else "fp32")
    return features


def _check_grad_accum_dtype(accum: Optional[str], stage: int, model: str) -> None:
    """DeepSpeed's engine._do_optimizer_sanity_check: without ZeRO the accumulation dtype must be the
    model's ("unsupported mix"); with ZeRO, ds_lab refuses accumulating in less precision than the model."""
    if accum is None or accum == model:
        return
    if stage == 0:
        raise ConfigError(f"unsupported mix of model dtype {model} and data_types.grad_accum_dtype {accum} without "
                          f"ZeRO (DeepSpeed raises the same); remove the key, set it to {model!r}, or use ZeRO")
    if model == "fp32" or accum != "fp32":
        raise ConfigError(f"data_types.grad_accum_dtype {accum!r} with {model} training is not supported by ds_lab "
                          f"(it accumulates in the model's dtype or in fp32); set it to {model!r} or 'fp32'")


def _check_fp16_master_weights(zero) -> None:
    """DeepSpeed 0.19.8: ZeRO 1-3 only (runtime/config.py), and with optimizer offload to DeepSpeedCPUAdam
    (stage_1_and_2.py / stage3.py). ds_lab keeps fp32 masters and says so."""
    if zero.stage == 0:
        raise ConfigError("Fp16_master_weights_and_grads is only supported with ZeRO Stage 1, 2, or 3 "
                          "(fp16.fp16_master_weights_and_grads); set zero_optimization.stage or remove the key")
    if zero.offload_optimizer.device != "cpu":
        raise ConfigError(f"Master weights feature requires ZeRO-{zero.stage} Offload with DeepSpeedCPUAdam "
                          f"(fp16.fp16_master_weights_and_grads); add zero_optimization.offload_optimizer "
                          f"{{\"device\": \"cpu\"}} or remove the key")
    warnings.warn("fp16.fp16_master_weights_and_grads is accepted but not enforced by ds_lab: the offloaded "
                  "master weights and gradients stay fp32 (DeepSpeed keeps them fp16 to halve host memory)",
                  stacklevel=5)
