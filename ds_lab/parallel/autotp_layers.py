"""The pieces AutoTP (autotp.py) swaps into a model: Conv1D shards, and attention on the local heads.

Hugging Face's `Conv1D` (GPT-2) computes y = x W + b with W stored [in, out], the transpose of
nn.Linear's. `Conv1DParallel` shards it in that layout: column-parallel keeps columns of W (dim 1,
with the bias), row-parallel keeps rows (dim 0; the bias is replicated and added after the sum).

An attention module whose q|k|v projection is column-parallel sees n_head/T heads. Two things must
follow: its code must not assume the full width (the ds_lab GPT splits q|k|v by the input width, so
its forward is replaced; a Hugging Face attention reshapes with -1, so only its attributes change,
in autotp.py), and dropout on the attention probabilities must stay the one process's: rank r draws
the mask for all n_head heads — what one process draws, from the same random stream — and keeps
heads [r*n_head/T, (r+1)*n_head/T). Drawing only its own heads would shift the stream, and every
later dropout mask would differ from the one process's. (CPU: torch's sdpa draws its mask the same
way; CUDA's fused kernels draw in-kernel, so there only the distribution matches.)
"""
from __future__ import annotations

import copy
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_lab.parallel.layers import ColumnParallelLinear, _check_divisible, make_tensor_parallel, shard_tensor
from ds_lab.parallel.mappings import copy_to_region, reduce_from_region
from ds_lab.parallel.state import model_parallel_rank, model_parallel_world_size

ATTENTION_NAME = "ds_lab_autotp"  # registered with Hugging Face's AttentionInterface when first needed
_MEGATRON_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel")


