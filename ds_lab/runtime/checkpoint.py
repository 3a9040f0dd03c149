"""Checkpoints: DeepSpeed's layout, keyed by the process grid, written atomically, loaded safely.

    save_dir/
      latest                              the newest complete tag (written last)
      global_step{N}/                     one folder per tag
        mp_rank_{m:02d}_model_states.pt   model slice m (pipe x model rank): module, scheduler, scaler,
                                          counters, client_state, and what the mode keeps whole
                                          (stage 0: optimizer and fp32 masters); data rank 0 writes it
        zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt   ZeRO: data rank d's shard of slice m
        manifest.json                     every file's size and sha256: its presence means "complete"

Each model file also records the grid it was saved at (`grid`: pipe, data, model) and, for every
tensor-parallel parameter, [partition_dim, partition_stride, whole size] (`tensor_parallel`).

Loading goes by parameter *name*: the weights are merged into whole fp32 tensors (from the shards,
the fp32 masters, or the module), every name and shape is checked against the model, and the mode
cuts what it keeps. So any ZeRO stage and any data-parallel size loads any other's checkpoint (the
optimizer state too when both keep it alike: stage 0 with stage 0, ZeRO 1-3 with each other).
At another model-parallel shape (pipe x model) the tensors of *all* model files are merged and cut
again for this rank (reshard.py): the weights load exactly; the optimizer state follows from ZeRO
1-3 to ZeRO 1-3 (merged by name like the weights); stage 0's, kept by parameter index per slice, is
refused there (load_optimizer_states=False says "weights only").

Crash safety: each file is written to a temporary name, flushed to disk, then renamed into place
(a rename is atomic). The manifest is written after every file of the tag is in place, and `latest`
after the manifest. A crash at any point leaves either the previous checkpoint as `latest`, or a
tag without a manifest, which `load` refuses ("incomplete"). A file whose size or hash differs
from the manifest (truncated, corrupted) is refused with its name. Every file is read with
`torch.load(weights_only=True)`: a checkpoint can hold tensors and plain data, never code.
File names, the manifest and the merge by name live in checkpoint_files.py.

Also DeepSpeed's: save(exclude_frozen_parameters=True) leaves requires_grad=False parameters out of
the module state (loading it then needs strict=False); load(custom_load_fn=fn) calls
fn(src=saved module state dict, dst=module) instead of loading the module; save_16bit_model writes
one plain state dict in the training dtype (ZeRO-3: gathered, when the config asks for it).
"""
from __future__ import annotations

import os

import torch

from ds_lab import comm
from ds_lab.runtime import reshard
from ds_lab.runtime.checkpoint_files import (MANIFEST, MODEL_FILE, atomic_write, check_names_and_shapes,  # noqa: F401
                                             full_tensors_by_name,
                                             model_file, param_names, resolve_tag, saved_weights, shard_file,
                                             shard_files, state_dict_params, verify, write_manifest)
from ds_lab.runtime.safe_load import CheckpointError, safe_load  # noqa: F401


def module_state(module, exclude_frozen_parameters=False) -> dict:
    """module.state_dict(), less the parameters with requires_grad=False when asked (DeepSpeed's
    module_state_dict(exclude_frozen_parameters=True))."""
    params = state_dict_params(module)
    frozen = {k for k, p in params.items() if not p.requires_grad} if exclude_frozen_parameters else set()
    return {k: v for k, v in module.state_dict().items() if k not in frozen}


def engine_state(engine, exclude_frozen_parameters=False) -> dict:
    """What data-parallel rank 0 of each model slice writes: the module's buffers and (unless the
    mode partitions them) parameters, counters, scheduler, scaler, and what the mode keeps there."""
    names = param_names(engine.module)
    aliases = {key: names[p] for key, p in state_dict_params(engine.module).items()}
    module_state_ = {k: v for k, v in module_state(engine.module, exclude_frozen_parameters).items()
                     if k not in aliases or not engine.mode.partitions_parameters}
    return dict(
        module=module_state_,
        param_aliases=aliases,
        mode=engine.mode.model_state(names),
        lr_scheduler=engine.lr_scheduler.state_dict() if hasattr(engine.lr_scheduler, "state_dict") else None,
        loss_scaler=engine.loss_scaler.state_dict() if engine.loss_scaler else None,
        global_steps=engine.global_steps, global_samples=engine.global_samples,
        micro_steps=engine.micro_steps, skipped_steps=engine.skipped_steps,
        dp_world_size=engine.dp_world_size, mp_world_size=engine.grid.mp_world_size,
        grid={axis: engine.grid.size(axis) for axis in ("pipe", "data", "model")},
        tensor_parallel=reshard.tensor_parallel_layout(engine.module, names, engine.grid.size("model")),
        zero_stage=engine.mode.stage, ds_config=engine.config.raw,
    )


