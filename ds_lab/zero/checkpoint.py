"""ZeRO checkpoints: one shard file per rank, merged back into whole tensors on load.

    global_step{N}/
      mp_rank_00_model_states.pt                    module buffers (+ parameters below stage 3),
                                                    counters, scheduler, client_state (rank 0)
      zero_pp_rank_{r}_mp_rank_00_optim_states.pt   rank r's shard: fp32 master chunks, optimizer
                                                    state chunks, and the unit layout it used

Each shard file says how its rank cut every unit (chunk size, element count, parameter names and
shapes). Concatenating the chunks of all ranks and dropping the padding gives every parameter's
whole fp32 tensor back, whatever N was. Loading at another data-parallel size is then just cutting
those tensors again for the new layout (`ZeroOptimizerBase.load_shards`): no conversion step.
`consolidate` does the merge alone and returns one fp32 state_dict, like DeepSpeed's zero_to_fp32.
"""
from __future__ import annotations

import os
import re

import torch

SHARD_FILE = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


def shard_files(folder: str) -> list:
    found = [f for f in os.listdir(folder) if re.fullmatch(r"zero_pp_rank_\d+_mp_rank_00_optim_states\.pt", f)]
    return sorted(found, key=lambda f: int(f.split("_")[3]))


def _group_tensor(shard, key, group):
    if key == "masters":
        return shard["masters"][group]
    _, slot = key
    return shard["optimizer"]["state"][group][slot]


def full_tensors_by_name(shards: list, key="masters", groups=None) -> dict:
    """Merge every rank's chunks into whole fp32 tensors, by parameter name.

    key: "masters" for the fp32 weights, or ("optimizer", slot) for an optimizer state such as
    ("optimizer", "exp_avg"). groups: only these param groups (default: all).
    """
    shards = sorted(shards, key=lambda s: s["rank"])
    if [s["rank"] for s in shards] != list(range(shards[0]["world_size"])):
        raise ValueError(f"need the shards of all {shards[0]['world_size']} ranks, "
                         f"got ranks {[s['rank'] for s in shards]}")
    out, offsets = {}, {}
    for unit in shards[0]["units"]:
        g = unit["group"]
        if groups is not None and g not in groups:
            continue
        start = offsets.get(g, 0)
        offsets[g] = start + unit["chunk"]
        full = torch.cat([_group_tensor(s, key, g)[start:start + unit["chunk"]].float() for s in shards])
        at = 0
        for name, shape in zip(unit["names"], unit["shapes"]):
            n = 1
            for d in shape:
                n *= d
            out[name] = full[at:at + n].view(shape).clone()
            at += n
    return out


def consolidate(checkpoint_dir: str, tag=None) -> dict:
    """One fp32 state_dict from a checkpoint of any stage and any number of ranks."""
    from ds_lab.runtime.checkpoint import MODEL_FILE, resolve_tag, safe_load, verify

    tag = resolve_tag(checkpoint_dir, tag)
    if tag is None:
        raise FileNotFoundError(f"no 'latest' file in {checkpoint_dir}; pass tag=")
    folder = os.path.join(checkpoint_dir, tag)
    verify(folder)
    model = safe_load(os.path.join(folder, MODEL_FILE))
    state = {k: v.float() if v.is_floating_point() else v for k, v in model["module"].items()}
    files = shard_files(folder)
    if files:
        params = full_tensors_by_name([safe_load(os.path.join(folder, f)) for f in files])
    elif model.get("master_params_by_name"):
        params = model["master_params_by_name"]
    else:
        params = {}
    for key, name in model["param_aliases"].items():
        if name in params:
            state[key] = params[name]
    return state
