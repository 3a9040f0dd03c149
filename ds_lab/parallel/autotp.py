"""AutoTP: tensor-parallel training of a model you did not write (DeepSpeed's `tensor_parallel` config).

    config = {"train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"autotp_size": 2}}
    engine, *_ = ds_lab.initialize(model=GPT2LMHeadModel(GPT2Config(...)), optimizer=opt, config=config)

The idea: a transformer block is two column -> row pairs (Megatron). AutoTP finds them by name in a
model built as usual on every rank (same seed, same weights) and swaps each projection for its shard:

    attention   q|k|v (fused: stride 3, or q_proj/k_proj/v_proj)  column     out-projection   row
    MLP         up (c_fc, up_proj, gate_proj)                      column     down (c_proj, down_proj)  row

so each block costs 2 all-reduces of b*s*h forward and 2 backward (tags in mappings.py; separate
q/k/v or gate/up projections enter the region once, like Megatron's fused ones). The attention
module then runs on its n_head/T local heads: its head/width attributes (num_heads, split_size,
embed_dim, ...) are divided by T, as DeepSpeed's `update_mp_params` does. Where the plan comes from,
as in DeepSpeed 0.19: a Hugging Face model's own `tp_plan` (Llama: q/k/v/gate/up colwise, o/down
rowwise, lm_head colwise with gathered output unless tied), else the name rules above; embeddings,
LayerNorms and (outside a tp_plan) the LM head stay replicated, so every tensor rank computes the loss.

Beyond DeepSpeed 0.19.8 (which refuses GPT-2: "AutoTP not supported for model"), HF `Conv1D`
projections are sharded too, keeping their [in, out] layout (column: dim 1, row: dim 0), so the
gathered state_dict loads into the unsharded model. Sharded layers keep the *same Parameter objects*
(DeepSpeed swaps `param.data` the same way): an optimizer built over `model.parameters()` before
`initialize` now steps the shards. Attention-probability dropout on a rank's heads draws the whole
[b, n_head, s, s] mask and keeps its heads, so the random stream, and every later dropout, is the one
process's: equal to one process on the CPU. Heads that T does not divide are refused.

Tensor partners are consecutive ranks (the grid's model axis) and must see the same micro-batch: the
first forward compares a fingerprint of the inputs over the tensor group (DeepSpeed checks it too).
The batch rule counts data-parallel ranks only: train_batch = micro x accumulation x world / T.
`tp_model_init(model, tp_size, dtype)` (DeepSpeed's name) shards before `initialize` instead.

Files: this one (plan + swap), autotp_layers.py (Conv1D shards, shared-input columns, local heads).
"""
from __future__ import annotations

import json
import os
import re
import sys

import torch.nn as nn

from ds_lab import comm
from ds_lab.parallel.autotp_layers import (Conv1DParallel, SharedInputColumn, SharedRegion,
                                           install_local_heads_attention, is_conv1d, keep_parameter_identity)
from ds_lab.parallel.layers import ColumnParallelLinear, RowParallelLinear
from ds_lab.parallel.state import model_parallel_group, model_parallel_world_size

# child name -> stride of a column-parallel projection (a fused q|k|v is 3 blocks, gate|up 2)
COLUMN = {"c_attn": 3, "query_key_value": 3, "qkv_proj": 3, "Wqkv": 3, "gate_up_proj": 2,
          "q_proj": 1, "k_proj": 1, "v_proj": 1, "query": 1, "key": 1, "value": 1,
          "c_fc": 1, "up_proj": 1, "gate_proj": 1, "fc1": 1, "fc_in": 1, "w1": 1, "w3": 1, "dense_h_to_4h": 1}
ROW = {"c_proj", "o_proj", "out_proj", "down_proj", "fc2", "fc_out", "w2", "dense_4h_to_h"}
HEAD_COUNTS = ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "num_kv_heads", "n_heads")
HF_STYLES = {"colwise": "column", "rowwise": "row", "colwise_rep": "column_gather",
             "colwise_gather_output": "column_gather"}


def autotp_size_of(config) -> int:
    """`tensor_parallel.autotp_size` of a config as `initialize` receives it (dict, JSON path or
    DeepSpeedConfig), read before the config is validated: the grid must exist first (batch rule)."""
    raw = getattr(config, "raw", config)
    if isinstance(raw, (str, os.PathLike)):
        try:
            with open(raw, encoding="utf-8") as file:
                raw = json.load(file)
        except (OSError, ValueError):
            return 0  # the config parser reports it properly
    section = raw.get("tensor_parallel") if isinstance(raw, dict) else None
    size = section.get("autotp_size", 0) if isinstance(section, dict) else 0
    return size if isinstance(size, int) and not isinstance(size, bool) else 0


