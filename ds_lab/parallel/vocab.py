"""The vocabulary split over T ranks: embedding lookup, output logits and cross-entropy, never whole.

Rank i holds rows [i*V/T, (i+1)*V/T) of the embedding matrix E [V, h].

    lookup      y = g( mask_i(x) E_i )      a token outside rank i's rows contributes zeros; the
                                             all-reduce g adds the one rank that has it (b*s*h elements)
    logits      z_i = f(h) E_i^T            this rank's V/T columns of the logits (tied or untied head)
    loss        l = log sum_v exp(z_v - m) - (z_t - m),   m = max_v z_v

The cross-entropy needs three all-reduces of b*s numbers each (the max, the target's logit, the sum
of exponentials), never the b*s*V logits: the full vocabulary is never gathered. Its gradient is
softmax(z_i) - onehot_i(t), computed locally.

A vocabulary not divisible by T is padded up to the next multiple (Megatron does the same, with a
warning); the padded rows are zero, never looked up, and their logits are set to -inf, so they have
zero probability and zero gradient: training equals the unpadded model exactly.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_lab import comm
from ds_lab.parallel.layers import make_tensor_parallel, shard_tensor
from ds_lab.parallel.mappings import (copy_to_region, gather_from_sequence_region, reduce_from_region,
                                      reduce_scatter_to_sequence_region)
from ds_lab.parallel.state import model_parallel_group, model_parallel_rank, model_parallel_world_size


def padded_vocab_size(num_embeddings: int, size: int) -> int:
    return -(-num_embeddings // size) * size


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding with its rows split over the tensor ranks (padded to a multiple of T).

    reduce_scatter_embeddings=True (sequence parallel): the partial lookups are reduce-scattered over
    the sequence instead of all-reduced, so each rank leaves with its s/T positions.
    The same module serves as the output layer (`parallel_lm_logits`), tied to the input or not.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, reduce_scatter_embeddings: bool = False,
                 full: Optional[torch.Tensor] = None):
        super().__init__()
        size, rank = model_parallel_world_size(), model_parallel_rank()
        if full is None:
            full = nn.Embedding(num_embeddings, embedding_dim).weight.detach()
        padded = padded_vocab_size(num_embeddings, size)
        if padded != num_embeddings:
            warnings.warn(f"VocabParallelEmbedding: vocabulary {num_embeddings} is not divisible by the "
                          f"tensor-parallel size {size}; padded to {padded} (padded rows are never used)")
            full = torch.cat([full, full.new_zeros(padded - num_embeddings, embedding_dim)])
        self.num_embeddings, self.embedding_dim, self.padded_size = num_embeddings, embedding_dim, padded
        self.per_rank = padded // size
        self.vocab_start = rank * self.per_rank
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        self.weight = make_tensor_parallel(nn.Parameter(shard_tensor(full, 0)), 0)
        self.weight.unpadded_size = num_embeddings  # gather_parameter cuts the padding off

    @classmethod
    def from_full(cls, module: nn.Module, reduce_scatter_embeddings: bool = False) -> "VocabParallelEmbedding":
        """This rank's rows of an nn.Embedding, or of an output nn.Linear (weight [V, h] too)."""
        num, dim = module.weight.shape
        return cls(num, dim, reduce_scatter_embeddings=reduce_scatter_embeddings, full=module.weight.detach())

    def forward(self, input_ids):
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_start + self.per_rank)
        local = (input_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_region(partial)
        return reduce_from_region(partial)

    def mask_padding(self, logits_shard):
        """-inf on the padded vocabulary columns: zero probability, zero gradient."""
        real = self.num_embeddings - self.vocab_start  # how many of this rank's columns are real
        if real >= self.per_rank:
            return logits_shard
        pad = torch.arange(self.per_rank, device=logits_shard.device) >= real
        return logits_shard.masked_fill(pad, float("-inf"))

    def extra_repr(self):
        return (f"{self.num_embeddings} (padded {self.padded_size}; this rank: rows {self.vocab_start}.."
                f"{self.vocab_start + self.per_rank - 1}), {self.embedding_dim}")


def parallel_lm_logits(hidden, head: VocabParallelEmbedding, sequence_parallel: bool = False):
    """This rank's vocabulary columns of the logits: f(h) E_i^T (under SP: all-gather h's sequence
    first, reduce-scatter its gradient). Returns [.., V_padded / T] with the padding at -inf."""
    hidden = gather_from_sequence_region(hidden) if sequence_parallel else copy_to_region(hidden)
    return head.mask_padding(F.linear(hidden, head.weight))


def _all_reduce(t, op=comm.ReduceOp.SUM):
    if model_parallel_world_size() > 1:
        with comm.tag("tp_cross_entropy"):
            comm.all_reduce(t, op=op, group=model_parallel_group())
    return t


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        width = logits.shape[-1]
        start = model_parallel_rank() * width
        logits_max = _all_reduce(logits.max(dim=-1).values.clone(), comm.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)
        mine = (target >= start) & (target < start + width)
        index = (target - start).clamp(0, width - 1)
        target_logit = shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        target_logit = _all_reduce(torch.where(mine, target_logit, torch.zeros_like(target_logit)))
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1))
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), mine, index)  # softmax, in place
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, mine, index = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, index.unsqueeze(-1), -mine.unsqueeze(-1).to(grad.dtype))
        return grad * grad_loss.unsqueeze(-1), None


def vocab_parallel_cross_entropy(logits_shard, target, ignore_index: int = -100, reduction: str = "mean"):
    """F.cross_entropy(full_logits, target) computed from this rank's vocabulary columns.

    logits_shard: [N, V/T] (rank i's contiguous columns; padded columns at -inf); target: [N] ids.
    reduction: "mean" over targets != ignore_index (as F.cross_entropy), "sum", or "none" (per token).
    """
    loss = _VocabParallelCrossEntropy.apply(logits_shard, target)
    keep = target != ignore_index
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / keep.sum()
    raise ValueError(f"reduction {reduction!r}: use 'mean', 'sum' or 'none'")
