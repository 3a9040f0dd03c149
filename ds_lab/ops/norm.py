"""LayerNorm over the last dimension, fused: kernels/layer_norm.cu on a GPU (CuPy) or the CPU
emulation, torch anywhere.

    y = layer_norm(x, weight, bias, eps=1e-5)                    # the best backend for x
    y = layer_norm(x, weight, bias, backend="emulate")           # the CUDA source, run on the CPU

Forward, per row of x viewed as [rows, cols] (fp32 statistics whatever x's dtype):
    mean = sum(x) / cols,  rstd = 1 / sqrt(sum((x - mean)^2) / cols + eps)
    y = (x - mean) * rstd * weight + bias                        (mean and rstd saved for backward)
Backward, with xhat = (x - mean) * rstd and g = dy * weight:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))            (means over the row)
    dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy
The kernels take fp32 or bf16 x, weight and bias of one dtype; dweight and dbias are reduced in
two deterministic passes (per-block partials, then a column sum), so they repeat bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_lab.ops import backend as backends
from ds_lab.ops.backend import MAX_BLOCKS, SUFFIX, threads_for

def layer_norm_reference(x, weight, bias, eps: float = 1e-5):
    """torch's LayerNorm over the last dimension (differentiable): what the kernels must match."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class FusedLayerNorm(torch.autograd.Function):
    """LayerNorm forward and backward, each a launch of kernels/layer_norm.cu (see the module
    docstring for the math); `kernel_backend` is "cuda" or "emulate"."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, kernel_backend):
        cols = x.shape[-1]
        x2 = x.contiguous().view(-1, cols)
        weight, bias = weight.contiguous(), bias.contiguous()
        rows = x2.shape[0]
        y = backends.empty(x2.shape, x.dtype, x.device)
        mean = backends.empty((rows,), torch.float32, x.device)
        rstd = backends.empty((rows,), torch.float32, x.device)
        backends.launch("layer_norm", f"layer_norm_fwd_{SUFFIX[x.dtype]}", min(rows, MAX_BLOCKS), threads_for(cols),
                        (y, mean, rstd, x2, weight, bias, rows, cols, float(eps)), kernel_backend)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.kernel_backend, ctx.shape = kernel_backend, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = dy.contiguous().view(rows, cols)
        blocks, suffix = min(rows, MAX_BLOCKS), SUFFIX[x2.dtype]
        dx = backends.empty((rows, cols), x2.dtype, x2.device)
        dweight_partial = backends.empty((blocks, cols), torch.float32, x2.device)
        dbias_partial = backends.empty((blocks, cols), torch.float32, x2.device)
        backends.launch("layer_norm", f"layer_norm_bwd_{suffix}", blocks, threads_for(cols),
                        (dx, dweight_partial, dbias_partial, dy2, x2, weight, mean, rstd, rows, cols),
                        ctx.kernel_backend)
        dweight = backends.empty((cols,), x2.dtype, x2.device)
        dbias = backends.empty((cols,), x2.dtype, x2.device)
        threads = threads_for(cols)
        backends.launch("layer_norm", f"layer_norm_bwd_params_{suffix}", (cols + threads - 1) // threads, threads,
                        (dweight, dbias, dweight_partial, dbias_partial, blocks, cols), ctx.kernel_backend)
        return dx.view(ctx.shape), dweight, dbias, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
               backend: str | None = None) -> torch.Tensor:
    """LayerNorm of x over its last dimension with `weight` and `bias` of that size (None: 1 and 0).
    backend: "cuda", "emulate", "torch" or None for the best available (ds_lab/ops/backend.py)."""
    chosen = backends.resolve(backend, x, weight, bias)
    cols = x.shape[-1]
    weight = torch.ones(cols, dtype=x.dtype, device=x.device) if weight is None else weight
    bias = torch.zeros(cols, dtype=x.dtype, device=x.device) if bias is None else bias
    if chosen == "torch" or x.numel() == 0:
        return layer_norm_reference(x, weight, bias, eps)
    if x.dtype not in SUFFIX:
        if backend is None:  # chosen by default: torch runs every dtype
            return layer_norm_reference(x, weight, bias, eps)
        raise backends.BackendError(f"layer_norm's kernels take float32 or bfloat16, not {x.dtype}; "
                                    f"cast x or use backend='torch'")
    if weight.shape != (cols,) or bias.shape != (cols,):
        raise ValueError(f"layer_norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must both be "
                         f"({cols},), the size of x's last dimension")
    return FusedLayerNorm.apply(x, weight.to(x.dtype), bias.to(x.dtype), eps, chosen)
