"""Tensor-parallel linear layers (Megatron-LM): a matmul split over T ranks, joined by f and g.

For Y = X A with A of shape [in, out] (nn.Linear stores A^T, `weight` [out, in]; so do we):

    column parallel   A = [A_1 | ... | A_T]     rank i computes Y_i = X A_i      (concatenate: Y = [Y_1 .. Y_T])
    row parallel      A = [A_1 ; ... ; A_T]     rank i computes X_i A_i          (sum: Y = sum_i X_i A_i)

The row-parallel output is a SUM of partial products, not a concatenation (the article's §4.2 writes
a concatenation; tests/test_tensor_parallel.py shows the difference). A column-parallel layer
followed by a row-parallel one (the MLP: X -> GeLU(X A) B; attention: heads -> output projection)
needs no communication in between, only f before and g after:

    Y = g( GeLU( f(X) A_i ) B_i )       f: identity fwd / all-reduce bwd;  g: all-reduce fwd / identity bwd

Shards are contiguous chunks by tensor rank (`weight.chunk(T, dim)[rank]`). A fused projection
(q|k|v stacked) is split block by block (`stride=3`): rank i takes rows i of q, of k and of v.
Sharded parameters carry Megatron's attributes `tensor_model_parallel = True`, `partition_dim`,
`partition_stride`; the engine's gradient norm sums their squares over the model group and counts
replicated parameters (the row-parallel bias, LayerNorms) once. Sizes not divisible by T are refused
with the fix named (the vocabulary is padded instead: see vocab.py).

A layer built directly (`ColumnParallelLinear(in, out)`) first makes the full nn.Linear with the
current RNG and keeps its chunk (as Megatron's `_initialize_affine_weight_cpu`): the same seed on
every rank gives exactly the one-process weights. `from_full(linear)` shards an existing layer
(AutoTP's path). Under sequence parallel (Megatron-SP) the column layer all-gathers the sequence
instead of f, and the row layer reduce-scatters it instead of g (mappings.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_lab.parallel.mappings import (_gather, _identity, _all_reduce, _Conjugate, copy_to_region,
                                      gather_from_region, gather_from_sequence_region, reduce_from_region,
                                      reduce_scatter_to_sequence_region, scatter_to_region)
from ds_lab.parallel.state import model_parallel_rank, model_parallel_world_size


def _check_divisible(size: int, parts: int, what: str) -> None:
    if size % parts:
        raise ValueError(f"{what} {size} is not divisible by the tensor-parallel size x stride = {parts}; "
                         f"choose {what} a multiple of {parts} (or a tensor-parallel size that divides it)")


def shard_tensor(full: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    """This rank's chunk of `full` along `dim`: of each of `stride` stacked blocks, chunk `rank` of T."""
    size, rank = model_parallel_world_size(), model_parallel_rank()
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def make_tensor_parallel(param: nn.Parameter, dim: int, stride: int = 1) -> nn.Parameter:
    """Mark a parameter as this rank's shard (Megatron's attributes, read by the engine's norm)."""
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, stride
    return param


def mark_sequence_parallel(param: nn.Parameter) -> nn.Parameter:
    """A replicated parameter used on s/T of the sequence: each rank's gradient is a partial sum."""
    param.sequence_parallel = True
    return param


def sequence_parallel_grad(param: torch.Tensor) -> torch.Tensor:
    """Use `param` in a sequence-parallel region: identity forward; backward sums the partial
    gradients over the tensor group, so every rank's `.grad` is the whole gradient (one all-reduce of
    the parameter's size per micro-batch, tagged "sp_grad_allreduce")."""
    if model_parallel_world_size() == 1:
        return param
    return _Conjugate.apply(param, _identity, lambda g: _all_reduce(g, tag="sp_grad_allreduce"))


