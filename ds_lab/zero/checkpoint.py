"""ZeRO checkpoints merged back into one fp32 state_dict, like DeepSpeed's zero_to_fp32.

    global_step{N}/
      mp_rank_00_model_states.pt                    module buffers (+ parameters below stage 3),
                                                    counters, scheduler, client_state
      zero_pp_rank_{r}_mp_rank_00_optim_states.pt   rank r's shard: fp32 master chunks, optimizer
                                                    state chunks, and the unit layout it used

Each shard file says how its rank cut every unit (chunk size, element count, parameter names and
shapes). Concatenating the chunks of all ranks and dropping the padding gives every parameter's
whole fp32 tensor back, whatever N was (`runtime.checkpoint.full_tensors_by_name`). Loading at
another data-parallel size or stage is then just cutting those tensors again for the new layout
(`ZeroOptimizerBase.load`): no conversion step. `consolidate` does the merge alone.
"""
from __future__ import annotations

import os

from ds_lab.runtime.checkpoint import (full_tensors_by_name, model_file, resolve_tag, safe_load,
                                       saved_weights, shard_files, verify)

__all__ = ["consolidate", "full_tensors_by_name"]


def consolidate(checkpoint_dir: str, tag=None, mp_rank: int = 0) -> dict:
    """One fp32 state_dict (of model slice `mp_rank`) from a checkpoint of any stage and any number of ranks."""
    tag = resolve_tag(checkpoint_dir, tag)
    if tag is None:
        raise FileNotFoundError(f"no 'latest' file in {checkpoint_dir}; pass tag=")
    folder = os.path.join(checkpoint_dir, tag)
    verify(folder)
    model = safe_load(os.path.join(folder, model_file(mp_rank)))
    state = {k: v.float() if v.is_floating_point() else v for k, v in model["module"].items()}
    params = saved_weights(model, [safe_load(os.path.join(folder, f)) for f in shard_files(folder, mp_rank)])
    for key, name in model["param_aliases"].items():
        if name in params:
            state[key] = params[name]
    return state
