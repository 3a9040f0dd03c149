"""Any ds_lab checkpoint merged back into one fp32 state_dict, like DeepSpeed's zero_to_fp32 — from any shape.

    global_step{N}/
      mp_rank_{m:02d}_model_states.pt                 model slice m = (stage, tensor rank): module buffers
                                                      (+ parameters below stage 3), the tensor-parallel
                                                      layout, counters, scheduler, client_state
      zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt   data rank d's shard of slice m: fp32 master chunks,
                                                      optimizer state chunks, and the unit layout it used
      layer_{i:02d}-model_states.pt                   (pipeline) layer i, as DeepSpeed writes it

Three merges, one per axis of the grid (runtime/reshard.py):
  data    each shard file says how its rank cut every unit (chunk size, names, shapes): concatenating
          the chunks of all ranks and dropping the padding gives each tensor of the slice whole, whatever
          N or the stage was (`runtime.checkpoint_files.full_tensors_by_name`); stage 0 keeps fp32 masters whole
  model   each model file lists its tensor-parallel parameters [partition_dim, stride, whole size]: the
          T pieces are joined block by block (q|k|v: stride 3) and the vocabulary padding is cut off —
          Megatron layers and AutoTP's Linear/Conv1D shards alike
  pipe    stage parameter names are global layer names, so the stages are put side by side

The result loads with strict=True into the unsharded model: the ds_lab GPT (from GPTTP or a ZeRO run),
the Hugging Face model AutoTP sharded, or a one-stage PipelineModule. Loading a checkpoint at another
shape is the same merge followed by a cut, done by `load_checkpoint` itself: no conversion step.
"""
from __future__ import annotations

import os

from ds_lab.runtime.checkpoint_files import full_tensors_by_name, resolve_tag, verify
from ds_lab.runtime.reshard import consolidated

__all__ = ["consolidate", "full_tensors_by_name"]


def consolidate(checkpoint_dir: str, tag=None) -> dict:
    """One fp32 state_dict of the whole model from a checkpoint of any stage and any (pipe, data, model) shape."""
    tag = resolve_tag(checkpoint_dir, tag)
    if tag is None:
        raise FileNotFoundError(f"no 'latest' file in {checkpoint_dir}; pass tag=")
    folder = os.path.join(checkpoint_dir, tag)
    return consolidated(folder, verify(folder))
