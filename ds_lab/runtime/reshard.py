"""Resharding: a checkpoint saved at one (pipe, data, model) shape, read back at any other.

DeepSpeed's answer is an offline conversion (its "universal checkpoint"). ds_lab does it on load,
because every file already says how it was cut:

    data axis    each ZeRO shard file lists its units (chunk, names, shapes): concatenating the
                 chunks of all data ranks gives each tensor of that model slice whole
                 (`checkpoint.full_tensors_by_name`); stage 0 keeps whole fp32 masters instead
    model axis   each model file lists its tensor-parallel parameters with (partition_dim,
                 partition_stride, whole size along that dim): the T pieces of a parameter are
                 joined as `gather_parameter` joins them — of each of the `stride` stacked blocks
                 (q|k|v: 3), piece 0 .. T-1 — and the vocabulary padding is cut off
    pipe axis    a stage's parameter names are its layers' global names ("3.attn.c_attn.weight",
                 "tied_modules.embed.weight"), so the stages' tensors are just put side by side

So `whole_state(folder)` is the model's every parameter, whole, in fp32, by name — the same thing
`ds_lab.zero.consolidate` returns — and loading at another shape is cutting it again (`cut`): a
tensor-parallel parameter takes its chunk along partition_dim (padding the vocabulary up to a
multiple of the new T), then the engine's mode cuts its ZeRO chunk as on every load.

The optimizer state goes the same way when it is kept per element in ZeRO shards (Adam's moments,
SGD's momentum): each slot is merged whole by name, cut for this rank, and handed to the ZeRO mode
as one shard laid out in its own units (`zero_optimizer_shard`). Stage 0 keeps the torch
optimizer's state by parameter *index* within its slice, which does not survive another cut: from
or to stage 0, a pipe x model change loads the weights only (load_optimizer_states=False) and the
refusal says so. Every rank reads every file: simple, and fine at this library's sizes (a large
model would read only the files its new piece overlaps).
"""
from __future__ import annotations

import os

import torch

from ds_lab.runtime.safe_load import CheckpointError, safe_load


def tensor_parallel_layout(module, names: dict, ranks: int) -> dict:
    """{parameter name: [partition_dim, partition_stride, whole size along that dim]} for every
    tensor-parallel shard of `module`, split over `ranks` (what a model file needs to be joined)."""
    from ds_lab.runtime.mode import is_model_parallel
    layout = {}
    for p, name in names.items():
        if is_model_parallel(p):
            dim = int(p.partition_dim)
            layout[name] = [dim, int(getattr(p, "partition_stride", 1)), whole_shape(p, ranks)[dim]]
    return layout


def whole_shape(p, ranks: int) -> tuple:
    """The shape of parameter `p` unsharded: its local shape, the partition dim times `ranks` (T),
    less the vocabulary padding. A replicated parameter's shape is already whole."""
    from ds_lab.runtime.mode import is_model_parallel, param_shape
    shape = list(param_shape(p))
    if is_model_parallel(p):
        dim = p.partition_dim
        shape[dim] = getattr(p, "unpadded_size", None) or shape[dim] * ranks
    return tuple(shape)


def join(pieces: list, dim: int, stride: int, size: int) -> torch.Tensor:
    """The whole tensor from its tensor ranks' pieces (rank order): block j of the whole is the
    j-th of `stride` blocks of every piece, side by side; then the padding beyond `size` is dropped."""
    blocks = [torch.cat([p.chunk(stride, dim=dim)[j] for p in pieces], dim=dim) for j in range(stride)]
    return torch.cat(blocks, dim=dim).narrow(dim, 0, size)


