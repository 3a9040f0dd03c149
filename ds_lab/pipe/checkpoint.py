"""Pipeline checkpoints in DeepSpeed's layout: one file per layer, plus the engine's per-stage files.

    global_step{N}/
      layer_{i:02d}-model_states.pt      layer i's state_dict (its own names: "weight", "ln_1.bias", ...),
                                         written by data rank 0 of the stage that holds layer i (a tied
                                         module: under every layer index that uses it)
      mp_rank_{s:02d}_model_states.pt    stage s: what runtime/checkpoint.py keeps (module, optimizer or
      zero_pp_rank_*_optim_states.pt     ZeRO-1 shards, scheduler, scaler, counters, client_state)
      pipeline.json                      how the layers were cut (parts, stages, virtual stages)
      manifest.json                      every file above, sizes and hashes (written last, then `latest`)

Loading at the same cut restores everything (runtime/checkpoint.py). A checkpoint also loads into a
pipeline cut differently (other P, other partition_method, other data-parallel or tensor-parallel
size): a stage's parameter names are its layers' global names ("3.attn.c_attn.weight",
"tied_modules.embed.weight"), so the tensors of every stage and tensor rank are merged whole, by
name, in fp32 (from the mp_rank files' masters or ZeRO shards: exact even when the layers ran in
bf16), and each rank cuts its own (runtime/reshard.py). The ZeRO-1 optimizer state is merged and
cut the same way; stage 0's is kept by parameter index per stage, so from or to stage 0 loading
asks for `load_optimizer_states=False` (or `load_module_only=True`) there, and says so.
Layer files hold the module's own dtype (bf16 weights in bf16, as DeepSpeed's); with tensor
parallelism each model rank t writes `layer_{i:02d}-model_{t:02d}-model_states.pt`, its shard.
"""
from __future__ import annotations

import json
import os
import re

import torch

from ds_lab import comm
from ds_lab.pipe.module import TiedLayerSpec
from ds_lab.runtime import checkpoint


PIPELINE_FILE = "pipeline.json"  # how the layers were cut: {"parts", "num_stages", "virtual_stages", "model"}


def pipeline_layout(engine) -> dict:
    module = engine.module
    return dict(parts=list(module.parts), num_stages=module.num_stages, virtual_stages=module.virtual_stages,
                model=engine.grid.size("model"))


def layer_file(index: int, grid=None) -> str:
    """DeepSpeed's names; with tensor parallelism each model rank keeps its own shard of the layer."""
    if grid is not None and grid.size("model") > 1:
        return f"layer_{index:02d}-model_{grid.rank_in('model'):02d}-model_states.pt"
    return f"layer_{index:02d}-model_states.pt"


def local_layers(module) -> dict:
    """{layer index: (the module holding its weights, its parameter-name prefix in the stage module)}."""
    out = {}
    for chunk in module.local_chunks:
        for index in range(module.parts[chunk], module.parts[chunk + 1]):
            spec = module.layer_specs[index]
            if isinstance(spec, TiedLayerSpec):
                out[index] = (module.tied_modules[spec.key], f"tied_modules.{spec.key}.")
            elif str(index) in module._modules:
                out[index] = (module._modules[str(index)], f"{index}.")
    return out


def save(engine, save_dir, tag=None, client_state=None, save_latest=True) -> bool:
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    folder = os.path.join(save_dir, tag)
    os.makedirs(folder, exist_ok=True)
    if engine.dp_rank == 0:
        for index, (layer, _) in local_layers(engine.module).items():
            state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
            path = os.path.join(folder, layer_file(index, engine.grid))
            checkpoint.atomic_write(path, lambda f, s=state: torch.save(s, f))
    checkpoint.save(engine, save_dir, tag=tag, client_state=client_state, save_latest=False)
    if comm.get_rank() == 0:  # the manifest again, now naming the layer files too; then `latest`
        layout = json.dumps(pipeline_layout(engine)).encode()
        checkpoint.atomic_write(os.path.join(folder, PIPELINE_FILE), lambda f: f.write(layout))
        with open(os.path.join(folder, checkpoint.MANIFEST)) as f:
            files = list(json.load(f))
        files += [PIPELINE_FILE] + sorted(f for f in os.listdir(folder) if re.fullmatch(r"layer_\d+-.*\.pt", f))
        checkpoint.write_manifest(folder, files)
        if save_latest:
            checkpoint.atomic_write(os.path.join(save_dir, "latest"), lambda f: f.write(tag.encode()))
    if comm.get_world_size() > 1:
        comm.barrier()
    return True


def load(engine, load_dir, tag=None, strict=True, load_optimizer_states=True, load_lr_scheduler_states=True,
         load_module_only=False):
    tag = checkpoint.resolve_tag(load_dir, tag)
    if tag is None:
        return checkpoint.load(engine, load_dir)  # says "nothing loaded", returns (None, None)
    folder = os.path.join(load_dir, tag)
    entries = checkpoint.verify(folder)
    layout = {}
    if PIPELINE_FILE in entries:
        with open(os.path.join(folder, PIPELINE_FILE)) as f:
            layout = json.load(f)
    # the same cut: every file of this stage fits as saved; cut differently: merged by name, cut again
    return checkpoint.load(engine, load_dir, tag=tag, strict=strict, load_optimizer_states=load_optimizer_states,
                           load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                           reshape=layout != pipeline_layout(engine))
