"""DeepSpeed-style JSON config -> validated dataclasses.

    cfg = DeepSpeedConfig.from_any("ds_config.json", world_size=2)   # or a dict, or a DeepSpeedConfig
    cfg.train_micro_batch_size_per_gpu, cfg.zero_optimization.stage, cfg.precision

Batch sizes follow DeepSpeed: train_batch_size = micro x accumulation x data-parallel world size.
Give any two and the third is inferred; give only train_batch_size (accumulation 1) or only the
micro batch (accumulation 1). Every key is checked: a typo gets a "did you mean", a DeepSpeed key
ds_lab has not built yet is named as such, nothing is silently ignored.

Defaults, checked against DeepSpeed's source (deepspeedai/DeepSpeed master), not its docs. Sources:
C runtime/constants.py, P runtime/precision_config.py, Z runtime/zero/config.py, L comm/constants.py,
M monitor/config.py, F ops/adam/fused_adam.py, E runtime/engine.py + runtime/config.py.

| key                                      | default           | src | note                                  |
|------------------------------------------|-------------------|-----|---------------------------------------|
| train_batch_size, micro, accumulation    | inferred          | C   | all None there; see batch rules above |
| gradient_clipping                        | 1.0               | C   | PR #8068; docs and older code: 0.0    |
| steps_per_print                          | None (never)      | C   | docs and older code: 10               |
| wall_clock_breakdown                     | False             | C   |                                       |
| fp16.enabled, fp16.auto_cast             | False, False      | P   |                                       |
| fp16.loss_scale                          | 0.0               | P   | 0 = dynamic loss scaling              |
| fp16.initial_scale_power                 | 16                | P   | first scale 2**16                     |
| fp16.loss_scale_window, fp16.hysteresis  | 1000, 2           | P   |                                       |
| fp16.consecutive_hysteresis              | False             | P   |                                       |
| fp16.min_loss_scale                      | 1.0               | P   |                                       |
| bf16.enabled                             | False             | P   |                                       |
| zero_optimization.stage                  | 0                 | Z   |                                       |
| reduce_bucket_size, allgather_bucket_size| 500_000_000 each  | Z   | elements                              |
| overlap_comm                             | None              | Z   | see "departs" below                   |
| contiguous_gradients, reduce_scatter     | True, True        | Z   |                                       |
| stage3_prefetch_bucket_size              | 50_000_000        | Z   | docs say 5e8                          |
| stage3_param_persistence_threshold       | 100_000           | Z   |                                       |
| stage3_max_live_parameters               | 1_000_000_000     | Z   |                                       |
| stage3_max_reuse_distance                | 1_000_000_000     | Z   |                                       |
| comms_logger enabled, verbose, debug     | False             | L   |                                       |
| comms_logger prof_all, prof_ops          | True, []          | L   |                                       |
| csv_monitor / tensorboard enabled        | False             | M   |                                       |
| csv_monitor / tensorboard output_path    | ""                | M   |                                       |
| csv_monitor / tensorboard job_name       | "DeepSpeedJobName"| M   |                                       |
| optimizer.params lr, betas               | 1e-3, (0.9, 0.999)| F   |                                       |
| optimizer.params eps, weight_decay       | 1e-8, 0.0         | F   |                                       |
| optimizer.params adam_w_mode             | True              | E   | see "departs" below                   |
| scheduler.params                         | per schedule      |     | runtime/lr_schedules.py signatures    |

Where ds_lab departs from DeepSpeed:
- DeepSpeed's optimizer "Adam" is AdamW (decoupled weight decay) unless params.adam_w_mode is false.
  ds_lab resolves this here: ``optimizer.type`` is the *effective* algorithm ("AdamW", or "Adam" only
  when adam_w_mode is false) and ``optimizer.params`` holds torch-style keys only (lr, betas, eps,
  weight_decay), defaults filled in. ``AdamW`` with adam_w_mode false is an error (DeepSpeed ignores it).
- Unknown keys, wrong types, and DeepSpeed features ds_lab lacks are errors (DeepSpeed ignores most
  unknown keys). ``zero_optimization`` must be a dict (DeepSpeed also takes a deprecated bool).
- ``zero_optimization.overlap_comm`` None means "the engine decides": ds_lab overlaps gradient
  all-reduce with backward at stage 0, like DDP. DeepSpeed turns None into (stage == 3).
- Only ZeRO stages in ``SUPPORTED_ZERO_STAGES`` are accepted for now.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)


class ConfigError(ValueError):
    """A config that ds_lab cannot run; the message says what to change."""


@dataclass
class OptimizerConfig:
    type: str  # "Adam" or "AdamW": the effective algorithm (see module docstring)
    params: dict  # lr, betas, eps, weight_decay; DeepSpeed/FusedAdam defaults filled in


@dataclass
class SchedulerConfig:
    type: str  # a key of ds_lab.runtime.lr_schedules.SCHEDULERS
    params: dict  # keyword arguments for that schedule, as given


@dataclass
class FP16Config:
    enabled: bool = False
    auto_cast: bool = False  # cast the model's floating-point inputs to fp16
    loss_scale: float = 0.0  # 0 = dynamic loss scaling; > 0 = this static scale
    initial_scale_power: int = 16  # dynamic scaling starts at 2**initial_scale_power
    loss_scale_window: int = 1000  # overflow-free steps before the scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale halves
    consecutive_hysteresis: bool = False  # refill hysteresis after each overflow-free step
    min_loss_scale: float = 1.0


@dataclass
class BF16Config:
    enabled: bool = False


@dataclass
class ZeroConfig:
    stage: int = 0
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction bucket
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather bucket
    overlap_comm: Optional[bool] = None  # None: the engine decides (ds_lab overlaps at stage 0, like DDP)
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000


@dataclass
class CommsLoggerConfig:
    enabled: bool = False
    verbose: bool = False
    prof_all: bool = True
    debug: bool = False
    prof_ops: list = field(default_factory=list)


@dataclass
class MonitorConfig:
    """Settings for one monitor backend (``csv_monitor`` or ``tensorboard``)."""

    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


@dataclass
class DeepSpeedConfig:
    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    optimizer: Optional[OptimizerConfig] = None
    scheduler: Optional[SchedulerConfig] = None
    fp16: FP16Config = field(default_factory=FP16Config)
    bf16: BF16Config = field(default_factory=BF16Config)
    gradient_clipping: float = 1.0  # max global grad norm; 0 disables clipping
    steps_per_print: Optional[int] = None  # None: never print
    wall_clock_breakdown: bool = False
    zero_optimization: ZeroConfig = field(default_factory=ZeroConfig)
    comms_logger: CommsLoggerConfig = field(default_factory=CommsLoggerConfig)
    csv_monitor: MonitorConfig = field(default_factory=MonitorConfig)
    tensorboard: MonitorConfig = field(default_factory=MonitorConfig)
    raw: dict = field(default_factory=dict)  # a copy of the user's dict as given

    @property
    def precision(self) -> str:
        if self.bf16.enabled:
            return "bf16"
        return "fp16" if self.fp16.enabled else "fp32"

    @classmethod
    def from_any(cls, config, world_size: int = 1) -> "DeepSpeedConfig":
        """Build from a dict, a JSON file path (str or PathLike), or an existing DeepSpeedConfig.

        ``world_size`` is the data-parallel size; an existing config is re-resolved against it.
        """
        if isinstance(config, DeepSpeedConfig):
            raw = config.raw
        elif isinstance(config, dict):
            raw = config
        elif isinstance(config, (str, os.PathLike)):
            raw = _load_json(config)
        else:
            raise ConfigError(f"config must be a dict, a path to a JSON file, or a DeepSpeedConfig; "
                              f"got {type(config).__name__}")
        return _parse(copy.deepcopy(raw), world_size)


# ---------------------------------------------------------------- key registries
# DeepSpeed keys that ds_lab does not model yet, with an optional hint. Taken from DeepSpeed's
# runtime/config.py (including the keys it now rejects as removed), runtime/constants.py and the
# sub-configs it reads (monitor, profiling, autotuning, data pipeline, checkpointing, ...).
_DEEPSPEED_TOP_LEVEL_KEYS = {key: "" for key in (
    "activation_checkpointing", "aio", "amp", "autotuning", "checkpoint", "comet", "communication_data_type",
    "compile", "compression_training", "curriculum_learning", "data_efficiency", "data_types",
    "dataloader_drop_last", "datastates_ckpt", "disable_allgather", "disable_python_gc", "dump_state",
    "eigenvalue", "elasticity", "expert_parallel", "flops_profiler", "fp32_allreduce", "gradient_allreduce_op",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level",
    "managed_gradient_accumulation", "memory_breakdown", "nebula", "pipeline", "prescale_gradients",
    "progressive_layer_drop", "quantize_training", "seq_parallel_comm_data_type",
    "seq_parallel_communication_data_type", "sequence_parallel_size", "sparse_attention", "sparse_gradients",
    "tensor_parallel", "timers", "torch_autocast", "trackio", "use_data_before_expert_parallelism",
    "vocabulary_size", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer")}
_DEEPSPEED_TOP_LEVEL_KEYS["bfloat16"] = "DeepSpeed's old name for 'bf16'; write 'bf16'"

_DEEPSPEED_ZERO_KEYS = {key: "" for key in (
    "allgather_partitions", "cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory", "elastic_checkpoint",
    "enable_sanity_checks", "ignore_unused_parameters", "leaf_module", "legacy_stage1", "load_from_fp32_weights",
    "log_trace_cache_warnings", "memory_efficient_linear", "mics_hierarchical_params_gather", "mics_shard_size",
    "offload_optimizer", "offload_param", "override_module_apply", "pipeline_loading_checkpoint",
    "round_robin_gradients", "save_muon_momentum_buffer_in_memory", "stage3_allgather_sequential",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
    "stage3_model_persistence_threshold", "stage3_module_granularity_threshold",
    "stage3_partition_stream_chunk_size", "stage3_use_all_reduce_for_fetch_params", "sub_group_size",
    "use_multi_rank_bucket_allreduce", "zenflow", "zero_hpz_partition_size", "zero_quantized_gradients",
    "zero_quantized_nontrainable_weights", "zero_quantized_weights", "zeropp_loco_param")}
_DEEPSPEED_FP16_KEYS = {"fp16_master_weights_and_grads": "", "fused_mode": ""}
_DEEPSPEED_BF16_KEYS = {key: "" for key in ("immediate_grad_update", "check_grad_overflow", "check_overflow",
                                            "bf16_master_weights_and_grads", "bf16_optimizer_states")}
_DEEPSPEED_OPTIMIZER_KEYS = {"legacy_fusion": ""}
_DEEPSPEED_ADAM_PARAMS = {"torch_adam": "", "bias_correction": "", "amsgrad": "", "set_grad_none": "",
                          "max_grad_norm": "set the top-level 'gradient_clipping' instead"}

SUPPORTED_OPTIMIZERS = ("Adam", "AdamW")
# DeepSpeed's own optimizer names, current (runtime/config.py DEEPSPEED_OPTIMIZERS) and removed.
_DEEPSPEED_OPTIMIZERS = ("Adagrad", "Lamb", "Lion", "MuAdam", "MuAdamW", "MuSGD", "Muon", "OneBitAdam",
                         "OneBitLamb", "ZeroOneAdam")
_DEEPSPEED_SCHEDULERS = ("OneCycle", "LRRangeTest")

ADAM_PARAM_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


# ---------------------------------------------------------------- small checkers
# Each checker takes (value, dotted name) and returns the cleaned value or raises ConfigError.

def _got(value: Any) -> str:
    hint = " ('auto' is a Hugging Face Trainer placeholder; put a number here)" if value == "auto" else ""
    return f"got {value!r}{hint}"


def _integer(value: Any, name: str, minimum: int = 0) -> int:
    # JSON writes 5e8 as a float; accept floats that are whole numbers, as DeepSpeed's pydantic models do.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, {_got(value)}")
    return value


def _positive_integer(value: Any, name: str) -> int:
    return _integer(value, name, minimum=1)


def _number(value: Any, name: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be a number >= {minimum:g}, {_got(value)}")
    return float(value)


def _positive_number(value: Any, name: str) -> float:
    if _number(value, name) <= 0:
        raise ConfigError(f"{name} must be a number > 0, {_got(value)}")
    return float(value)


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, {_got(value)}")
    return value


def _optional_boolean(value: Any, name: str) -> Optional[bool]:
    return None if value is None else _boolean(value, name)


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, {_got(value)}")
    return value


def _string_list(value: Any, name: str) -> list:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{name} must be a list of strings, {_got(value)}")
    return list(value)


def _zero_stage(value: Any, name: str) -> int:
    stage = _integer(value, name)
    if stage > 3:
        raise ConfigError(f"{name} must be 0, 1, 2 or 3, got {stage}")
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"ZeRO stage {stage} is not implemented yet in ds_lab (it arrives with the ZeRO issue); "
                          f"set {name} to one of {list(SUPPORTED_ZERO_STAGES)}")
    return stage


def _betas(value: Any, name: str) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{name} must be a list of two numbers in [0, 1), {_got(value)}")
    betas = tuple(_number(beta, f"{name}[{i}]") for i, beta in enumerate(value))
    if not all(beta < 1 for beta in betas):
        raise ConfigError(f"{name} must be a list of two numbers in [0, 1), {_got(value)}")
    return betas


def _learning_rates(value: Any, name: str):
    """A scalar lr or one per param group (DeepSpeed's schedules take both)."""
    if isinstance(value, list):
        return [_number(item, f"{name}[{i}]") for i, item in enumerate(value)]
    return _number(value, name)


# ---------------------------------------------------------------- key checking

def _where(section: str) -> str:
    return f" in '{section}'" if section else ""


def _check_keys(given: dict, known, deepspeed_only: dict, section: str = "") -> None:
    """Every key must be one ds_lab models; name DeepSpeed-only keys and suggest fixes for typos."""
    known = list(known)
    for key in given:
        if key in known:
            continue
        if key in deepspeed_only:
            hint = f"; {deepspeed_only[key]}" if deepspeed_only[key] else "; remove it to continue"
            raise ConfigError(f"'{key}'{_where(section)} is a DeepSpeed config key that ds_lab does not "
                              f"support yet{hint}")
        raise ConfigError(f"unknown config key '{key}'{_where(section)}{_suggestion(str(key), known)}")


def _suggestion(word: str, candidates) -> str:
    candidates = list(candidates)
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    close = [by_lower[word.lower()]] if word.lower() in by_lower else \
        difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid: {', '.join(sorted(candidates))}"


def _section(raw: dict, key: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}' must be a JSON object (a dict), {_got(value)}")
    return value


def _build(cls, given: dict, section: str, checkers: dict, deepspeed_only: dict):
    """Check ``given`` against ``checkers`` (one per dataclass field) and build ``cls``; defaults live on cls."""
    _check_keys(given, checkers, deepspeed_only, section)
    return cls(**{key: checkers[key](value, f"{section}.{key}") for key, value in given.items()})


_FP16_CHECKERS = {
    "enabled": _boolean, "auto_cast": _boolean, "loss_scale": _number, "initial_scale_power": _integer,
    "loss_scale_window": _positive_integer, "hysteresis": _positive_integer, "consecutive_hysteresis": _boolean,
    "min_loss_scale": _positive_number}
_BF16_CHECKERS = {"enabled": _boolean}
_ZERO_CHECKERS = {
    "stage": _zero_stage, "reduce_bucket_size": _integer, "allgather_bucket_size": _integer,
    "overlap_comm": _optional_boolean, "contiguous_gradients": _boolean, "reduce_scatter": _boolean,
    "stage3_prefetch_bucket_size": _integer, "stage3_param_persistence_threshold": _integer,
    "stage3_max_live_parameters": _integer, "stage3_max_reuse_distance": _integer}
_COMMS_LOGGER_CHECKERS = {"enabled": _boolean, "verbose": _boolean, "prof_all": _boolean, "debug": _boolean,
                          "prof_ops": _string_list}
_MONITOR_CHECKERS = {"enabled": _boolean, "output_path": _string, "job_name": _string}
_ADAM_PARAM_CHECKERS = {"lr": _number, "betas": _betas, "eps": _number, "weight_decay": _number,
                        "adam_w_mode": _boolean}
# Value checks for schedule arguments; which arguments a schedule takes comes from its signature.
_SCHEDULER_PARAM_CHECKERS: dict[str, Callable] = {
    "warmup_min_lr": _learning_rates, "warmup_max_lr": lambda v, n: None if v is None else _learning_rates(v, n),
    "warmup_num_steps": _positive_integer, "total_num_steps": _positive_integer,
    "warmup_min_ratio": _number, "cos_min_ratio": _number, "warmup_type": _string,
    "last_batch_iteration": lambda v, n: _integer(v, n, minimum=-1)}


# ---------------------------------------------------------------- sections

def _required_type(section: dict, name: str, example: str) -> str:
    if "type" not in section:
        raise ConfigError(f"'{name}' needs a 'type', e.g. \"type\": \"{example}\"")
    return _string(section["type"], f"{name}.type")


def _parse_optimizer(raw: dict) -> Optional[OptimizerConfig]:
    if "optimizer" not in raw:
        return None
    section = _section(raw, "optimizer")
    _check_keys(section, ("type", "params"), _DEEPSPEED_OPTIMIZER_KEYS, "optimizer")
    name = _required_type(section, "optimizer", "AdamW")
    canonical = {supported.lower(): supported for supported in SUPPORTED_OPTIMIZERS}.get(name.lower())
    if canonical is None:
        _reject_optimizer(name)
    given = _section(section, "params")
    _check_keys(given, _ADAM_PARAM_CHECKERS, _DEEPSPEED_ADAM_PARAMS, "optimizer.params")
    params = dict(ADAM_PARAM_DEFAULTS)
    params.update({key: _ADAM_PARAM_CHECKERS[key](value, f"optimizer.params.{key}") for key, value in given.items()})
    # DeepSpeed (engine.py _configure_basic_optimizer): effective AdamW = type is AdamW or adam_w_mode (default True).
    adam_w_mode = params.pop("adam_w_mode", True)
    if canonical == "AdamW" and not adam_w_mode:
        raise ConfigError("optimizer.params.adam_w_mode is false but optimizer.type is 'AdamW'; "
                          "for Adam with L2 weight decay write type 'Adam' with adam_w_mode false")
    return OptimizerConfig(type="AdamW" if adam_w_mode else "Adam", params=params)


def _reject_optimizer(name: str) -> None:
    deepspeed_names = {known.lower(): known for known in _DEEPSPEED_OPTIMIZERS}
    supported = ", ".join(SUPPORTED_OPTIMIZERS)
    if name.lower() in deepspeed_names:
        raise ConfigError(f"DeepSpeed optimizer '{deepspeed_names[name.lower()]}' is not supported by ds_lab yet; "
                          f"supported: {supported}")
    import torch  # DeepSpeed falls back to torch.optim for other names; only that path needs torch here

    if isinstance(getattr(torch.optim, name, None), type):
        raise ConfigError(f"optimizer '{name}' (DeepSpeed takes it from torch.optim) is not supported by ds_lab "
                          f"yet; supported: {supported}")
    raise ConfigError(f"unknown optimizer type '{name}'{_suggestion(name, SUPPORTED_OPTIMIZERS)}")


def _parse_scheduler(raw: dict) -> Optional[SchedulerConfig]:
    if "scheduler" not in raw:
        return None
    # Imported here, not at the top: ds_lab.runtime may import this module while it loads.
    from ds_lab.runtime.lr_schedules import SCHEDULERS, WARMUP_TYPES

    section = _section(raw, "scheduler")
    _check_keys(section, ("type", "params"), {}, "scheduler")
    name = _required_type(section, "scheduler", "WarmupLR")
    if name not in SCHEDULERS:
        _reject_scheduler(name, SCHEDULERS)
    given = _section(section, "params")
    arguments = list(inspect.signature(SCHEDULERS[name]).parameters.values())[1:]  # drop the optimizer
    _check_keys(given, [argument.name for argument in arguments], {}, "scheduler.params")
    missing = [argument.name for argument in arguments
               if argument.default is inspect.Parameter.empty and argument.name not in given]
    if missing:
        raise ConfigError(f"scheduler '{name}' needs scheduler.params.{missing[0]}")
    params = {key: _SCHEDULER_PARAM_CHECKERS[key](value, f"scheduler.params.{key}") for key, value in given.items()}
    if params.get("warmup_type", WARMUP_TYPES[0]) not in WARMUP_TYPES:
        raise ConfigError(f"scheduler.params.warmup_type must be one of {list(WARMUP_TYPES)}, "
                          f"got {params['warmup_type']!r}")
    return SchedulerConfig(type=name, params=params)


def _reject_scheduler(name: str, schedulers: dict) -> None:
    supported = ", ".join(schedulers)
    if name in _DEEPSPEED_SCHEDULERS:
        raise ConfigError(f"DeepSpeed scheduler '{name}' is not supported by ds_lab yet; supported: {supported}")
    import torch  # DeepSpeed falls back to torch.optim.lr_scheduler for other names

    if isinstance(getattr(torch.optim.lr_scheduler, name, None), type):
        raise ConfigError(f"scheduler '{name}' (DeepSpeed takes it from torch.optim.lr_scheduler) is not "
                          f"supported by ds_lab yet; supported: {supported}")
    raise ConfigError(f"unknown scheduler type '{name}'{_suggestion(name, list(schedulers))}")


def _resolve_batch_sizes(raw: dict, world_size: int) -> tuple[int, int, int]:
    """(train_batch_size, micro, accumulation) with train = micro x accumulation x world_size."""
    train, micro, accumulation = (
        None if raw.get(key) is None else _positive_integer(raw[key], key)
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
    if train is None and micro is None:
        raise ConfigError("set train_batch_size or train_micro_batch_size_per_gpu (or both); "
                          "gradient_accumulation_steps alone cannot fix the batch size")

    def divide(divisor: int, divisor_text: str, inferred: str) -> int:
        if train % divisor:
            raise ConfigError(f"train_batch_size {train} is not divisible by {divisor_text} (= {divisor}); "
                              f"change one of them so {inferred} comes out whole")
        return train // divisor

    if micro is None:
        accumulation = accumulation or 1
        micro = divide(accumulation * world_size, f"gradient_accumulation_steps {accumulation} x data-parallel "
                       f"world size {world_size}", "train_micro_batch_size_per_gpu")
    elif train is None:
        accumulation = accumulation or 1
        train = micro * accumulation * world_size
    elif accumulation is None:
        accumulation = divide(micro * world_size, f"train_micro_batch_size_per_gpu {micro} x data-parallel "
                              f"world size {world_size}", "gradient_accumulation_steps")
    if train != micro * accumulation * world_size:
        raise ConfigError(f"train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x "
                          f"gradient_accumulation_steps {accumulation} x data-parallel world size {world_size} "
                          f"(= {micro * accumulation * world_size}); change one of them so the product holds")
    return train, micro, accumulation


_TOP_LEVEL_KEYS = tuple(f.name for f in fields(DeepSpeedConfig) if f.name != "raw")


def _parse(raw: dict, world_size: int) -> DeepSpeedConfig:
    world_size = _positive_integer(world_size, "world_size")
    _check_keys(raw, _TOP_LEVEL_KEYS, _DEEPSPEED_TOP_LEVEL_KEYS)
    train, micro, accumulation = _resolve_batch_sizes(raw, world_size)
    fp16 = _build(FP16Config, _section(raw, "fp16"), "fp16", _FP16_CHECKERS, _DEEPSPEED_FP16_KEYS)
    bf16 = _build(BF16Config, _section(raw, "bf16"), "bf16", _BF16_CHECKERS, _DEEPSPEED_BF16_KEYS)
    if fp16.enabled and bf16.enabled:
        raise ConfigError("fp16 and bf16 are both enabled; set one of them to false")
    steps_per_print = raw.get("steps_per_print")
    return DeepSpeedConfig(
        train_batch_size=train,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        optimizer=_parse_optimizer(raw),
        scheduler=_parse_scheduler(raw),
        fp16=fp16,
        bf16=bf16,
        gradient_clipping=_number(raw.get("gradient_clipping", 1.0), "gradient_clipping"),
        steps_per_print=None if steps_per_print is None else _positive_integer(steps_per_print, "steps_per_print"),
        wall_clock_breakdown=_boolean(raw.get("wall_clock_breakdown", False), "wall_clock_breakdown"),
        zero_optimization=_check_zero_semantics(_build(ZeroConfig, _section(raw, "zero_optimization"),
                                                       "zero_optimization", _ZERO_CHECKERS, _DEEPSPEED_ZERO_KEYS),
                                                _section(raw, "zero_optimization")),
        comms_logger=_build(CommsLoggerConfig, _section(raw, "comms_logger"), "comms_logger",
                            _COMMS_LOGGER_CHECKERS, {}),
        csv_monitor=_build(MonitorConfig, _section(raw, "csv_monitor"), "csv_monitor", _MONITOR_CHECKERS, {}),
        tensorboard=_build(MonitorConfig, _section(raw, "tensorboard"), "tensorboard", _MONITOR_CHECKERS, {}),
        raw=raw,
    )


# zero_optimization keys ds_lab reads but does not act on: a warning names each one given
_ZERO_NOT_ENFORCED = {
    "allgather_bucket_size": "ZeRO-1/2 all-gather per unit (units follow reduce_bucket_size)",
    "stage3_max_live_parameters": "ZeRO-3 releases each module after use; only the prefetch budget is enforced",
    "stage3_max_reuse_distance": "ZeRO-3 releases each module after use; only the prefetch budget is enforced",
}


def _check_zero_semantics(zero: "ZeroConfig", given: dict) -> "ZeroConfig":
    """Say so when a value asks for behaviour ds_lab does not have: nothing is silently ignored."""
    for key in ("contiguous_gradients", "reduce_scatter"):
        if given.get(key) is False:
            raise ConfigError(f"zero_optimization.{key}: false is not supported by ds_lab (its ZeRO always keeps "
                              f"contiguous flat gradients and reduce-scatters them); remove the key or set it true")
    for key, why in _ZERO_NOT_ENFORCED.items():
        if key in given:
            warnings.warn(f"zero_optimization.{key} is accepted but not enforced by ds_lab: {why}", stacklevel=3)
    if given.get("overlap_comm") is False and zero.stage > 0:
        warnings.warn("zero_optimization.overlap_comm: false is honoured at stage 0 only; ds_lab's ZeRO "
                      "stages always overlap gradient reduction with backward", stacklevel=3)
    return zero


def _load_json(path) -> dict:
    def no_duplicates(pairs):  # DeepSpeed also rejects duplicate keys (dict_raise_error_on_duplicate_keys)
        keys = [key for key, _ in pairs]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ConfigError(f"config file {os.fspath(path)} repeats the key '{duplicates[0]}'")
        return dict(pairs)

    try:
        with open(path, encoding="utf-8") as file:
            raw = json.load(file, object_pairs_hook=no_duplicates)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {os.fspath(path)}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"config file {os.fspath(path)} is not valid JSON: {error.msg} at line {error.lineno} "
                          f"column {error.colno}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {os.fspath(path)} must hold a JSON object, got {type(raw).__name__}")
    return raw