def tp_model_init(model: nn.Module, tp_size: int, dtype=None, config=None, **kwargs) -> nn.Module:
    """DeepSpeed's `deepspeed.tp_model_init(model, tp_size, dtype)`: shard `model` over a tensor
    group of `tp_size` now (builds the grid if none is set up); `initialize` then leaves it as is.
    (DeepSpeed >= 0.18 only records the arguments and shards inside `initialize`; the result is the same.)"""
    import torch
    from ds_lab.comm.topology import get_grid
    from ds_lab.parallel.state import initialize_model_parallel
    if kwargs:
        raise TypeError(f"tp_model_init: ds_lab does not support {sorted(kwargs)}; it takes the tensor group "
                        f"from the grid (ds_lab.parallel.initialize_model_parallel)")
    if dtype not in (None, torch.float32):
        raise ValueError(f"tp_model_init: dtype {dtype} is not supported; keep the model in float32 and set "
                         f"'bf16' or 'fp16' in the config (the engine keeps fp32 masters)")
    grid = get_grid()
    if grid is None or grid.world_size != comm.get_world_size():
        initialize_model_parallel(tensor_model_parallel_size=tp_size)
    return apply_autotp(model, tp_size)


def apply_autotp(model: nn.Module, tp_size: int) -> nn.Module:
    """Shard `model`'s attention and MLP projections in place over the current tensor group (size
    `tp_size`), column then row. Every rank must call it with the same model (a collective's order)."""
    if getattr(model, "ds_autotp_parsed", False):
        if getattr(model, "ds_autotp_size", tp_size) != tp_size:
            raise ValueError(f"the model was already sharded over {model.ds_autotp_size} tensor ranks, "
                             f"but tensor_parallel.autotp_size is {tp_size}; make them agree")
        return model
    pipe = sys.modules.get("ds_lab.pipe")
    if pipe is not None and isinstance(model, pipe.PipelineModule):
        raise ValueError("AutoTP (tensor_parallel.autotp_size) with a PipelineModule is not supported; build the "
                         "stages' layers from ds_lab.parallel (ColumnParallelLinear, RowParallelLinear) instead")
    if model_parallel_world_size() != tp_size:
        raise ValueError(f"tensor_parallel.autotp_size {tp_size} differs from the grid's tensor-parallel size "
                         f"{model_parallel_world_size()} (an mpu or initialize_model_parallel set it); make them agree")
    _check_heads(model, tp_size)
    plan = _hf_plan(model) or _name_plan(model)
    if not plan:
        raise ValueError(f"AutoTP found no attention/MLP projections to shard in {type(model).__name__}: it looks "
                         f"for Linear/Conv1D children named {sorted(COLUMN)} (column) and {sorted(ROW)} (row), or a "
                         f"Hugging Face tp_plan; rename them, or build the model from ds_lab.parallel layers")
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # modules with several column Linears on one input (q/k/v, gate/up): they enter the region once
    columns = [name for name, parent, child, style, _ in plan
               if style == "column" and isinstance(getattr(parent, child), nn.Linear)]
    owners = {name: parent for name, parent, *_ in plan}
    regions = {name: SharedRegion(parent) for name, parent in owners.items() if columns.count(name) > 1}
    parents = {}
    for parent_name, parent, child_name, style, stride in plan:
        child = getattr(parent, child_name)
        if style == "column_gather" and id(child.weight) in tied:
            continue  # DeepSpeed: a gathered head tied to the embedding stays replicated, with it
        setattr(parent, child_name, _shard(child, style, stride, regions.get(parent_name)))
        if style == "column":
            parents[parent_name] = parent
    for name, parent in parents.items():
        _localize_attributes(parent, name, tp_size)
        if "Attention" in type(parent).__name__:
            install_local_heads_attention(parent, tp_size)
    model.ds_autotp_parsed, model.ds_autotp_size = True, tp_size
    model.register_forward_pre_hook(_check_inputs_once, with_kwargs=True)
    return model


# ---- the plan: [(parent name, parent, child name, style, stride)] --------------------------------