@torch.no_grad()
def gather_parameter(param: torch.Tensor, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full tensor of a shard (a collective over the tensor group: every tensor rank must call it,
    in the same order). Replicated parameters come back as a copy. Vocabulary padding is cut off.
    tensor: gather this instead (e.g. `param.grad`), laid out like `param`."""
    tensor = (param if tensor is None else tensor).detach()
    if not getattr(param, "tensor_model_parallel", False):
        return tensor.clone()
    dim, stride, size = param.partition_dim, param.partition_stride, model_parallel_world_size()
    pieces = _gather(tensor, dim).chunk(size, dim=dim)  # rank order
    blocks = [torch.cat([p.chunk(stride, dim=dim)[j] for p in pieces], dim=dim) for j in range(stride)]
    full = torch.cat(blocks, dim=dim)
    unpadded = getattr(param, "unpadded_size", None)
    return full.narrow(dim, 0, unpadded) if unpadded is not None else full


class ColumnParallelLinear(nn.Module):
    """Y = X A, A split by columns (output features): this rank holds weight rows [out/T, in].

    gather_output=False leaves Y split over the ranks (what a following RowParallelLinear wants).
    full: an nn.Linear to shard (default: a fresh one, made with the current RNG on every rank).
    stride: the output is `stride` stacked blocks (q|k|v: 3), each split over the ranks.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, stride: int = 1, full: Optional[nn.Linear] = None):
        super().__init__()
        _check_divisible(output_size, model_parallel_world_size() * stride, "output_size")
        full = full if full is not None else nn.Linear(input_size, output_size, bias=bias)
        self.input_size, self.output_size = input_size, output_size
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        if gather_output and sequence_parallel:
            raise ValueError("ColumnParallelLinear: gather_output=True with sequence_parallel=True is not "
                             "supported (Megatron neither); gather the output yourself")
        self.weight = make_tensor_parallel(nn.Parameter(shard_tensor(full.weight.detach(), 0, stride)), 0, stride)
        if full.bias is not None:
            self.bias = make_tensor_parallel(nn.Parameter(shard_tensor(full.bias.detach(), 0, stride)), 0, stride)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_full(cls, linear: nn.Linear, gather_output: bool = False, sequence_parallel: bool = False,
                  stride: int = 1) -> "ColumnParallelLinear":
        """This rank's column shard of an existing nn.Linear (its weights are copied, not shared)."""
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   gather_output=gather_output, sequence_parallel=sequence_parallel, stride=stride, full=linear)

    def forward(self, x):
        # enter the region: f (all-reduce in backward), or under SP all-gather the sequence
        x = gather_from_sequence_region(x) if self.sequence_parallel else copy_to_region(x)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_region(y) if self.gather_output else y

    def extra_repr(self):
        return (f"in={self.input_size}, out={self.output_size} (this rank: {self.weight.shape[0]}), "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Y = X A, A split by rows (input features): this rank holds weight columns [out, in/T].

    Each rank's X_i A_i is a partial sum; g all-reduces them (under SP: reduce-scatters over the
    sequence). The bias is replicated and added once, after the sum.
    input_is_parallel=False: X arrives whole and each rank first keeps its chunk of the last dim.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, full: Optional[nn.Linear] = None):
        super().__init__()
        _check_divisible(input_size, model_parallel_world_size(), "input_size")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel=True needs input_is_parallel=True")
        full = full if full is not None else nn.Linear(input_size, output_size, bias=bias)
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.weight = make_tensor_parallel(nn.Parameter(shard_tensor(full.weight.detach(), 1)), 1)
        if full.bias is not None:
            self.bias = nn.Parameter(full.bias.detach().clone())
            if sequence_parallel:
                mark_sequence_parallel(self.bias)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_full(cls, linear: nn.Linear, input_is_parallel: bool = True,
                  sequence_parallel: bool = False) -> "RowParallelLinear":
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   input_is_parallel=input_is_parallel, sequence_parallel=sequence_parallel, full=linear)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_region(x)
        partial = F.linear(x, self.weight)  # X_i A_i: this rank's term of the sum
        y = reduce_scatter_to_sequence_region(partial) if self.sequence_parallel else reduce_from_region(partial)
        if self.bias is None:
            return y
        return y + (sequence_parallel_grad(self.bias) if self.sequence_parallel else self.bias)

    def extra_repr(self):
        return (f"in={self.input_size} (this rank: {self.weight.shape[1]}), out={self.output_size}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, replicated on every tensor rank. With sequence_parallel=True it normalises this
    rank's s/T positions, so its weight/bias gradients are partial: they are summed over the tensor
    group inside backward (`sequence_parallel_grad`), and marked `sequence_parallel = True`."""

    def __init__(self, normalized_shape, eps=1e-5, bias=True, sequence_parallel=False):
        super().__init__(normalized_shape, eps=eps, bias=bias)
        self.sequence_parallel = sequence_parallel
        if sequence_parallel:
            for p in self.parameters():
                mark_sequence_parallel(p)

    @classmethod
    def from_full(cls, norm: nn.LayerNorm, sequence_parallel=False) -> "LayerNorm":
        new = cls(norm.normalized_shape, eps=norm.eps, bias=norm.bias is not None,
                  sequence_parallel=sequence_parallel)
        new.load_state_dict(norm.state_dict())
        return new

    def forward(self, x):
        if not self.sequence_parallel:
            return super().forward(x)
        weight = sequence_parallel_grad(self.weight) if self.weight is not None else None
        bias = sequence_parallel_grad(self.bias) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