def save(engine, save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False) -> bool:
    """All ranks call this. Data-parallel rank 0 of every model slice writes that slice's model
    states; a mode that partitions state has every rank write its shard. Every rank returns once
    the whole tag, manifest included, is on disk."""
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    folder = os.path.join(save_dir, tag)
    grid, rank, world = engine.grid, comm.get_rank(), comm.get_world_size()
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(os.path.join(folder, MANIFEST)):
            os.unlink(os.path.join(folder, MANIFEST))  # re-saving a tag: incomplete until done
    if world > 1:
        comm.barrier()
    shard = engine.mode.shard_state()
    if shard is not None:
        path = os.path.join(folder, shard_file(engine.dp_rank, grid.mp_rank))
        atomic_write(path, lambda f: torch.save(shard, f))
    if engine.dp_rank == 0:
        state = dict(engine_state(engine, exclude_frozen_parameters), client_state=client_state or {})
        atomic_write(os.path.join(folder, model_file(grid.mp_rank)), lambda f: torch.save(state, f))
    if world > 1:
        comm.barrier()
    if rank == 0:
        slices = range(grid.mp_world_size)
        files = [model_file(mp) for mp in slices]
        if shard is not None:
            files += [shard_file(dp, mp) for mp in slices for dp in range(engine.dp_world_size)]
        write_manifest(folder, files)
        if save_latest:
            atomic_write(os.path.join(save_dir, "latest"), lambda f: f.write(tag.encode()))
    if world > 1:
        comm.barrier()
    return True


def check_shapes(module, weights: dict, folder: str, strict: bool) -> None:
    """Every parameter of the model is in the checkpoint with its (local) shape; say which one is not."""
    from ds_lab.runtime.mode import param_shape
    check_names_and_shapes(param_names(module), weights, folder, strict, param_shape)


def load(engine, load_dir, tag=None, strict=True, load_optimizer_states=True, load_lr_scheduler_states=True,
         load_module_only=False, reshape=False, custom_load_fn=None):
    """Returns (load_path, client_state), or (None, None) when there is no checkpoint, as DeepSpeed.

    Any mode loads any other mode's weights, at any data-parallel size (partitioned weights are
    merged by name, then cut for this engine). Optimizer state follows when the saved mode keeps it
    the same way (stage 0 with stage 0; ZeRO 1-3 with each other, resharded).
    At another model-parallel shape (pipe x model), or with reshape=True (a pipeline cut
    differently), the weights are merged whole from every file and cut again (reshard.py); the
    optimizer state follows from ZeRO 1-3 to ZeRO 1-3, and is refused otherwise.
    custom_load_fn(src=the saved module state dict, dst=engine.module) loads the module instead; the
    mode then takes the module's values (ZeRO-3's module holds only chunks: refused there)."""
    tag = resolve_tag(load_dir, tag)
    if tag is None:
        if comm.get_rank() == 0:
            print(f"[ds_lab] no 'latest' file in {load_dir}: nothing loaded")
        return None, None
    folder = os.path.join(load_dir, tag)
    entries = verify(folder)
    if model_file(0) not in entries:
        raise CheckpointError(f"{folder} has no {model_file(0)}: it is not a ds_lab checkpoint")
    first = safe_load(os.path.join(folder, model_file(0)))
    saved, grid = reshard.saved_shape(first), engine.grid
    here = dict(pipe=grid.size("pipe"), model=grid.size("model"))
    optimizer_states = load_optimizer_states and not load_module_only
    if custom_load_fn is not None and (engine.mode.partitions_parameters or reshape
                                       or (saved["pipe"], saved["model"]) != (here["pipe"], here["model"])):
        raise CheckpointError("custom_load_fn needs the whole parameters in the module at the saved "
                              "model-parallel shape; ZeRO-3 keeps only chunks there: load at ZeRO stage 0-2, "
                              "or without custom_load_fn")
    if reshape or (saved["pipe"], saved["model"]) != (here["pipe"], here["model"]):
        path, state = os.path.join(folder, model_file(0)), first
        _load_reshaped(engine, folder, entries, first, strict, optimizer_states)
    else:
        path = os.path.join(folder, model_file(grid.mp_rank))
        state = first if grid.mp_rank == 0 else safe_load(path)
        _load_same_shape(engine, folder, entries, state, strict, optimizer_states, custom_load_fn)
    if load_module_only:  # DeepSpeed: the module only; counters, scheduler and scaler stay as they are
        return path, state["client_state"]
    if engine.loss_scaler is not None and state["loss_scaler"] is not None:
        engine.loss_scaler.load_state_dict(state["loss_scaler"])
    if load_lr_scheduler_states and engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for key in ("global_steps", "global_samples", "micro_steps", "skipped_steps"):
        setattr(engine, key, state[key])
    return path, state["client_state"]


