"""Multi-tensor fused Adam / AdamW: one kernel launch (kernels/fused_adam.cu) updates every tensor
of a parameter group, instead of the dozen `_foreach` launches of ds_lab/optim/adam.py.

    fused_adam_step(params, grads, exp_avgs, exp_avg_sqs, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.01, step=t)                       # fp32 params, in place
    fused_adam_step(bf16_params, bf16_grads, exp_avgs, exp_avg_sqs, ..., masters=fp32_copies)

The math is ds_lab/optim/adam.py's (see its docstring); `step` is the step count t after this
update (1 at the first), as the group's "step" there. With `masters`, the fp32 master copies take
the update and each bf16 param is written as its master rounded to nearest even.

How one launch covers many tensors: `pointers` is an int64 table of every tensor's data_ptr()
(one row per kind: params, grads, [masters,] exp_avgs, exp_avg_sqs) and `chunks` lists, for each
block of the grid, (tensor index, first element, element count). Every tensor is cut into chunks
of `chunk_size` elements (the last one shorter): with 256 threads that is 16 float4 per thread at
the default 16384, enough work per block to hide the launch, and enough blocks (a 10M-parameter
group gives ~600) to fill a GPU. The chunk table costs 24 bytes per chunk, against the chunk's
16384 x 28 bytes moved: 0.005%.
The kernel's bytes per element (28) are in the header of kernels/fused_adam.cu.

`adam_reference` is the same math with torch ops (the "torch" backend, and the tests' yardstick).
"""
from __future__ import annotations

import math

import torch

from ds_lab.ops import backend as backends

CHUNK_SIZE = 16384  # elements per block; a multiple of 4 keeps every chunk float4-aligned
THREADS = 256  # per block; the kernels' __launch_bounds__


def adam_scalars(*, lr, betas, eps, weight_decay, step, bias_correction=True) -> dict:
    """The scalar arguments of the kernel, folded in double precision as torch folds them (each
    becomes the fp32 value torch's scalar argument becomes)."""
    beta1, beta2 = betas
    bias1, bias2 = (1 - beta1 ** step, 1 - beta2 ** step) if bias_correction else (1.0, 1.0)
    return dict(lerp_weight=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=eps, step_size=-lr / bias1,
                bias2_sqrt=math.sqrt(bias2), decay=1 - lr * weight_decay, weight_decay=weight_decay)


def adam_reference(params, grads, exp_avgs, exp_avg_sqs, *, lr, betas, eps, weight_decay, step,
                   adam_w_mode=True, bias_correction=True, masters=None) -> None:
    """The fused step's math with torch `_foreach` ops, in place: ds_lab/optim/adam.py's update,
    plus the bf16-with-master form (update the fp32 masters, round them into the bf16 params)."""
    targets = masters if masters is not None else params
    grads = [g.float() for g in grads] if masters is not None else list(grads)
    s = adam_scalars(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step=step,
                     bias_correction=bias_correction)
    if weight_decay != 0:
        if adam_w_mode:
            torch._foreach_mul_(targets, s["decay"])
        else:
            grads = torch._foreach_add(grads, targets, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, s["lerp_weight"])
    torch._foreach_mul_(exp_avg_sqs, s["beta2"])
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, s["one_minus_beta2"])
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, s["bias2_sqrt"])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(targets, exp_avgs, denom, s["step_size"])
    if masters is not None:
        torch._foreach_copy_(params, masters)


def _check_lists(params, grads, exp_avgs, exp_avg_sqs, masters) -> None:
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError(f"{len(params)} params, {len(grads)} grads, {len(exp_avgs)} exp_avgs and "
                         f"{len(exp_avg_sqs)} exp_avg_sqs: pass one of each per tensor")
    if masters is not None and len(masters) != len(params):
        raise ValueError(f"{len(masters)} masters for {len(params)} params: one fp32 master per bf16 param")


