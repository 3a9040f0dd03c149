"""The wire side of tensor parallel: Megatron's conjugate operators, as tiny autograd functions.

A tensor-parallel region runs between two operators that are each other's transpose:

    f = copy_to_region       forward: identity         backward: all-reduce (sum the input grads)
    g = reduce_from_region   forward: all-reduce       backward: identity

    Y = g( sum_i  f(X) A_i B_i )        column-split A, row-split B: one all-reduce each way

The all-reduce moves b*s*h elements (batch x sequence x hidden); per transformer layer (attention
and MLP) that is 2 all-reduces forward and 2 backward. The other pairs used by the layers:

    scatter_to_region / gather_from_region         split / concatenate the last dim (and the reverse)
    scatter_to_sequence_region                     keep this rank's chunk of the sequence (bwd: all-gather)
    gather_from_sequence_region                    all-gather the sequence (bwd: reduce-scatter)
    reduce_scatter_to_sequence_region              reduce-scatter the sequence (bwd: all-gather)

The last two replace f and g under sequence parallel (Megatron-SP): an all-reduce *is* a
reduce-scatter followed by an all-gather, so the same bytes cross the wire, while the regions
between them (LayerNorm, dropout, residual) hold only s/T of the sequence on each rank.

Every collective goes through ds_lab.comm under a tag ("tp_allreduce", "tp_allgather",
"tp_reduce_scatter") so the comm log can count tensor-parallel traffic apart from the rest.
A tensor group of one rank makes every operator the identity.
"""
from __future__ import annotations

import torch

from ds_lab import comm
from ds_lab.parallel.state import model_parallel_group, model_parallel_rank, model_parallel_world_size

SEQUENCE_DIM = 1  # ds_lab models are batch-first: (batch, sequence, hidden)


# ---- the collectives, on plain tensors ------------------------------------------------------------

def _identity(x):
    return x


def _all_reduce(x, tag="tp_allreduce"):
    if model_parallel_world_size() == 1:
        return x
    x = x.contiguous().clone()  # the input may be saved or shared elsewhere: reduce a copy
    with comm.tag(tag):
        comm.all_reduce(x, group=model_parallel_group())
    return x


def _split(x, dim):
    """This rank's contiguous chunk of `x` along `dim`."""
    size = model_parallel_world_size()
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {size} tensor ranks; "
                         f"make it divisible by {size}")
    return x.chunk(size, dim=dim)[model_parallel_rank()].contiguous()


def _gather(x, dim):
    """Concatenate every rank's `x` along `dim`, in rank order (one all-gather)."""
    size = model_parallel_world_size()
    if size == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((size * front.shape[0],) + front.shape[1:])
    with comm.tag("tp_allgather"):
        comm.all_gather(out, front, group=model_parallel_group())
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x, dim):
    """Sum `x` over the ranks; rank r keeps chunk r along `dim` (one reduce-scatter)."""
    size = model_parallel_world_size()
    if size == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    if front.shape[0] % size:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {front.shape[0]} over {size} "
                         f"tensor ranks; make the sequence length divisible by {size}")
    out = front.new_empty((front.shape[0] // size,) + front.shape[1:])
    with comm.tag("tp_reduce_scatter"):
        comm.reduce_scatter(out, front, group=model_parallel_group())
    return out.movedim(0, dim).contiguous()


# ---- one autograd function for every pair: forward does one thing, backward its transpose ---------

class _Conjugate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.backward_fn = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad), None, None


def copy_to_region(x):
    """f: enter a tensor-parallel region. Every rank uses all of x; its gradient is the sum over ranks."""
    return _Conjugate.apply(x, _identity, _all_reduce)


def reduce_from_region(x):
    """g: leave a tensor-parallel region by summing the ranks' partial results."""
    return _Conjugate.apply(x, _all_reduce, _identity)


def scatter_to_region(x):
    """Keep this rank's chunk of the last dim (backward: all-gather the gradient chunks)."""
    return _Conjugate.apply(x, lambda t: _split(t, -1), lambda t: _gather(t, -1))


def gather_from_region(x):
    """Concatenate the ranks' chunks of the last dim (backward: keep this rank's chunk of the grad)."""
    return _Conjugate.apply(x, lambda t: _gather(t, -1), lambda t: _split(t, -1))


def scatter_to_sequence_region(x, dim=SEQUENCE_DIM):
    """Enter sequence parallel: keep this rank's s/T positions (backward: all-gather the grads)."""
    return _Conjugate.apply(x, lambda t: _split(t, dim), lambda t: _gather(t, dim))


def gather_from_sequence_region(x, dim=SEQUENCE_DIM, tensor_parallel_output_grad=True):
    """All-gather the sequence before a column-parallel layer (replaces f).

    Backward: the consumer is tensor-parallel, so each rank's gradient is a partial sum: reduce-scatter.
    With tensor_parallel_output_grad=False (every rank computed the full gradient) just keep the chunk.
    """
    backward = (lambda t: _reduce_scatter(t, dim)) if tensor_parallel_output_grad else (lambda t: _split(t, dim))
    return _Conjugate.apply(x, lambda t: _gather(t, dim), backward)


def reduce_scatter_to_sequence_region(x, dim=SEQUENCE_DIM):
    """Leave a row-parallel layer under sequence parallel: sum the partial outputs, keep s/T positions
    (replaces g). Backward: all-gather the gradient."""
    return _Conjugate.apply(x, lambda t: _reduce_scatter(t, dim), lambda t: _gather(t, dim))


# Megatron-LM's names for the same operators (megatron/core/tensor_parallel/mappings.py)
copy_to_tensor_model_parallel_region = copy_to_region
reduce_from_tensor_model_parallel_region = reduce_from_region
scatter_to_tensor_model_parallel_region = scatter_to_region
gather_from_tensor_model_parallel_region = gather_from_region
scatter_to_sequence_parallel_region = scatter_to_sequence_region
gather_from_sequence_parallel_region = gather_from_sequence_region
reduce_scatter_to_sequence_parallel_region = reduce_scatter_to_sequence_region
