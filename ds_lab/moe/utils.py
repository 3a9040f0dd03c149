"""DeepSpeed's `deepspeed.moe.utils` for a model without experts, which every ds_lab model is.

Scripts written for DeepSpeed often build their optimizer groups like this whether or not the model
has MoE layers:

    groups = [{"params": model.parameters(), "weight_decay": 0.1}]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = torch.optim.AdamW(groups)

ds_lab has no Mixture of Experts, so no parameter is an expert parameter (`is_moe_param` is always
False) and the split has nothing to split: the groups come back as they went in, as a list (a dict
becomes a one-element list and a tuple a list, as DeepSpeed returns them), the same dict objects.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple, Union

__all__ = ["is_moe_param", "split_params_into_different_moe_groups_for_optimizer", "is_moe_param_group"]


def is_moe_param(param) -> bool:
    """False: ds_lab has no expert parameters."""
    return False


def is_moe_param_group(param_group) -> bool:
    return bool(param_group.get("moe", False))


def split_params_into_different_moe_groups_for_optimizer(
        param_groups: Union[Dict[str, Any], Tuple[Dict[str, Any], ...], List[Dict[str, Any]]],
        max_group_size: Union[int, float] = 178956971) -> List[Dict[str, Any]]:
    """DeepSpeed's signature and default; with no MoE here, returns `param_groups` unchanged as a list."""
    if isinstance(param_groups, tuple):
        param_groups = list(param_groups)
    elif isinstance(param_groups, dict):
        param_groups = [param_groups]
    elif not isinstance(param_groups, list):
        raise ValueError(f"Unknown param group type of {type(param_groups)}: pass a dict, a list or a tuple of dicts")
    for group in param_groups:
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError("each param group must be a dict with a 'params' entry, as torch.optim takes them")
    return param_groups
