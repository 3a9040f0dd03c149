"""Checkpoints: DeepSpeed's layout, written atomically, loaded safely.

    save_dir/
      latest                              the newest complete tag (written last)
      global_step{N}/                     one folder per tag
        mp_rank_00_model_states.pt        module, optimizer, master weights, scheduler, scaler,
                                          counters, client_state (data parallel: rank 0 writes)
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt   ZeRO only: rank r's shard (zero/checkpoint.py)
        manifest.json                     every file's size and sha256: its presence means "complete"

Crash safety: each file is written to a temporary name, flushed to disk, then renamed into place
(a rename is atomic). The manifest is written after every file of the tag is in place, and `latest`
after the manifest. A crash at any point leaves either the previous checkpoint as `latest`, or a
tag without a manifest, which `load` refuses ("incomplete"). A file whose size or hash differs
from the manifest (truncated, corrupted) is refused with its name. Every file is read with
`torch.load(weights_only=True)`: a checkpoint can hold tensors and plain data, never code.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

from ds_lab import comm

MODEL_FILE = "mp_rank_00_model_states.pt"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


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


def safe_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot load {path} safely (weights_only=True): {err}") from err


def engine_state(engine) -> dict:
    """What rank 0 writes: the module (buffers only under ZeRO-3, whose parameters live in the
    shards), counters, scheduler, scaler. Stage 0 also keeps the optimizer and fp32 masters here;
    ZeRO keeps them in the per-rank shard files."""
    names = {}
    for name, p in engine.module.named_parameters():
        names.setdefault(p, name)
    module_state = engine.module.state_dict()
    aliases = {key: names[p] for key, p in _state_dict_params(engine.module).items()}
    if engine.zero is not None and engine.zero.stage == 3:
        module_state = {k: v for k, v in module_state.items() if k not in aliases}
    stage0 = engine.zero is None
    return dict(
        module=module_state,
        param_aliases=aliases,
        optimizer=engine.optimizer.state_dict() if stage0 and engine.optimizer is not None else None,
        master_params=[m.detach() for m in engine.master_params] if stage0 else [],
        master_params_by_name={names[p]: m.detach() for p, m in engine.master_of.items()} if stage0 else {},
        lr_scheduler=engine.lr_scheduler.state_dict() if hasattr(engine.lr_scheduler, "state_dict") else None,
        loss_scaler=engine.loss_scaler.state_dict() if engine.loss_scaler else None,
        global_steps=engine.global_steps, global_samples=engine.global_samples,
        micro_steps=engine.micro_steps, skipped_steps=engine.skipped_steps,
        dp_world_size=engine.dp_world_size, zero_stage=0 if stage0 else engine.zero.stage,
        ds_config=engine.config.raw,
    )


def _state_dict_params(module) -> dict:
    """state_dict key -> Parameter, tied weights included under each of their names."""
    out = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name, p in mod._parameters.items():
            if p is not None:
                out[f"{prefix}.{name}" if prefix else name] = p
    return out


def save(engine, save_dir, tag=None, client_state=None, save_latest=True) -> bool:
    """All ranks call this. Rank 0 writes the model states; under ZeRO every rank writes its shard.
    Every rank returns once the whole tag, manifest included, is on disk."""
    from ds_lab.zero.checkpoint import SHARD_FILE

    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    folder = os.path.join(save_dir, tag)
    rank, world = comm.get_rank(), comm.get_world_size()
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(os.path.join(folder, MANIFEST)):
            os.unlink(os.path.join(folder, MANIFEST))  # re-saving a tag: incomplete until done
    if world > 1:
        comm.barrier()
    files = [MODEL_FILE]
    if engine.zero is not None:
        files += [SHARD_FILE.format(r) for r in range(engine.dp_world_size)]
        shard = engine.zero.shard_state()
        atomic_write(os.path.join(folder, SHARD_FILE.format(engine.dp_rank)), lambda f: torch.save(shard, f))
    if rank == 0:
        state = dict(engine_state(engine), client_state=client_state or {})
        atomic_write(os.path.join(folder, MODEL_FILE), lambda f: torch.save(state, f))
    if world > 1:
        comm.barrier()
    if rank == 0:
        write_manifest(folder, files)
        if save_latest:
            atomic_write(os.path.join(save_dir, "latest"), lambda f: f.write(tag.encode()))
    if world > 1:
        comm.barrier()
    return True


def resolve_tag(load_dir, tag):
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        return f.read().strip()


def load(engine, load_dir, tag=None, strict=True, load_optimizer_states=True, load_lr_scheduler_states=True):
    """Returns (load_path, client_state), or (None, None) when there is no checkpoint, as DeepSpeed."""
    tag = resolve_tag(load_dir, tag)
    if tag is None:
        if comm.get_rank() == 0:
            print(f"[ds_lab] no 'latest' file in {load_dir}: nothing loaded")
        return None, None
    folder = os.path.join(load_dir, tag)
    entries = verify(folder)
    state = safe_load(os.path.join(folder, MODEL_FILE))
    saved_stage, stage = state["zero_stage"], 0 if engine.zero is None else engine.zero.stage
    if (saved_stage == 0) != (stage == 0):
        raise CheckpointError(f"{folder} was saved with ZeRO stage {saved_stage}; this engine runs stage "
                              f"{stage}. Load it with a matching stage, or use ds_lab.zero.consolidate()")
    strict = strict and saved_stage != 3  # ZeRO-3 saves no parameters in the module state
    engine.module.load_state_dict(state["module"], strict=strict)
    if engine.zero is not None:
        from ds_lab.zero.checkpoint import shard_files
        shards = [safe_load(os.path.join(folder, f)) for f in shard_files(folder) if f in entries]
        engine.zero.load_shards(shards, load_optimizer_states=load_optimizer_states)
    elif load_optimizer_states and engine.optimizer is not None and state["optimizer"] is not None:
        engine.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for master, saved in zip(engine.master_params, state["master_params"]):
                master.copy_(saved)
    else:  # the fp32 masters must follow the weights just loaded
        with torch.no_grad():
            for p, master in engine.master_of.items():
                master.copy_(p.float())
    if engine.loss_scaler is not None and state["loss_scaler"] is not None:
        engine.loss_scaler.load_state_dict(state["loss_scaler"])
    if load_lr_scheduler_states and engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for key in ("global_steps", "global_samples", "micro_steps", "skipped_steps"):
        setattr(engine, key, state[key])
    return os.path.join(folder, MODEL_FILE), state["client_state"]
