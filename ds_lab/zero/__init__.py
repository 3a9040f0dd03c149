"""ZeRO: partition optimizer states (stage 1), gradients (2) and parameters (3) over data-parallel ranks."""
from __future__ import annotations

from ds_lab.zero.checkpoint import consolidate
from ds_lab.zero.init import GatheredParameters, Init
from ds_lab.zero.offload import Offload
from ds_lab.zero.partition import buckets_in_backward_order, make_units
from ds_lab.zero.stage1 import ZeroStage1
from ds_lab.zero.stage2 import ZeroStage2
from ds_lab.zero.stage3 import ZeroStage3
from ds_lab.zero.stage3_units import register_external_parameter


def build_zero_optimizer(zero_config, module, groups, grid, model_dtype, device):
    """The stage's optimizer wrapper; units follow `reduce_bucket_size` (stages 1, 2) or modules (3);
    `offload_optimizer` / `offload_param` keep what they name in host memory (`offload.py`)."""
    offload = Offload.from_config(zero_config)  # checks the offload sections against the stage
    if zero_config.stage in (1, 2):
        split = buckets_in_backward_order(zero_config.reduce_bucket_size)
        units = make_units(groups, grid.size("data"), grid.rank_in("data"), split)
        cls = ZeroStage1 if zero_config.stage == 1 else ZeroStage2
        return cls(module, groups, units, grid, model_dtype, device, offload)
    return ZeroStage3.build(zero_config, module, groups, grid, model_dtype, device)


__all__ = ["build_zero_optimizer", "consolidate", "Offload", "Init", "GatheredParameters",
           "register_external_parameter"]
