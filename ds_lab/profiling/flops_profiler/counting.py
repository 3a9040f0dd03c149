"""How the flops profiler counts: torch's functions are wrapped while it runs, as DeepSpeed does.

Every counted function (torch.nn.functional's linear, convolutions, norms, activations, softmax,
embedding, scaled_dot_product_attention; torch's matmul, mm, bmm, addmm, baddbmm) is replaced by a
wrapper that computes (FLOPs, MACs) from the argument shapes, adds them to the innermost module
running (a stack the module hooks push and pop), then calls the original. The formulas are
DeepSpeed's (deepspeed/profiling/flops_profiler/profiler.py), so the numbers match its profiler:

    linear        MACs = input elements x out_features;  FLOPs = 2 MACs (the bias add is not counted)
    matmul, bmm   MACs = elements of A x last dim of B;  FLOPs = 2 MACs   (addmm/baddbmm: + the added term)
    attention     MACs = b*heads*s_q*s_k*(d_qk + d_v)   (QK^T and PV, the full square: causal masking
                  is not subtracted);  FLOPs = 2 MACs
    conv          2 * kernel * in_channels/groups * out_channels * output positions (+ bias)
    layer/group norm 5 per element (4 without affine), batch norm 5 in training, relu/gelu/silu/softmax
                  1 per element, embedding and dropout 0

Not counted: elementwise operators written as `x + y` / `x * y` (DeepSpeed counts only the
function forms), cross-entropy, torch.einsum, and code that calls neither (ds_lab's fused CUDA
kernels for LayerNorm and bias+GeLU on a GPU: those layers count 0 there).
Only the forward is counted; a training step is estimated as (3 + recompute_fwd_factor) x forward:
each matmul's backward is two matmuls of the same size (input and weight gradients).

(torch.utils.flop_counter.FlopCounterMode counts at the aten level, backward too, but only
matmuls, convolutions and attention, and on a CPU not attention; DeepSpeed's numbers need this.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_stack: list = []  # one [flops, macs] per module whose forward is running, innermost last
_originals: dict = {}  # (owner, name) -> the function a wrapper replaced


def _count(flops, macs) -> None:
    if _stack:
        _stack[-1][0] += int(flops)
        _stack[-1][1] += int(macs)


def push() -> None:
    _stack.append([0, 0])


def pop() -> tuple:
    flops, macs = _stack.pop()
    return flops, macs


def _numel(t) -> int:
    return t.numel() if torch.is_tensor(t) else 1


def _linear(input, weight, bias=None):
    macs = input.numel() * weight.shape[0]
    return 2 * macs, macs


def _elementwise(input, *args, **kwargs):
    return input.numel(), 0


def _norm(input, *args, **kwargs):
    weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
    return input.numel() * (5 if weight is not None else 4), 0


def _group_norm(input, num_groups, weight=None, *args, **kwargs):
    return input.numel() * (5 if weight is not None else 4), 0


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, *args, **kwargs):
    if training:
        return input.numel() * (5 if weight is not None else 4), 0
    return input.numel() * (2 if weight is not None else 1), 0


def _zero(*args, **kwargs):
    return 0, 0


def _matmul(input, other, *args, **kwargs):
    macs = input.numel() * other.shape[-1]
    return 2 * macs, macs


def _addmm(input, mat1, mat2, *args, **kwargs):
    macs = mat1.numel() * mat2.shape[-1]
    return 2 * macs + _numel(input), macs


def _attention(query, key, value, *args, **kwargs):
    macs = query.numel() * key.shape[-2] + math.prod(query.shape[:-1]) * key.shape[-2] * value.shape[-1]
    return 2 * macs, macs


def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    dims = input.dim() - 2
    as_tuple = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims)
    kernel, spatial = weight.shape[2:], input.shape[2:]
    stride, dilation = as_tuple(stride), as_tuple(dilation)
    if isinstance(padding, str):
        padding = (0,) * dims if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    padding = as_tuple(padding)
    out = [(n + 2 * p - (d * (k - 1) + 1)) // s + 1
           for n, p, d, k, s in zip(spatial, padding, dilation, kernel, stride)]
    positions = input.shape[0] * math.prod(out)
    macs = math.prod(kernel) * input.shape[1] * (weight.shape[0] // groups) * positions
    return 2 * macs + (weight.shape[0] * positions if bias is not None else 0), macs


FUNCTIONAL = {"linear": _linear, "conv1d": _conv, "conv2d": _conv, "conv3d": _conv,
              "relu": _elementwise, "gelu": _elementwise, "silu": _elementwise, "elu": _elementwise,
              "leaky_relu": _elementwise, "softmax": _elementwise, "layer_norm": _norm,
              "group_norm": _group_norm, "batch_norm": _batch_norm, "embedding": _zero,
              "scaled_dot_product_attention": _attention}
TORCH = {"matmul": _matmul, "mm": _matmul, "bmm": _matmul, "addmm": _addmm, "baddbmm": _addmm}
TENSOR = {"matmul": _matmul, "__matmul__": _matmul, "mm": _matmul, "bmm": _matmul, "addmm": _addmm}


def _wrap(original, formula):
    def counted(*args, **kwargs):
        _count(*formula(*args, **kwargs))
        return original(*args, **kwargs)

    counted.__wrapped__ = original
    return counted


def patch() -> None:
    """Replace the counted functions by counting wrappers (idempotent)."""
    if _originals:
        return
    for owner, table in ((F, FUNCTIONAL), (torch, TORCH), (torch.Tensor, TENSOR)):
        for name, formula in table.items():
            original = getattr(owner, name)
            _originals[(owner, name)] = original
            setattr(owner, name, _wrap(original, formula))


def unpatch() -> None:
    """Put the original functions back."""
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()
    _stack.clear()