def _hf_plan(model) -> list:
    """DeepSpeed 0.19's preferred source: the model's Hugging Face tp_plan (config's base plan + class plan)."""
    config = getattr(model, "config", None)
    patterns = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not patterns:
        return []  # no plan for the blocks (GPT-2): the name rules decide
    patterns.update(getattr(type(model), "_tp_plan", None) or {})  # the head's entry (lm_head)
    unsupported = sorted({style for style in patterns.values() if style.lower() not in HF_STYLES})
    if unsupported:
        raise ValueError(f"{type(model).__name__}'s Hugging Face tp_plan uses partition style(s) {unsupported}; "
                         f"ds_lab's AutoTP supports {sorted(HF_STYLES)} (DeepSpeed rejects such a plan too)")
    rules = [(re.compile(r"(.*\.)?" + re.escape(p).replace(r"\*", r"[^.]+") + "$"), HF_STYLES[s.lower()])
             for p, s in patterns.items()]
    plan = []
    for name, module in model.named_modules():
        style = next((s for rule, s in rules if rule.match(name)), None)
        if style is not None and _is_projection(module):
            parent_name, _, child_name = name.rpartition(".")
            plan.append((parent_name, model.get_submodule(parent_name), child_name, style, 1))
    return plan


def _name_plan(model) -> list:
    """The name rules: a module whose Linear/Conv1D children are column ones then exactly one row one."""
    plan = []
    for parent_name, parent in model.named_modules():
        if getattr(parent, "is_cross_attention", False):
            raise ValueError(f"AutoTP: cross-attention ({parent_name}) is not supported; build the model without it")
        children = [(n, c) for n, c in parent.named_children() if _is_projection(c)]
        columns = [n for n, _ in children if n in COLUMN]
        rows = [n for n, _ in children if n in ROW]
        if columns and len(rows) == 1 and len(columns) + 1 == len(children):
            plan += [(parent_name, parent, n, "column", COLUMN[n]) for n in columns]
            plan.append((parent_name, parent, rows[0], "row", 1))
    return plan


def _is_projection(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _shard(child, style, stride, region=None):
    """The parallel layer for `child`, holding child's own Parameter objects (now shards)."""
    if is_conv1d(child):
        if style == "column_gather":
            raise ValueError("AutoTP: a gathered column-parallel Conv1D is not supported")
        new = Conv1DParallel(child, style, stride)
    elif style == "row":
        new = RowParallelLinear.from_full(child)
    elif style == "column" and region is not None:
        new = SharedInputColumn.from_full(child, stride=stride)
        new.shared_region = region
    else:
        new = ColumnParallelLinear.from_full(child, gather_output=style == "column_gather", stride=stride)
    return keep_parameter_identity(new, child)


# ---- heads and attributes ----------------------------------------------------------------------------

def _check_heads(model, tp_size) -> None:
    """Each rank takes whole heads (DeepSpeed splits uneven key-value heads; ds_lab refuses them)."""
    config = getattr(model, "config", None)
    for name in HEAD_COUNTS:
        heads = getattr(config, name, None)
        if isinstance(heads, int) and heads % tp_size:
            raise ValueError(f"{name} {heads} is not divisible by tensor_parallel.autotp_size {tp_size}; each "
                             f"tensor rank takes whole heads: choose an autotp_size that divides {heads}")


def _localize_attributes(module, name, tp_size) -> None:
    """DeepSpeed's update_mp_params: a module's head counts and widths become this rank's share."""
    for attr in HEAD_COUNTS + ("split_size", "embed_dim", "all_head_size", "inner_dim"):
        value = getattr(module, attr, None)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if value % tp_size:
            raise ValueError(f"{name}.{attr} = {value} is not divisible by tensor_parallel.autotp_size {tp_size}; "
                             f"choose an autotp_size that divides it")
        setattr(module, attr, value // tp_size)


# ---- tensor partners must see the same micro-batch (DeepSpeed checks the first forward too) ----------

def _check_inputs_once(module, args, kwargs):
    """First forward only: a fingerprint of the inputs, compared over the tensor group."""
    if getattr(module, "_ds_autotp_inputs_checked", False):
        return
    module._ds_autotp_inputs_checked = True
    import torch
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    flat = torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors]) if tensors else torch.zeros(0)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder(97)
    fingerprint = torch.stack([torch.tensor(float(flat.numel())), flat.sum(), (flat * weights).sum()])
    low, high = fingerprint.to(comm.device()), fingerprint.clone().to(comm.device())
    with comm.tag("autotp_input_check"):
        comm.all_reduce(low, op=comm.ReduceOp.MIN, group=model_parallel_group())
        comm.all_reduce(high, op=comm.ReduceOp.MAX, group=model_parallel_group())
    if not torch.equal(low, high):
        raise RuntimeError("AutoTP: the tensor-parallel partners of this rank got different inputs. Partners "
                           "(consecutive ranks, one model replica) must see the same micro-batch: slice the "
                           "global batch by the data-parallel rank (engine.grid.rank_in('data')), not the global rank")
