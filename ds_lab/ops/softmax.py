"""Causal softmax over the last dimension of attention scores [..., T, T], fused: kernels/
causal_softmax.cu on a GPU (CuPy) or the CPU emulation, torch anywhere. The mask is applied by
the kernel (keys after the query are never read), so no [T, T] mask tensor and no -inf fill.

    probs = causal_softmax(q @ k.transpose(-2, -1) * scale)      # probs[..., i, j] = 0 for j > i

Forward, for query i:  p_j = exp(s_j - m) / sum_{k<=i} exp(s_k - m),  m = max_{k<=i} s_k,  p_j = 0 for j > i.
Backward (the Jacobian of softmax is diag(p) - p p^T):  ds_j = p_j (dp_j - sum_k dp_k p_k), which
is 0 above the diagonal as p is. fp32 or bf16, fp32 math.
"""
from __future__ import annotations

import torch

from ds_lab.ops import backend as backends
from ds_lab.ops.backend import MAX_BLOCKS, SUFFIX, threads_for


def causal_mask(length: int, device=None) -> torch.Tensor:
    """[length, length] bool, True where key j > query i (masked)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(diagonal=1)


def causal_softmax_reference(scores):
    """torch's softmax over the last dimension with the upper triangle at -inf (differentiable)."""
    return scores.masked_fill(causal_mask(scores.shape[-1], scores.device), float("-inf")).softmax(dim=-1)


class FusedCausalSoftmax(torch.autograd.Function):
    """Causal softmax forward and backward, each a launch of kernels/causal_softmax.cu (see the
    module docstring for the math); `kernel_backend` is "cuda" or "emulate"."""

    @staticmethod
    def forward(ctx, scores, kernel_backend):
        length = scores.shape[-1]
        s2 = scores.contiguous().view(-1, length)
        rows = s2.shape[0]
        probs = backends.empty(s2.shape, scores.dtype, scores.device)
        backends.launch("causal_softmax", f"causal_softmax_fwd_{SUFFIX[scores.dtype]}", min(rows, MAX_BLOCKS),
                        threads_for(length), (probs, s2, rows, length), kernel_backend)
        ctx.save_for_backward(probs)
        ctx.kernel_backend, ctx.shape = kernel_backend, scores.shape
        return probs.view(scores.shape)

    @staticmethod
    def backward(ctx, dprobs):
        (probs,) = ctx.saved_tensors
        rows, length = probs.shape
        dp2 = dprobs.contiguous().view(rows, length)
        dscores = backends.empty((rows, length), probs.dtype, probs.device)
        backends.launch("causal_softmax", f"causal_softmax_bwd_{SUFFIX[probs.dtype]}", min(rows, MAX_BLOCKS),
                        threads_for(length), (dscores, dp2, probs, rows, length), ctx.kernel_backend)
        return dscores.view(ctx.shape), None


def causal_softmax(scores: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Softmax of scores [..., T, T] over the last dimension, key j > query i masked to 0.
    backend: "cuda", "emulate", "torch" or None for the best available (ds_lab/ops/backend.py)."""
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"causal_softmax: scores {tuple(scores.shape)} must end in [T, T] (queries x keys)")
    chosen = backends.resolve(backend, scores)
    if chosen == "torch" or scores.numel() == 0:
        return causal_softmax_reference(scores)
    if scores.dtype not in SUFFIX:
        if backend is None:  # chosen by default: torch runs every dtype
            return causal_softmax_reference(scores)
        raise backends.BackendError(f"causal_softmax's kernels take float32 or bfloat16, not {scores.dtype}; "
                                    f"cast the scores or use backend='torch'")
    return FusedCausalSoftmax.apply(scores, chosen)
