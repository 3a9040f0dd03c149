"""y = gelu(x + bias), fused: kernels/bias_gelu.cu on a GPU (CuPy) or the CPU emulation, torch
anywhere. The MLP's first linear layer leaves its bias to this op, so x + bias is never written.

    y = bias_gelu(x, bias)                                       # bias: [x.shape[-1]]
    ds_lab.ops.GELU_APPROXIMATE = "none"                         # the exact form from the next call

ds_lab.ops.GELU_APPROXIMATE picks the form at every call, with u = x + bias:
    "tanh" (GPT-2's):  gelu(u) = u/2 (1 + t),  t = tanh(sqrt(2/pi) (u + 0.044715 u^3))
                       gelu'(u) = (1 + t)/2 + u/2 (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 u^2)
    "none" (exact):    gelu(u) = u Phi(u) = u/2 (1 + erf(u / sqrt 2))
                       gelu'(u) = Phi(u) + u phi(u),  phi(u) = exp(-u^2/2) / sqrt(2 pi)
Backward: dx = dy * gelu'(x + bias), dbias = sum of dx over every dimension but the last, reduced
in two deterministic passes (per-block partials, then a column sum). fp32 or bf16, fp32 math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_lab.ops import backend as backends
from ds_lab.ops.backend import SUFFIX, threads_for

MAX_BLOCKS = 1024  # forward: grid-stride beyond this
MAX_PARTS = 256  # backward: row chunks, one row of dbias partials each
FORMS = ("tanh", "none")
GELU_APPROXIMATE = "tanh"  # what `ds_lab.ops.GELU_APPROXIMATE = ...` sets (ds_lab/ops/__init__.py forwards it)


def set_approximate(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"ds_lab.ops.GELU_APPROXIMATE = {form!r}: set it to 'tanh' (GPT-2) or 'none' (exact erf)")
    global GELU_APPROXIMATE
    GELU_APPROXIMATE = form


def approximation() -> str:
    """ds_lab.ops.GELU_APPROXIMATE, as set."""
    return GELU_APPROXIMATE


def bias_gelu_reference(x, bias, approximate: str = "tanh"):
    """torch's gelu(x + bias) (differentiable): what the kernels must match."""
    return F.gelu(x + bias, approximate=approximate)


class FusedBiasGelu(torch.autograd.Function):
    """gelu(x + bias) forward and backward, each a launch of kernels/bias_gelu.cu (see the module
    docstring for the math); `kernel_backend` is "cuda" or "emulate"."""

    @staticmethod
    def forward(ctx, x, bias, approximate, kernel_backend):
        cols = x.shape[-1]
        x2 = x.contiguous().view(-1, cols)
        bias = bias.contiguous()
        rows, tanh = x2.shape[0], int(approximate == "tanh")
        y = backends.empty(x2.shape, x.dtype, x.device)
        packs = -(-rows * cols // 4)  # a thread takes 4 elements at a time
        threads = threads_for(packs)
        blocks = min(MAX_BLOCKS, -(-packs // threads))
        backends.launch("bias_gelu", f"bias_gelu_fwd_{SUFFIX[x.dtype]}", blocks, threads,
                        (y, x2, bias, rows, cols, tanh), kernel_backend)
        ctx.save_for_backward(x2, bias)
        ctx.tanh, ctx.kernel_backend, ctx.shape = tanh, kernel_backend, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = dy.contiguous().view(rows, cols)
        parts, suffix = min(rows, MAX_PARTS), SUFFIX[x2.dtype]
        dx = backends.empty((rows, cols), x2.dtype, x2.device)
        partial = backends.empty((parts, cols), torch.float32, x2.device)
        packs = cols // 4 if cols % 4 == 0 else cols  # what one thread's column step covers
        backends.launch("bias_gelu", f"bias_gelu_bwd_{suffix}", parts, threads_for(packs),
                        (dx, partial, dy2, x2, bias, rows, cols, ctx.tanh), ctx.kernel_backend)
        dbias = backends.empty((cols,), x2.dtype, x2.device)
        threads = threads_for(cols)
        backends.launch("bias_gelu", f"bias_gelu_dbias_{suffix}", -(-cols // threads), threads,
                        (dbias, partial, parts, cols), ctx.kernel_backend)
        return dx.view(ctx.shape), dbias, None, None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, backend: str | None = None,
              approximate: str | None = None) -> torch.Tensor:
    """gelu(x + bias), bias of x's last dimension; the form is ds_lab.ops.GELU_APPROXIMATE, read now,
    unless `approximate` ("tanh" or "none") names it (a model whose GeLU is fixed, e.g. ds_lab's GPT).
    backend: "cuda", "emulate", "torch" or None for the best available (ds_lab/ops/backend.py)."""
    if approximate is not None and approximate not in FORMS:
        raise ValueError(f"approximate={approximate!r}: 'tanh' (GPT-2) or 'none' (exact erf)")
    form = approximate or approximation()
    chosen = backends.resolve(backend, x, bias)
    if chosen == "torch" or x.numel() == 0:
        return bias_gelu_reference(x, bias, form)
    if x.dtype not in SUFFIX:
        if backend is None:  # chosen by default: torch runs every dtype
            return bias_gelu_reference(x, bias, form)
        raise backends.BackendError(f"bias_gelu's kernels take float32 or bfloat16, not {x.dtype}; "
                                    f"cast x or use backend='torch'")
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias {tuple(bias.shape)} must be ({x.shape[-1]},), x's last dimension")
    return FusedBiasGelu.apply(x, bias.to(x.dtype), form, chosen)
