"""A checkpoint's files: their names (keyed by the grid), how they are written (atomically, with a
manifest of sizes and hashes) and checked, and how partitioned pieces merge back into whole
tensors by parameter name. `checkpoint.py` (what an engine saves and loads) and `reshard.py`
(loading at another shape) both stand on this file.

    mp_rank_{m:02d}_model_states.pt                      model slice m (pipe x model rank)
    zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt     data rank d's ZeRO shard of slice m
    manifest.json                                        every file's size and sha256: "complete"
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile

import torch

from ds_lab.runtime.safe_load import CheckpointError


MODEL_FILE = "mp_rank_00_model_states.pt"  # model slice 0; see model_file()
MANIFEST = "manifest.json"


def atomic_write(path: str, write) -> None:
    """Call `write(fileobj)` on a temporary file next to `path`, fsync it, rename it onto `path`."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str, files: list) -> None:
    entries = {name: dict(bytes=os.path.getsize(os.path.join(folder, name)),
                          sha256=_sha256(os.path.join(folder, name))) for name in files}
    atomic_write(os.path.join(folder, MANIFEST), lambda f: f.write(json.dumps(entries, indent=1).encode()))


def verify(folder: str) -> dict:
    """Check a tag folder against its manifest; return the manifest or raise CheckpointError."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {MANIFEST}): it was not fully "
                              f"written; load an earlier tag")
    with open(path) as f:
        entries = json.load(f)
    for name, entry in entries.items():
        file = os.path.join(folder, name)
        if not os.path.exists(file):
            raise CheckpointError(f"checkpoint file {file} is missing")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is truncated or corrupted: "
                                  f"{size} bytes, the manifest says {entry['bytes']}")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {file} is corrupted: its sha256 differs from the manifest")
    return entries


def model_file(mp_rank: int) -> str:
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def shard_file(dp_rank: int, mp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def shard_files(folder: str, mp_rank: int = 0) -> list:
    """The partitioned-state files of one model slice, in data-parallel rank order."""
    pattern = re.compile(rf"zero_pp_rank_(\d+)_mp_rank_{mp_rank:02d}_optim_states\.pt")
    found = [(int(m.group(1)), f) for f in os.listdir(folder) if (m := pattern.fullmatch(f))]
    return [f for _, f in sorted(found)]


def param_names(module) -> dict:
    """Parameter -> its first name (tied weights are one parameter, saved once)."""
    names = {}
    for name, p in module.named_parameters():
        names.setdefault(p, name)
    return names


def state_dict_params(module) -> dict:
    """state_dict key -> Parameter, tied weights included under each of their names."""
    out = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name, p in mod._parameters.items():
            if p is not None:
                out[f"{prefix}.{name}" if prefix else name] = p
    return out


def resolve_tag(load_dir, tag):
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        return f.read().strip()


def full_tensors_by_name(shards: list, key="masters", groups=None) -> dict:
    """Merge every rank's chunks of a partitioned checkpoint into whole fp32 tensors, by name.

    Each shard file says how its rank cut every unit (chunk, element count, names, shapes):
    concatenating the chunks of all ranks and dropping the padding gives each tensor back,
    whatever the number of ranks was. key: "masters" for the fp32 weights, or ("optimizer", slot)
    for an optimizer state such as ("optimizer", "exp_avg"). groups: only these param groups.
    """
    shards = sorted(shards, key=lambda s: s["rank"])
    if [s["rank"] for s in shards] != list(range(shards[0]["world_size"])):
        raise CheckpointError(f"need the shards of all {shards[0]['world_size']} ranks, "
                              f"got ranks {[s['rank'] for s in shards]}")

    def group_tensor(shard, g):
        return shard["masters"][g] if key == "masters" else shard["optimizer"]["state"][g][key[1]]

    out, offsets = {}, {}
    for unit in shards[0]["units"]:
        g = unit["group"]
        if groups is not None and g not in groups:
            continue
        start = offsets.get(g, 0)
        offsets[g] = start + unit["chunk"]
        full = torch.cat([group_tensor(s, g)[start:start + unit["chunk"]].float() for s in shards])
        at = 0
        for name, shape in zip(unit["names"], unit["shapes"]):
            n = math.prod(shape)
            out[name] = full[at:at + n].view(shape).clone()
            at += n
    return out


def saved_weights(state: dict, shards: list) -> dict:
    """Every parameter's whole fp32 value by name, from wherever the checkpoint keeps it."""
    by_name = {name: state["module"][key].float() for key, name in state["param_aliases"].items()
               if key in state["module"]}  # frozen parameters live only here under ZeRO 1-2
    if shards:
        by_name.update(full_tensors_by_name(shards))  # the exact fp32 masters of what the optimizer steps
    else:
        by_name.update((state.get("mode") or {}).get("master_params_by_name") or {})  # exact fp32 masters
    return by_name


def check_names_and_shapes(names: dict, weights: dict, folder: str, strict: bool, shape_of,
                           check_extra: bool = True, note: str = "") -> None:
    """Every parameter (`names`: parameter -> name) is in `weights` with the shape `shape_of(p)`;
    say which one is not. Strict: a parameter missing, or (check_extra) one the model lacks, fails."""
    for p, name in names.items():
        if name not in weights:
            if strict:
                raise CheckpointError(f"{folder} has no parameter '{name}' (shape {list(shape_of(p))}); the "
                                      f"model differs from the one saved (load_module_strict=False skips it)")
            continue
        if tuple(weights[name].shape) != tuple(shape_of(p)):
            raise CheckpointError(f"parameter '{name}': the checkpoint in {folder} has shape "
                                  f"{list(weights[name].shape)}, this model {list(shape_of(p))}{note}")
    extra = sorted(set(weights) - set(names.values()))
    if check_extra and strict and extra:
        raise CheckpointError(f"{folder} has parameters this model lacks: {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''} (load_module_strict=False ignores them)")
