"""The config's plain sections: fp16, bf16, zero_optimization, comms_logger, csv_monitor, tensorboard.

Each section is a dataclass whose defaults are DeepSpeed's (the table in `ds_lab.config`), and a
table of checkers, one per field, that `checks._build` applies to what the user wrote. Keys that
DeepSpeed has and ds_lab does not are listed here, so the error can say "not supported yet"
instead of "unknown".
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

from ds_lab.config.checks import (ConfigError, _boolean, _integer, _number, _optional_boolean, _positive_integer,
                                  _positive_number, _string, _string_list, _zero_stage)
from ds_lab.config.features import (OffloadOptimizerConfig, OffloadParamConfig, _offload_optimizer_section,
                                    _offload_param_section, fold_legacy_zero)


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
    fp16_master_weights_and_grads: bool = False  # DeepSpeed: ZeRO + CPU offload only; ds_lab keeps fp32 masters


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
    stage3_max_reuse_distance: int = 1_000_000_000  # ZeRO-3 keeps units reused within this many elements
    stage3_gather_16bit_weights_on_model_save: bool = False  # save_16bit_model gathers the ZeRO-3 shards
    offload_optimizer: OffloadOptimizerConfig = field(default_factory=OffloadOptimizerConfig)  # DeepSpeed: None
    offload_param: OffloadParamConfig = field(default_factory=OffloadParamConfig)  # DeepSpeed: None
    # accepted, not enforced (_ZERO_NOT_ENFORCED says why): DeepSpeed's defaults
    allgather_partitions: bool = True
    round_robin_gradients: bool = False
    sub_group_size: int = 1_000_000_000
    use_multi_rank_bucket_allreduce: bool = True
    ignore_unused_parameters: bool = True
    elastic_checkpoint: bool = False
    load_from_fp32_weights: bool = True
    memory_efficient_linear: bool = True
    # DeepSpeed's deprecated spellings, folded into the fields above by _check_zero_semantics
    cpu_offload: Optional[bool] = None  # true = offload_optimizer {device: cpu}
    cpu_offload_param: Optional[bool] = None  # true = offload_param {device: cpu}
    cpu_offload_use_pin_memory: Optional[bool] = None  # dropped, as DeepSpeed does
    stage3_gather_fp16_weights_on_model_save: bool = False  # = stage3_gather_16bit_weights_on_model_save


@dataclass
class PipelineConfig:
    """DeepSpeed's `pipeline` section (its `stages`) plus ds_lab's schedule choice."""

    stages: object = "auto"  # "auto": the PipelineModule's num_stages; a number must equal it
    schedule: str = "1f1b"  # "1f1b" (DeepSpeed's TrainSchedule), "afab" (GPipe), "interleaved"
    virtual_stages: Optional[int] = None  # None: the PipelineModule's virtual_stages


def _pipeline_stages(value, name):
    return value if value == "auto" else _positive_integer(value, name)


def _pipeline_schedule(value, name):
    if value not in ("1f1b", "afab", "interleaved"):
        raise ConfigError(f"{name} must be '1f1b', 'afab' or 'interleaved', got {value!r}")
    return value


_PIPELINE_CHECKERS = {"stages": _pipeline_stages, "schedule": _pipeline_schedule,
                      "virtual_stages": _positive_integer}
_DEEPSPEED_PIPELINE_KEYS = {
    "partition": "set PipelineModule(partition_method=...) instead",
    "seed_layers": "set PipelineModule(seed_layers=True) instead",
    "activation_checkpoint_interval": "set PipelineModule(activation_checkpoint_interval=...) instead",
    "pipe_partitioned": "ds_lab sends whole activations between stages", "grad_partitioned":
    "ds_lab sends whole gradients between stages", "use_reentrant": "ds_lab checkpoints without reentrancy"}


@dataclass
class TensorParallelConfig:
    """DeepSpeed's `tensor_parallel` section (AutoTP training): `initialize` shards the model's
    attention and MLP projections over `autotp_size` consecutive ranks (ds_lab/parallel/autotp.py)."""

    autotp_size: int = 0  # 0 or 1: off (DeepSpeed's default 0)
    tp_overlap_comm: bool = False  # DeepSpeed's async column all-reduce; ds_lab has only the synchronous one


def _tp_overlap_comm(value, name):
    if _boolean(value, name):
        raise ConfigError(f"{name}: true is not supported by ds_lab (its tensor-parallel all-reduces are "
                          f"synchronous); remove the key or set it false")
    return False


_TENSOR_PARALLEL_CHECKERS = {"autotp_size": _integer, "tp_overlap_comm": _tp_overlap_comm}
_DEEPSPEED_TENSOR_PARALLEL_KEYS = {
    "dtype": "ds_lab takes the precision from the 'bf16' / 'fp16' sections",
    "tp": "the tensor group is the grid's model axis, of size autotp_size", "tensor_parallel":
    "the tensor group is the grid's model axis, of size autotp_size", "partition_config":
    "ds_lab shards by its name rules or the model's Hugging Face tp_plan", "preset_model":
    "ds_lab shards by its name rules or the model's Hugging Face tp_plan", "injection_policy_tuple": "",
    "keep_module_on_host": "", "replace_with_kernel_inject": "", "kernel_inject": ""}


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


# ---------------------------------------------------------------- key registries
# DeepSpeed keys that ds_lab does not model yet, with an optional hint. Taken from DeepSpeed's
# runtime/config.py (including the keys it now rejects as removed), runtime/constants.py and the
# sub-configs it reads (monitor, profiling, autotuning, data pipeline, checkpointing, ...).
_DEEPSPEED_TOP_LEVEL_KEYS = {key: "" for key in (
    "aio", "amp", "autotuning", "checkpoint", "comet", "compile", "compression_training", "curriculum_learning",
    "data_efficiency", "dataloader_drop_last", "datastates_ckpt", "disable_allgather", "disable_python_gc",
    "dump_state", "eigenvalue", "elasticity", "expert_parallel", "fp32_allreduce", "gradient_allreduce_op",
    "graph_harvesting", "hybrid_engine", "log_level", "managed_gradient_accumulation", "memory_breakdown", "nebula",
    "progressive_layer_drop", "quantize_training", "seq_parallel_comm_data_type",
    "seq_parallel_communication_data_type", "sequence_parallel_size", "sparse_attention", "sparse_gradients",
    "timers", "torch_autocast", "trackio", "use_data_before_expert_parallelism", "vocabulary_size",
    "weight_quantization", "zero_force_ds_cpu_optimizer")}
_DEEPSPEED_TOP_LEVEL_KEYS["bfloat16"] = "DeepSpeed's old name for 'bf16'; write 'bf16'"

_DEEPSPEED_ZERO_KEYS = {key: "" for key in (
    "enable_sanity_checks", "leaf_module", "legacy_stage1", "log_trace_cache_warnings",
    "mics_hierarchical_params_gather", "mics_shard_size", "override_module_apply", "pipeline_loading_checkpoint",
    "save_muon_momentum_buffer_in_memory", "stage3_allgather_sequential", "stage3_model_persistence_threshold",
    "stage3_module_granularity_threshold", "stage3_partition_stream_chunk_size",
    "stage3_use_all_reduce_for_fetch_params", "zenflow", "zero_hpz_partition_size", "zero_quantized_gradients",
    "zero_quantized_nontrainable_weights", "zero_quantized_weights", "zeropp_loco_param")}
_DEEPSPEED_FP16_KEYS = {"fused_mode": ""}
_DEEPSPEED_BF16_KEYS = {key: "" for key in ("immediate_grad_update", "check_grad_overflow", "check_overflow",
                                            "bf16_master_weights_and_grads", "bf16_optimizer_states")}

_FP16_CHECKERS = {
    "enabled": _boolean, "auto_cast": _boolean, "loss_scale": _number, "initial_scale_power": _integer,
    "loss_scale_window": _positive_integer, "hysteresis": _positive_integer, "consecutive_hysteresis": _boolean,
    "min_loss_scale": _positive_number, "fp16_master_weights_and_grads": _boolean}
_BF16_CHECKERS = {"enabled": _boolean}
_ZERO_CHECKERS = {
    "stage": _zero_stage, "reduce_bucket_size": _integer, "allgather_bucket_size": _integer,
    "overlap_comm": _optional_boolean, "contiguous_gradients": _boolean, "reduce_scatter": _boolean,
    "stage3_prefetch_bucket_size": _integer, "stage3_param_persistence_threshold": _integer,
    "stage3_max_live_parameters": _integer, "stage3_max_reuse_distance": _integer,
    "stage3_gather_16bit_weights_on_model_save": _boolean, "offload_optimizer": _offload_optimizer_section,
    "offload_param": _offload_param_section, "allgather_partitions": _boolean, "round_robin_gradients": _boolean,
    "sub_group_size": _integer, "use_multi_rank_bucket_allreduce": _boolean, "ignore_unused_parameters": _boolean,
    "elastic_checkpoint": _boolean, "load_from_fp32_weights": _boolean, "memory_efficient_linear": _boolean,
    "cpu_offload": _optional_boolean, "cpu_offload_param": _optional_boolean,
    "cpu_offload_use_pin_memory": _optional_boolean, "stage3_gather_fp16_weights_on_model_save": _boolean}
_COMMS_LOGGER_CHECKERS = {"enabled": _boolean, "verbose": _boolean, "prof_all": _boolean, "debug": _boolean,
                          "prof_ops": _string_list}
_MONITOR_CHECKERS = {"enabled": _boolean, "output_path": _string, "job_name": _string}


# zero_optimization keys ds_lab reads but does not act on: a warning names each one given
_ZERO_NOT_ENFORCED = {
    "allgather_bucket_size": "ZeRO-1/2 all-gather per unit (units follow reduce_bucket_size)",
    "stage3_max_live_parameters": "no cap on whole ZeRO-3 parameters alive at once: the prefetch budget and "
                                  "stage3_max_reuse_distance decide what is gathered",
    "allgather_partitions": "ZeRO-1/2 always all-gather the updated partitions (false: DeepSpeed broadcasts them, "
                            "same values)",
    "round_robin_gradients": "an offload copy-scheduling optimisation; the gradient values do not change",
    "sub_group_size": "the optimizer steps over each rank's whole flat shard at once (same values)",
    "use_multi_rank_bucket_allreduce": "ZeRO-1/2 reduce-scatter each bucket in one collective (same values)",
    "ignore_unused_parameters": "unused parameters get zero gradients and training continues (DeepSpeed's true)",
    "elastic_checkpoint": "checkpoints always hold each rank's shard; ds_lab/runtime/reshard.py reshapes them",
    "load_from_fp32_weights": "loading always restores the fp32 master weights from the checkpoint",
    "memory_efficient_linear": "ZeRO-3 uses torch's own linear; its autograd saves what backward needs",
    "cpu_offload_use_pin_memory": "deprecated; DeepSpeed drops it too: set offload_optimizer/offload_param.pin_memory",
}


def _check_zero_semantics(zero: "ZeroConfig", given: dict) -> "ZeroConfig":
    """Say so when a value asks for behaviour ds_lab does not have: nothing is silently ignored."""
    zero = fold_legacy_zero(zero, given)
    for key in ("contiguous_gradients", "reduce_scatter"):
        if given.get(key) is False:
            raise ConfigError(f"zero_optimization.{key}: false is not supported by ds_lab (its ZeRO always keeps "
                              f"contiguous flat gradients and reduce-scatters them); remove the key or set it true")
    for key, why in _ZERO_NOT_ENFORCED.items():
        if key in given:
            warnings.warn(f"zero_optimization.{key} is accepted but not enforced by ds_lab: {why}", stacklevel=3)
    if given.get("overlap_comm") is False and zero.stage > 0:
        warnings.warn("zero_optimization.overlap_comm: false is honoured at stage 0 only; ds_lab's ZeRO "
                      "stages start each bucket's reduction as soon as it is full (with a reduce_bucket_size "
                      "larger than the model, that is at the end of backward)", stacklevel=3)
    return zero


def _hierarchical_allreduce(value, zero_stage: int) -> bool:
    """ds_lab's own top-level key: the stage-0 gradient all-reduce goes intra-node, inter-node,
    intra-node (ds_lab/comm/hierarchical.py). ZeRO stages reduce-scatter instead: refused there."""
    enabled = _boolean(value, "hierarchical_allreduce")
    if enabled and zero_stage > 0:
        raise ConfigError(f"hierarchical_allreduce: true applies to the stage-0 gradient all-reduce only, but "
                          f"zero_optimization.stage is {zero_stage}; set the stage to 0 or remove the key")
    return enabled


def _fused_kernels(value, name):
    """ds_lab's own top-level key: true/false/null. null (the default) lets each op pick its CUDA kernel
    when its tensors are on a GPU and CuPy is installed, torch otherwise (ds_lab/ops/backend.py)."""
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true, false or null (null: the CUDA kernels when CUDA and CuPy are "
                          f"there, torch otherwise), got {value!r}")
    return value