def cut(whole: torch.Tensor, dim: int, stride: int, rank: int, ranks: int, local: int) -> torch.Tensor:
    """Tensor rank `rank`'s piece (of `ranks`) of a whole tensor: `local` entries along `dim`.
    A whole size below local x ranks is the vocabulary padding: zero rows appended first."""
    pad = local * ranks - whole.shape[dim]
    if pad < 0 or (pad and stride != 1):
        raise CheckpointError(f"cannot cut {whole.shape[dim]} entries along dim {dim} (stride {stride}) into "
                              f"{ranks} pieces of {local}")
    if pad:
        shape = list(whole.shape)
        shape[dim] = pad
        whole = torch.cat([whole, whole.new_zeros(shape)], dim=dim)
    blocks = whole.chunk(stride, dim=dim)
    return torch.cat([b.chunk(ranks, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def saved_shape(state: dict) -> dict:
    """The (pipe, data, model) shape a model file was saved at (older files: no pipe, no model axis)."""
    grid = state.get("grid")
    if grid:
        return dict(grid)
    return dict(pipe=1, data=state.get("dp_world_size", 1), model=state.get("mp_world_size", 1))


def read_all(folder: str, entries: dict, first: dict = None) -> dict:
    """Every model file and ZeRO shard of a tag, by pipeline stage and tensor rank:
    dict(shape, first, slices=[[(model state, [shards]) for each tensor rank] for each stage])."""
    from ds_lab.runtime.checkpoint_files import model_file, shard_files
    first = first if first is not None else safe_load(os.path.join(folder, model_file(0)))
    shape, slices = saved_shape(first), []
    for stage in range(shape["pipe"]):
        slices.append([])
        for t in range(shape["model"]):
            mp = stage * shape["model"] + t
            if model_file(mp) not in entries:
                raise CheckpointError(f"{folder} has no {model_file(mp)}: it was saved at pipe {shape['pipe']} x "
                                      f"model {shape['model']}, so it needs that file to be whole")
            state = first if mp == 0 else safe_load(os.path.join(folder, model_file(mp)))
            shards = [safe_load(os.path.join(folder, f)) for f in shard_files(folder, mp) if f in entries]
            slices[-1].append((state, shards))
    return dict(shape=shape, first=first, slices=slices)


def merge(files: dict, local) -> dict:
    """One whole fp32 tensor per parameter name: `local(model state, shards)` gives a model slice's
    tensors by name (its data ranks already merged); the tensor ranks' pieces are joined by the
    slice's tensor-parallel layout; the stages are put side by side."""
    out = {}
    for stage in files["slices"]:
        pieces = [local(state, shards) for state, shards in stage]
        layout = stage[0][0].get("tensor_parallel") or {}
        for name, value in pieces[0].items():
            if name not in layout:  # replicated over the model axis: every tensor rank holds the same
                out[name] = value
                continue
            if any(name not in p for p in pieces):
                raise CheckpointError(f"parameter '{name}' is missing from a tensor rank's files")
            dim, stride, size = layout[name]
            out[name] = join([p[name] for p in pieces], dim, stride, size)
    return out


def whole_state(folder: str, entries: dict, first: dict = None, files: dict = None) -> dict:
    """Every parameter whole in fp32 by name, the buffers by state_dict key, and the aliases
    (state_dict key -> parameter name: tied weights), merged from every file of the tag.

    Returns dict(weights, buffers, aliases, shape). entries: the tag's verified manifest."""
    from ds_lab.runtime.checkpoint_files import saved_weights
    files = files or read_all(folder, entries, first)
    buffers, aliases = {}, {}
    for stage in files["slices"]:
        state = stage[0][0]
        aliases.update(state["param_aliases"])
        buffers.update((k, v) for k, v in state["module"].items() if k not in state["param_aliases"])
    return dict(weights=merge(files, saved_weights), buffers=buffers, aliases=aliases, shape=files["shape"])


def local_piece(p, whole: torch.Tensor, grid) -> torch.Tensor:
    """This rank's piece of parameter `p`'s whole tensor: its tensor-parallel chunk, or all of it."""
    from ds_lab.runtime.mode import is_model_parallel, param_shape
    if not is_model_parallel(p):
        return whole
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
    return cut(whole, dim, stride, grid.rank_in("model"), grid.size("model"), param_shape(p)[dim])


def local_weights(module, whole: dict, folder: str, strict: bool, whole_model: bool, grid) -> dict:
    """This rank's piece of every parameter of `module`, cut from the whole tensors, after checking
    each name and whole shape. whole_model: `module` is the whole model (no pipeline stages), so a
    checkpoint parameter it lacks is an error too (strict). grid: the engine's (its model axis)."""
    from ds_lab.runtime.checkpoint_files import check_names_and_shapes, param_names
    names, ranks = param_names(module), grid.size("model")
    check_names_and_shapes(names, whole, folder, strict, lambda p: whole_shape(p, ranks),
                           check_extra=whole_model, note=" (unsharded)")
    return {name: local_piece(p, whole[name], grid) for p, name in names.items() if name in whole}


def zero_optimizer_shard(files: dict, mode, names: dict, grid, folder: str) -> dict:
    """The saved ZeRO optimizer state, resharded for this rank: every per-element slot (Adam's
    exp_avg / exp_avg_sq, SGD's momentum_buffer) merged whole by name like the weights, cut to this
    rank's tensor-parallel piece, and laid out as one shard file of this engine's units (as if saved
    by a single data rank), which the mode's own `load` then cuts into its ZeRO chunks."""
    from ds_lab.runtime.checkpoint_files import full_tensors_by_name
    if not hasattr(mode, "units") or any(not shards for stage in files["slices"] for _, shards in stage):
        was, now = files["shape"], dict(pipe=grid.size("pipe"), model=grid.size("model"))
        raise CheckpointError(f"{folder} was saved at pipe {was['pipe']} x model {was['model']}, ZeRO stage "
                              f"{files['first']['zero_stage']}; this engine runs pipe {now['pipe']} x model "
                              f"{now['model']} (or cut differently), stage {mode.stage}. The weights load at any "
                              f"shape; the optimizer state crosses a pipe x model change only from ZeRO 1-3 to "
                              f"ZeRO 1-3 (stage 0 keeps it by parameter index, per slice): pass "
                              f"load_optimizer_states=False")
    saved = files["slices"][0][0][1][0]["optimizer"]
    if len(saved["param_groups"]) != len(mode.optimizer.param_groups):
        raise CheckpointError(f"{folder}: the saved optimizer has {len(saved['param_groups'])} param groups, this "
                              f"one {len(mode.optimizer.param_groups)}; pass load_optimizer_states=False")
    slots = sorted({slot for group in saved["state"].values() for slot, v in group.items()
                    if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() > 1})
    params = {name: p for p, name in names.items()}
    local = {}
    for slot in slots:
        whole = merge(files, lambda state, shards, slot=slot: full_tensors_by_name(shards, ("optimizer", slot)))
        local[slot] = {name: local_piece(params[name], t, grid) for name, t in whole.items() if name in params}
    units = [dict(group=u.group, chunk=u.numel, numel=u.numel, names=[names[p] for p in u.params],
                  shapes=[list(sh) for sh in u.shapes]) for u in mode.units]
    state = {}
    for g in range(len(saved["param_groups"])):
        members = [n for u in units if u["group"] == g for n in u["names"]]
        scalars = saved["state"].get(g) or next(iter(saved["state"].values()), {})
        state[g] = {k: v for k, v in scalars.items() if k not in slots}
        for slot in slots:
            if members and all(n in local[slot] for n in members):
                state[g][slot] = torch.cat([local[slot][n].reshape(-1) for n in members])
    return dict(stage=mode.stage, world_size=1, rank=0, units=units, masters=[],
                optimizer=dict(state=state, param_groups=saved["param_groups"]))


def consolidated(folder: str, entries: dict) -> dict:
    """One fp32 state_dict of the whole (unsharded) model: buffers and parameters, tied weights under
    each of their keys."""
    merged = whole_state(folder, entries)
    state = {k: v.float() if v.is_floating_point() else v for k, v in merged["buffers"].items()}
    for key, name in merged["aliases"].items():
        if name in merged["weights"]:
            state[key] = merged["weights"][name]
    return state
