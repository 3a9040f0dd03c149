"""Which mode a config selects: the one table of `initialize`. A new mode is a new file and a line here.

    zero_optimization.stage 0   runtime/data_parallel.py   DataParallel       bucketed all-reduce
    zero_optimization.stage 1   zero/stage1.py             ZeroStage1         optimizer states partitioned
    zero_optimization.stage 2   zero/stage2.py             ZeroStage2         + gradients
    zero_optimization.stage 3   zero/stage3.py             ZeroStage3         + parameters
"""
from __future__ import annotations

from ds_lab.runtime.data_parallel import DataParallel
from ds_lab.zero import build_zero_optimizer


def mode_builder(config):
    """A function (module, param lists, grid, model dtype, device) -> the mode `config` asks for."""
    zero = config.zero_optimization

    def build(module, groups, grid, model_dtype, device):
        if zero.stage == 0:
            overlap = True if zero.overlap_comm is None else zero.overlap_comm
            return DataParallel(module, grid, model_dtype, device, zero.reduce_bucket_size, overlap)
        return build_zero_optimizer(zero, module, groups, grid, model_dtype, device)

    return build