def _load_same_shape(engine, folder, entries, state, strict, optimizer_states, custom_load_fn=None) -> None:
    """The same pipe x model slices: this slice's own files (any data-parallel size, any stage)."""
    mp_rank = engine.grid.mp_rank
    shards = [safe_load(os.path.join(folder, f)) for f in shard_files(folder, mp_rank) if f in entries]
    weights = saved_weights(state, shards)
    names = param_names(engine.module)
    if custom_load_fn is not None:  # the caller loads the module; the masters follow what it loaded
        src = dict(state["module"])
        src.update((key, weights[name]) for key, name in state["param_aliases"].items()
                   if key not in src and name in weights)
        custom_load_fn(src=src, dst=engine.module)
        weights = {name: p.detach().float() for p, name in names.items()}
    else:
        check_shapes(engine.module, weights, folder, strict)
        buffers = {k: v for k, v in state["module"].items() if k not in state["param_aliases"]}
        missing = engine.module.load_state_dict(buffers, strict=False)
        if strict and missing.unexpected_keys:
            raise CheckpointError(f"{folder} has buffers this model lacks: {missing.unexpected_keys}")
    same_kind = (state["zero_stage"] == 0) == (engine.mode.stage == 0)
    if optimizer_states and not same_kind:
        raise CheckpointError(f"{folder} was saved at ZeRO stage {state['zero_stage']}; this engine runs stage "
                              f"{engine.mode.stage}, whose optimizer state is laid out differently. Pass "
                              f"load_optimizer_states=False to load the weights only")
    engine.mode.load(weights, state.get("mode") or {}, shards if optimizer_states else [], names,
                     load_optimizer_states=optimizer_states)


def _load_reshaped(engine, folder, entries, first, strict, optimizer_states) -> None:
    """Another pipe x model shape: every parameter merged whole from all files, checked against the
    unsharded shapes, this rank's tensor-parallel piece cut, then the mode's cut. The optimizer
    state too, ZeRO to ZeRO (reshard.zero_optimizer_shard); otherwise it is refused."""
    files = reshard.read_all(folder, entries, first)
    merged = reshard.whole_state(folder, entries, files=files)
    whole_model = engine.grid.size("pipe") == 1 and merged["shape"]["pipe"] == 1
    weights = reshard.local_weights(engine.module, merged["weights"], folder, strict, whole_model, engine.grid)
    names = param_names(engine.module)
    shards = [reshard.zero_optimizer_shard(files, engine.mode, names, engine.grid, folder)] if optimizer_states else []
    own = set(engine.module.state_dict().keys())
    engine.module.load_state_dict({k: v for k, v in merged["buffers"].items() if k in own}, strict=False)
    engine.mode.load(weights, {}, shards, names, load_optimizer_states=optimizer_states)


def save_16bit_model(engine, save_dir, save_filename="pytorch_model.bin", exclude_frozen_parameters=False) -> bool:
    """The module's state dict in its training dtype, written atomically by rank 0; every rank calls it
    and returns once the file is there. ZeRO-3 keeps only chunks in the module: the whole weights are
    gathered (a collective) only with stage3_gather_16bit_weights_on_model_save, else nothing is
    written and it returns False, as DeepSpeed does."""
    path = os.path.join(save_dir, save_filename)
    if engine.grid.mp_world_size > 1:
        raise CheckpointError("save_16bit_model with pipeline or tensor parallelism is not supported by ds_lab "
                              "(each rank holds a slice of the model); use save_checkpoint")
    if engine.mode.partitions_parameters:
        if not engine.zero_gather_16bit_weights_on_model_save():
            if comm.get_rank() == 0:
                print(f"[ds_lab] did not save the model {path} because "
                      f"stage3_gather_16bit_weights_on_model_save is False")
            return False
        whole = engine.mode.full_state_dict()  # fp32, gathered from the masters (the params are their cast)
        params, cast, state = state_dict_params(engine.module), {}, {}
        for key, p in params.items():
            if p.requires_grad or not exclude_frozen_parameters:
                state[key] = cast.setdefault(p, whole[key].to(p.dtype))  # tied weights: one tensor
        state.update((k, v) for k, v in engine.module.state_dict().items() if k not in params)  # buffers
    else:
        state = module_state(engine.module, exclude_frozen_parameters)
    if comm.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        on_host = {}  # keyed by storage, so that tied weights stay one tensor in the file
        state = {k: on_host.setdefault((v.data_ptr(), v.dtype, tuple(v.shape)), v.detach().cpu())
                 for k, v in state.items()}
        atomic_write(path, lambda f: torch.save(state, f))
    if comm.get_world_size() > 1:
        comm.barrier()
    return True