def _unfit_for_kernel(params, grads, exp_avgs, exp_avg_sqs, masters):
    """Why the kernels cannot take these tensors (dtypes, sizes, contiguity), or None."""
    wanted = torch.bfloat16 if masters is not None else torch.float32
    fp32 = list(exp_avgs) + list(exp_avg_sqs) + (list(masters) if masters is not None else [])
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype != wanted or g.dtype != wanted:
            return (f"param {i} is {p.dtype} with a {g.dtype} grad; the fused kernel takes fp32 params and grads, "
                    "or bf16 params and grads with masters= their fp32 copies (or use backend='torch')")
        state = (exp_avgs[i], exp_avg_sqs[i]) + ((masters[i],) if masters is not None else ())
        if any(t.numel() != p.numel() for t in (g, *state)):
            return f"param {i}: its grad, state and master must have its {p.numel()} elements"
    if any(t.dtype != torch.float32 for t in fp32):
        return "exp_avgs, exp_avg_sqs and masters must be fp32 (the kernel keeps the state in fp32)"
    everything = (*params, *grads, *fp32)
    if not all(t.is_contiguous() for t in everything):
        return "the fused kernel takes contiguous tensors; call .contiguous() (or use backend='torch')"
    if len({t.device for t in everything}) != 1:
        return "one launch updates tensors of one device; call once per device"
    return None


def chunk_table(numels, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """int64 [chunks, 3]: (tensor index, first element, element count) for each block of the grid;
    an empty tensor gets no chunk."""
    if chunk_size <= 0 or chunk_size % 4:
        raise ValueError(f"chunk_size={chunk_size}: use a positive multiple of 4 (chunks must start float4-aligned)")
    numels = torch.tensor(list(numels), dtype=torch.int64)
    per_tensor = (numels + chunk_size - 1) // chunk_size
    tensor = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
    first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
    start = (torch.arange(len(tensor)) - first_chunk[tensor]) * chunk_size
    count = torch.clamp(numels[tensor] - start, max=chunk_size)
    return torch.stack([tensor, start, count], dim=1).contiguous()


def fused_adam_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, betas, eps, weight_decay, step,
                    adam_w_mode=True, bias_correction=True, masters=None, backend=None,
                    chunk_size: int = CHUNK_SIZE) -> None:
    """One Adam/AdamW step over every tensor, in place, in one launch (see the module docstring).
    backend=None: the CUDA kernel where it can run and take the tensors, else the torch reference."""
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    masters = list(masters) if masters is not None else None
    if not params:
        return
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, masters)
    kinds = [params, grads] + ([masters] if masters is not None else []) + [exp_avgs, exp_avg_sqs]
    chosen = backends.resolve(backend, *[t for kind in kinds for t in kind])
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step=step,
                 bias_correction=bias_correction)
    unfit = _unfit_for_kernel(params, grads, exp_avgs, exp_avg_sqs, masters) if chosen != "torch" else None
    if unfit and backend is not None:
        raise ValueError(unfit)
    if chosen == "torch" or unfit:  # backend=None: the best that can take these tensors
        adam_reference(params, grads, exp_avgs, exp_avg_sqs, adam_w_mode=adam_w_mode, masters=masters, **hyper)
        return
    device = params[0].device
    pointers = torch.tensor([[t.data_ptr() for t in kind] for kind in kinds], dtype=torch.int64).to(device)
    chunks = chunk_table([p.numel() for p in params], chunk_size).to(device)
    if chunks.shape[0] == 0:
        return
    s = adam_scalars(**hyper)
    kernel = "fused_adam_bf16_master" if masters is not None else "fused_adam_f32"
    args = (pointers, len(params), chunks, s["lerp_weight"], s["beta2"], s["one_minus_beta2"], s["eps"],
            s["step_size"], s["bias2_sqrt"], s["decay"], s["weight_decay"], int(adam_w_mode))
    backends.launch("fused_adam", kernel, (chunks.shape[0],), (THREADS,), args, chosen)
