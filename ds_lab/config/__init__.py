"""DeepSpeed-style JSON config -> validated dataclasses.

    cfg = DeepSpeedConfig.from_any("ds_config.json", world_size=2)   # or a dict, or a DeepSpeedConfig
    cfg.train_micro_batch_size_per_gpu, cfg.zero_optimization.stage, cfg.precision

Batch sizes follow DeepSpeed: train_batch_size = micro x accumulation x data-parallel world size.
Give any two and the third is inferred; give only train_batch_size (accumulation 1) or only the
micro batch (accumulation 1). Every key is checked: a typo gets a "did you mean", a DeepSpeed key
ds_lab has not built yet is named as such, nothing is silently ignored.

Defaults, checked against DeepSpeed's source (deepspeedai/DeepSpeed master), not its docs. Sources:
C runtime/constants.py, P runtime/precision_config.py, Z runtime/zero/config.py, L comm/constants.py,
M monitor/config.py, F ops/adam/fused_adam.py, E runtime/engine.py + runtime/config.py,
T runtime/tensor_parallel/config.py, O runtime/zero/offload_config.py, R profiling/config.py,
A runtime/activation_checkpointing/config.py (number_checkpoints None, the rest False). The
gradient-reduction keys act in ds_lab/runtime/grad_reduce.py; features.py holds the newer sections.

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
| fp16.fp16_master_weights_and_grads      | False             | P   | ZeRO + offload cpu only; not enforced |
| bf16.enabled                             | False             | P   |                                       |
| pipeline.stages                          | "auto"            | C   | ds_lab adds schedule, virtual_stages  |
| tensor_parallel.autotp_size              | 0 (off)           | T   | > 1: AutoTP in initialize()           |
| tensor_parallel.tp_overlap_comm          | False             | T   | true refused (sync all-reduces only)  |
| zero_optimization.stage                  | 0                 | Z   |                                       |
| reduce_bucket_size, allgather_bucket_size| 500_000_000 each  | Z   | elements                              |
| overlap_comm                             | None              | Z   | see "departs" below                   |
| contiguous_gradients, reduce_scatter     | True, True        | Z   |                                       |
| stage3_prefetch_bucket_size              | 50_000_000        | Z   | docs say 5e8                          |
| stage3_param_persistence_threshold       | 100_000           | Z   |                                       |
| stage3_max_live_parameters               | 1_000_000_000     | Z   |                                       |
| stage3_max_reuse_distance                | 1_000_000_000     | Z   |                                       |
| stage3_gather_16bit_weights_on_model_save| False             | Z   | alias: stage3_gather_fp16_weights_on_model_save |
| offload_optimizer, offload_param         | device "none"     | O   | Z has None; "nvme" refused            |
|   pin_memory, buffer_count (opt / param) | True, 4 / 5       | O   | ratio 1.0 (< 1 refused), fast_init F  |
|   buffer_size, max_in_cpu (param)        | 1e8, 1e9          | O   | nvme_path None, pipeline_* False      |
| cpu_offload, cpu_offload_param           | None              | Z   | deprecated: true = device "cpu"       |
| cpu_offload_use_pin_memory               | None              | Z   | deprecated; dropped as in DeepSpeed   |
| allgather_partitions                     | True              | Z   | not enforced: always all-gathered     |
| round_robin_gradients                    | False             | Z   | not enforced: offload copy order only |
| sub_group_size                           | 1_000_000_000     | Z   | not enforced: one step per shard      |
| use_multi_rank_bucket_allreduce          | True              | Z   | not enforced: one collective a bucket |
| ignore_unused_parameters                 | True              | Z   | not enforced: unused -> zero grads    |
| elastic_checkpoint                       | False             | Z   | not enforced: runtime/reshard.py      |
| load_from_fp32_weights                   | True              | Z   | not enforced: fp32 masters reloaded   |
| memory_efficient_linear                  | True              | Z   | not enforced: torch's linear          |
| prescale_gradients                       | False             | E   | ZeRO-2/3 refuse true, as DeepSpeed    |
| gradient_predivide_factor                | 1.0               | E   | ZeRO-2/3 refuse != 1, as DeepSpeed    |
| communication_data_type                  | None (precision)  | E   | "fp16", "bf16", "fp32"                |
| zero_allow_untested_optimizer            | False             | E   | ZeRO + client optimizer not Adam(W)   |
| data_types.grad_accum_dtype              | None (model's)    | E   | stage 0: must equal the model's       |
| wandb enabled, group, team, project      | False, None, None,| M   | project "deepspeed"                   |
| flops_profiler enabled, profile_step     | False, 1          | R   | module_depth -1, top_modules 1        |
| flops_profiler detailed, output_file     | True, None        | R   | recompute_fwd_factor 0.0              |
| activation_checkpointing (six keys)      | False / None      | A   | partition_activations, cpu_checkp... |
| comms_logger enabled, verbose, debug     | False             | L   |                                       |
| comms_logger prof_all, prof_ops          | True, []          | L   |                                       |
| csv_monitor / tensorboard enabled        | False             | M   |                                       |
| csv_monitor / tensorboard output_path    | ""                | M   |                                       |
| csv_monitor / tensorboard job_name       | "DeepSpeedJobName"| M   |                                       |
| optimizer.params lr, betas               | 1e-3, (0.9, 0.999)| F   |                                       |
| optimizer.params eps, weight_decay       | 1e-8, 0.0         | F   |                                       |
| optimizer.params adam_w_mode             | True              | E   | see "departs" below                   |
| scheduler.params                         | per schedule      |     | SCHEDULES = lr_schedules.py signatures|
| hierarchical_allreduce                   | False             | -   | ds_lab's own; stage 0 only (below)    |
| fused_kernels                            | None (auto)       | -   | ds_lab's own; no GPU/CuPy -> torch    |

Where ds_lab departs from DeepSpeed:
- DeepSpeed's optimizer "Adam" is AdamW (decoupled weight decay) unless params.adam_w_mode is false.
  ds_lab resolves this here: ``optimizer.type`` is the *effective* algorithm ("AdamW", or "Adam" only
  when adam_w_mode is false) and ``optimizer.params`` holds torch-style keys only (lr, betas, eps,
  weight_decay), defaults filled in. ``AdamW`` with adam_w_mode false is an error (DeepSpeed ignores it).
- Unknown keys, wrong types, and DeepSpeed features ds_lab lacks are errors (DeepSpeed ignores most
  unknown keys). ``"zero_optimization": true/false`` (deprecated) = stage 1 / 0, with a warning.
- Keys DeepSpeed reads that change nothing in ds_lab (allgather_partitions, round_robin_gradients,
  sub_group_size, ...) are accepted with a warning naming what ds_lab does instead (_ZERO_NOT_ENFORCED).
- ``zero_optimization.overlap_comm`` None means "the engine decides": ds_lab overlaps gradient
  all-reduce with backward at stage 0, like DDP. DeepSpeed turns None into (stage == 3).
- Only ZeRO stages in ``SUPPORTED_ZERO_STAGES`` are accepted for now.
- ``fp16.auto_cast: true`` is refused for now (DeepSpeed casts forward's floating-point inputs to fp16).
- ``hierarchical_allreduce`` is ds_lab's own key (DeepSpeed has none): true makes the stage-0
  gradient all-reduce topology-aware (intra-node reduce-scatter, inter-node all-reduce of 1/k,
  intra-node all-gather; ``ds_lab/comm/hierarchical.py``). With ZeRO stages it is an error.
- ``fused_kernels`` is ds_lab's own key (DeepSpeed builds its ops per feature): false makes every op
  run its torch reference; null (default) and true let an op use its kernels/*.cu through CuPy when its
  tensors are on a GPU and CuPy is installed. Without them, true falls back to torch, with no error.
- An optimizer or scheduler passed to ``initialize()`` overrides the config's section, as in DeepSpeed,
  with a warning (DeepSpeed only logs it): see ``check_client_optimizer``.

Files: `checks.py` (the checkers and ConfigError), `sections.py` (fp16, bf16, zero, loggers), `features.py`
(offload, wandb, flops_profiler, activation_checkpointing, data_types, the gradient-reduction keys),
`optimizer.py` (optimizer, scheduler, and client objects passed to initialize()); this file
holds the whole config, the batch-size rule, and the JSON loading.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Optional

from ds_lab.config.checks import (SUPPORTED_ZERO_STAGES, ConfigError, _boolean, _build, _check_keys, _number,
                                  _positive_integer, _section)
from ds_lab.config.features import (ActivationCheckpointingConfig, DataTypesConfig, FlopsProfilerConfig,
                                    OffloadOptimizerConfig, OffloadParamConfig, WandbConfig, parse_features)
from ds_lab.config.optimizer import (ADAM_PARAM_DEFAULTS, SCHEDULES, SUPPORTED_OPTIMIZERS, WARMUP_TYPES,
                                     OptimizerConfig, SchedulerConfig, check_client_optimizer, check_client_scheduler,
                                     parse_optimizer, parse_scheduler)
from ds_lab.config.sections import (_BF16_CHECKERS, _COMMS_LOGGER_CHECKERS, _DEEPSPEED_BF16_KEYS,
                                    _DEEPSPEED_FP16_KEYS, _DEEPSPEED_TOP_LEVEL_KEYS, _DEEPSPEED_ZERO_KEYS,
                                    _FP16_CHECKERS, _MONITOR_CHECKERS, _ZERO_CHECKERS, BF16Config, CommsLoggerConfig,
                                    FP16Config, MonitorConfig, ZeroConfig,
                                    _check_zero_semantics, _DEEPSPEED_PIPELINE_KEYS, _PIPELINE_CHECKERS, PipelineConfig,
                                    _DEEPSPEED_TENSOR_PARALLEL_KEYS, _TENSOR_PARALLEL_CHECKERS, TensorParallelConfig,
                                    _fused_kernels, _hierarchical_allreduce)

__all__ = ["ConfigError", "DeepSpeedConfig", "OptimizerConfig", "SchedulerConfig", "FP16Config", "BF16Config",
           "ZeroConfig", "CommsLoggerConfig", "MonitorConfig", "SUPPORTED_ZERO_STAGES", "SUPPORTED_OPTIMIZERS",
           "SCHEDULES", "WARMUP_TYPES", "ADAM_PARAM_DEFAULTS", "check_client_optimizer", "check_client_scheduler",
           "OffloadOptimizerConfig", "OffloadParamConfig", "WandbConfig", "FlopsProfilerConfig",
           "ActivationCheckpointingConfig", "DataTypesConfig"]


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
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # read by the pipeline engine only
    tensor_parallel: TensorParallelConfig = field(default_factory=TensorParallelConfig)  # AutoTP, in initialize
    hierarchical_allreduce: bool = False  # ds_lab's own: stage-0 gradients all-reduced node-aware
    fused_kernels: Optional[bool] = None  # ds_lab's own: None/True = CUDA kernels where they can run, False = torch
    prescale_gradients: bool = False  # divide by the world size before the all-reduce (else after)
    gradient_predivide_factor: float = 1.0  # postscale: x 1/f before the all-reduce, x f/N after
    communication_data_type: Optional[str] = None  # "fp16"/"bf16"/"fp32"; None: the training precision
    zero_allow_untested_optimizer: bool = False  # ZeRO with a client optimizer DeepSpeed has not tested
    data_types: DataTypesConfig = field(default_factory=DataTypesConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    flops_profiler: FlopsProfilerConfig = field(default_factory=FlopsProfilerConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(default_factory=ActivationCheckpointingConfig)
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
    _check_keys(raw, _TOP_LEVEL_KEYS + ("allgather_size",), _DEEPSPEED_TOP_LEVEL_KEYS)
    train, micro, accumulation = _resolve_batch_sizes(raw, world_size)
    fp16 = _build(FP16Config, _section(raw, "fp16"), "fp16", _FP16_CHECKERS, _DEEPSPEED_FP16_KEYS)
    bf16 = _build(BF16Config, _section(raw, "bf16"), "bf16", _BF16_CHECKERS, _DEEPSPEED_BF16_KEYS)
    if fp16.enabled and bf16.enabled:
        raise ConfigError("fp16 and bf16 are both enabled; set one of them to false")
    steps_per_print = raw.get("steps_per_print")
    _legacy_zero_flag(raw)
    zero = _check_zero_semantics(_build(ZeroConfig, _section(raw, "zero_optimization"), "zero_optimization",
                                        _ZERO_CHECKERS, _DEEPSPEED_ZERO_KEYS), _section(raw, "zero_optimization"))
    return DeepSpeedConfig(
        train_batch_size=train,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        optimizer=parse_optimizer(raw),
        scheduler=parse_scheduler(raw),
        fp16=fp16,
        bf16=bf16,
        gradient_clipping=_number(raw.get("gradient_clipping", 1.0), "gradient_clipping"),
        steps_per_print=None if steps_per_print is None else _positive_integer(steps_per_print, "steps_per_print"),
        wall_clock_breakdown=_boolean(raw.get("wall_clock_breakdown", False), "wall_clock_breakdown"),
        zero_optimization=zero,
        comms_logger=_build(CommsLoggerConfig, _section(raw, "comms_logger"), "comms_logger",
                            _COMMS_LOGGER_CHECKERS, {}),
        csv_monitor=_build(MonitorConfig, _section(raw, "csv_monitor"), "csv_monitor", _MONITOR_CHECKERS, {}),
        tensorboard=_build(MonitorConfig, _section(raw, "tensorboard"), "tensorboard", _MONITOR_CHECKERS, {}),
        pipeline=_build(PipelineConfig, _section(raw, "pipeline"), "pipeline", _PIPELINE_CHECKERS,
                        _DEEPSPEED_PIPELINE_KEYS),
        tensor_parallel=_build(TensorParallelConfig, _section(raw, "tensor_parallel"), "tensor_parallel",
                               _TENSOR_PARALLEL_CHECKERS, _DEEPSPEED_TENSOR_PARALLEL_KEYS),
        hierarchical_allreduce=_hierarchical_allreduce(raw.get("hierarchical_allreduce", False), zero.stage),
        fused_kernels=_fused_kernels(raw.get("fused_kernels"), "fused_kernels"),
        **parse_features(raw, zero, fp16, bf16),
        raw=raw,
    )


def _legacy_zero_flag(raw: dict) -> None:
    """DeepSpeed's deprecated ``"zero_optimization": true/false`` = stage 1 / 0, with the top-level
    ``allgather_size`` as the all-gather bucket (zero/config.py read_zero_config_deprecated)."""
    flag = raw.get("zero_optimization")
    if isinstance(flag, bool):
        warnings.warn('"zero_optimization": true/false is DeepSpeed\'s deprecated form; write '
                      '{"zero_optimization": {"stage": 1}} (true) or {"stage": 0} (false)', stacklevel=4)
        raw["zero_optimization"] = {"stage": int(flag)}
        if flag and "allgather_size" in raw:
            raw["zero_optimization"]["allgather_bucket_size"] = raw["allgather_size"]
    if "allgather_size" in raw:
        if not isinstance(flag, bool):
            raise ConfigError("'allgather_size' belongs to the deprecated \"zero_optimization\": true form; "
                              "write zero_optimization.allgather_bucket_size instead")
        del raw["allgather_size"]



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