def is_conv1d(module) -> bool:
    """Hugging Face's transformers.pytorch_utils.Conv1D (checked by name: transformers stays optional)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class Conv1DParallel(nn.Module):
    """A Conv1D (weight [in, out]) split over the tensor group, in its own layout.

    style "column": weight [in, out/T] (dim 1; `stride` stacked blocks, q|k|v: 3), bias [out/T];
                    f before (identity forward, all-reduce of the input gradient backward)
    style "row":    weight [in/T, out] (dim 0), bias whole; g after (all-reduce of the partial sums)
    """

    def __init__(self, conv, style: str, stride: int = 1):
        super().__init__()
        self.column = style == "column"
        dim = 1 if self.column else 0
        _check_divisible(conv.weight.shape[dim], model_parallel_world_size() * (stride if self.column else 1),
                         "Conv1D output size" if self.column else "Conv1D input size")
        weight = shard_tensor(conv.weight.detach(), dim, stride if self.column else 1)
        self.weight = make_tensor_parallel(nn.Parameter(weight), dim, stride if self.column else 1)
        if conv.bias is None:
            self.register_parameter("bias", None)
        elif self.column:
            self.bias = make_tensor_parallel(nn.Parameter(shard_tensor(conv.bias.detach(), 0, stride)), 0, stride)
        else:
            self.bias = nn.Parameter(conv.bias.detach().clone())
        self.nx, self.nf = self.weight.shape  # Conv1D's names: this rank's in and out sizes

    def forward(self, x):
        if self.column:
            y = copy_to_region(x) @ self.weight
        else:
            y = reduce_from_region(x @ self.weight)  # this rank's term of the sum, then the sum
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"{'column' if self.column else 'row'}, this rank: [{self.nx}, {self.nf}]"


class SharedInputColumn(ColumnParallelLinear):
    """A column shard among siblings fed the same input (Llama's q_proj, k_proj, v_proj; gate_proj,
    up_proj): the first to see an input enters the region with f, the others reuse that tensor, so
    backward sums their input gradients first and all-reduces once (Megatron's fused count), not once each."""

    def forward(self, x):
        region = self.shared_region
        if region.source is not x:
            region.source, region.entered = x, copy_to_region(x)
        return F.linear(region.entered, self.weight, self.bias)


class SharedRegion:
    """The input the sibling columns of one module last entered with; cleared after that module's forward."""

    def __init__(self, module: nn.Module):
        self.source = self.entered = None
        module.register_forward_hook(lambda *_: self.clear())

    def clear(self):
        self.source = self.entered = None


def keep_parameter_identity(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give `new` the Parameter objects of `old`, holding the shards (DeepSpeed swaps `.data` too):
    whatever refers to them — an optimizer built before initialize(), a tie — now sees the shards."""
    for name in ("weight", "bias"):
        shard, kept = new._parameters.get(name), getattr(old, name, None)
        if shard is None or not isinstance(kept, nn.Parameter):
            continue
        kept.data, kept.grad = shard.data, None
        for attr in _MEGATRON_ATTRIBUTES:
            if hasattr(shard, attr):
                setattr(kept, attr, getattr(shard, attr))
        new._parameters[name] = kept
    return new


# ---- attention on this rank's heads ---------------------------------------------------------------

def install_local_heads_attention(module: nn.Module, tp_size: int) -> None:
    """Make an attention module whose projections were just sharded compute on its local heads."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "_attn_implementation"):  # Hugging Face
        full = next(getattr(config, n) for n in ("num_attention_heads", "n_head") if hasattr(config, n))
        module.ds_autotp_heads = (full, model_parallel_rank() * full // tp_size)
        module.ds_autotp_inner = config._attn_implementation or "eager"
        module.config = copy.copy(config)  # this module alone dispatches to the local-heads function
        module.config._attn_implementation = _register_hf_attention()
    elif hasattr(module, "c_attn") and hasattr(module, "n_head"):  # the ds_lab GPT (n_head already local)
        module.ds_autotp_heads = (module.n_head * tp_size, model_parallel_rank() * module.n_head)
        module.forward = types.MethodType(_gpt_attention_forward, module)
    else:
        raise ValueError(f"AutoTP does not know how to run {type(module).__name__} on its local heads; "
                         f"write it with a -1 head count in its reshapes, or use ds_lab.parallel layers")


def local_heads_attention(q, k, v, dropout, heads, causal=True, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v on this rank's heads (q, k, v: [b, heads/T, s, d]).
    heads = (n_head, first local head): with dropout, the whole n_head mask is drawn (see docstring)."""
    if dropout == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scale)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s_q, s_k = scores.shape[-2:]
    if causal and mask is None:
        allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1)
    full, first = heads
    keep = torch.empty((probs.shape[0], full, s_q, s_k), dtype=probs.dtype, device=probs.device).bernoulli_(1 - dropout)
    return (probs * keep[:, first:first + probs.shape[1]].div_(1 - dropout)) @ v


def _gpt_attention_forward(self, x):
    """ds_lab.models.gpt.CausalSelfAttention.forward on n_head/T heads (its own splits the input width)."""
    batch, seq, _ = x.shape
    qkv = self.c_attn(x)  # [b, s, 3 h/T]: this rank's q, k and v heads
    width = qkv.shape[-1] // 3
    q, k, v = (t.view(batch, seq, self.n_head, -1).transpose(1, 2) for t in qkv.split(width, dim=2))
    y = local_heads_attention(q, k, v, self.dropout if self.training else 0.0, self.ds_autotp_heads)
    return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(batch, seq, width)))


def _hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Hugging Face attention-interface function: the model's own one without dropout, else the math
    of its sdpa/eager path on the local heads with the whole-heads dropout mask."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    inner = module.ds_autotp_inner
    if dropout == 0.0:
        function = (sys.modules[type(module).__module__].eager_attention_forward if inner == "eager"
                    else ALL_ATTENTION_FUNCTIONS[inner])
        return function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = local_heads_attention(query, key, value, dropout, module.ds_autotp_heads, causal=causal,
                                mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_hf_attention() -> str:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, _hf_attention)
    return ATTENTION_NAME
