"""Which mode a config selects: the one table of `initialize`. A new mode is a new file and a line here.

    zero_optimization.stage 0   runtime/data_parallel.py   DataParallel       bucketed all-reduce
    zero_optimization.stage 1   zero/stage1.py             ZeroStage1         optimizer states partitioned
    zero_optimization.stage 2   zero/stage2.py             ZeroStage2         + gradients
    zero_optimization.stage 3   zero/stage3.py             ZeroStage3         + parameters
    optimizer OneBitAdam/SignSGD runtime/compressed_dp.py  CompressedDataParallel  the optimizer exchanges
                                                                              (stage 0 and pure data parallel only)
"""
from __future__ import annotations

from ds_lab.config import ConfigError
from ds_lab.config.optimizer import COMMUNICATING_OPTIMIZERS
from ds_lab.runtime.compressed_dp import CompressedDataParallel
from ds_lab.runtime.data_parallel import DataParallel
from ds_lab.runtime.grad_reduce import GradientReduction
from ds_lab.runtime.precision import accumulation_dtype
from ds_lab.zero import build_zero_optimizer


def mode_builder(config):
    """A function (module, param lists, grid, model dtype, device) -> the mode `config` asks for."""
    zero = config.zero_optimization
    communicating = config.optimizer is not None and config.optimizer.type in COMMUNICATING_OPTIMIZERS
    if communicating and zero.stage != 0:
        raise ConfigError(f"optimizer {config.optimizer.type} exchanges compressed momentum or signs itself and "
                          f"runs with ZeRO stage 0 only (DeepSpeed refuses 1-bit Adam with ZeRO too); "
                          f"set zero_optimization.stage to 0, or use Adam with ZeRO stage {zero.stage}")

    def build(module, groups, grid, model_dtype, device):
        if communicating:
            if grid.size("model") > 1 or grid.size("pipe") > 1:
                raise ConfigError(f"optimizer {config.optimizer.type} runs on pure data parallel in ds_lab "
                                  f"(this grid: pipe {grid.size('pipe')} x model {grid.size('model')}); "
                                  f"use Adam with tensor or pipeline parallel")
        overlap = True if zero.overlap_comm is None else zero.overlap_comm
        if communicating or zero.stage == 0:
            kind = CompressedDataParallel if communicating else DataParallel
            mode = kind(module, grid, model_dtype, device, zero.reduce_bucket_size, overlap,
                        hierarchical=config.hierarchical_allreduce)
        else:
            mode = build_zero_optimizer(zero, module, groups, grid, model_dtype, device)
        mode.reduction = GradientReduction.from_config(config)  # prescale, predivide, wire dtype
        mode.grad_accum_dtype = accumulation_dtype(config.data_types)  # ZeRO's accumulation buffers
        return mode

    return build


def check_zero_optimizer(config, optimizer) -> None:
    """DeepSpeed's engine._do_optimizer_sanity_check: with ZeRO, an optimizer outside its tested list
    (torch's Adam, AdamW, Adagrad; FusedAdam / DeepSpeedCPUAdam, here ds_lab's Adam) needs
    ``"zero_allow_untested_optimizer": true``. DeepSpeed asserts; ds_lab's ZeRO steps any torch optimizer
    over its flat fp32 shard, so it warns instead and runs (docs/config_compatibility.md says so)."""
    import warnings

    import torch

    from ds_lab.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from ds_lab.optim import Adam

    if config.zero_optimization.stage == 0 or optimizer is None or config.zero_allow_untested_optimizer:
        return
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad) or \
            isinstance(optimizer, (Adam, FusedAdam, DeepSpeedCPUAdam)):
        return
    warnings.warn(f"You are using an untested ZeRO Optimizer ({type(optimizer).__name__}). DeepSpeed refuses it: "
                  f'add <"zero_allow_untested_optimizer": true> to the configuration to run it there too. '
                  f"ds_lab runs it (its ZeRO steps any torch optimizer over the flat fp32 shard)", stacklevel=3)
