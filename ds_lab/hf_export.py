"""A ds_lab checkpoint (any ZeRO stage, any shape) exported as a Hugging Face model directory.

    from ds_lab.hf_export import export_hf
    export_hf("checkpoints", GPT2Config(...), "gpt2-trained")            # after training, in one process
    model = GPT2LMHeadModel.from_pretrained("gpt2-trained")              # offline: a local directory

This is DeepSpeed's `zero_to_fp32.py` followed by `save_pretrained`: the shards of every rank are merged
by name into one fp32 state_dict (`ds_lab.zero.checkpoint.consolidate`), loaded with strict=True into
the model the config describes, and written in the layout `from_pretrained` reads:

    out_dir/config.json          the model's config (architecture, sizes, dtype)
    out_dir/model.safetensors    the weights, fp32; tied weights (GPT-2's lm_head = wte) stored once
    out_dir/generation_config.json   when the model has one

The checkpoint records the DeepSpeed config, not the model's, so the caller passes the model's config.
A checkpoint of another model is refused by the strict load, which names the missing and unexpected keys.
"""
from __future__ import annotations

import os

import torch

from ds_lab.zero.checkpoint import consolidate

__all__ = ["export_hf", "consolidated_model"]


def consolidated_model(checkpoint_dir: str, model_config, tag=None, model_class=None):
    """The Hugging Face model of `model_config` holding the checkpoint's consolidated fp32 weights.

    model_class: a transformers model class (default: AutoModelForCausalLM picks it from the config)."""
    from transformers import AutoModelForCausalLM

    state = consolidate(checkpoint_dir, tag)
    model = (AutoModelForCausalLM.from_config(model_config) if model_class is None
             else model_class(model_config)).float()  # the checkpoint's weights are fp32: so is the export
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the checkpoint in {checkpoint_dir} does not hold a {type(model).__name__} of this config: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
                         f"pass the config the model was trained with")
    wrong = [f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
             for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"shapes differ from the config ({len(wrong)}): {wrong[:3]}; pass the config the model "
                         f"was trained with")
    # Tied weights (lm_head.weight is transformer.wte.weight) are one tensor in the model: both names
    # must carry the same values, or loading would keep whichever came last without a word.
    by_storage = {}
    for name, tensor in expected.items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    for names in by_storage.values():
        if any(not torch.equal(state[names[0]], state[other]) for other in names[1:]):
            raise ValueError(f"tied parameters {names} differ in the checkpoint")
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_hf(checkpoint_dir: str, model_config, out_dir: str, tag=None, model_class=None) -> str:
    """Write `out_dir` so that `from_pretrained(out_dir)` loads the checkpoint's weights; returns out_dir.

    Run it in one process after training (as zero_to_fp32): it reads every rank's shard from disk."""
    model = consolidated_model(checkpoint_dir, model_config, tag=tag, model_class=model_class)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir
