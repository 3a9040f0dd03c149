"""DeepSpeed's `deepspeed.moe` names that dense training scripts call. ds_lab has no Mixture of
Experts: `ds_lab.moe.utils` hands parameter groups back unchanged (see its docstring)."""
from ds_lab.moe import utils

__all__ = ["utils"]
