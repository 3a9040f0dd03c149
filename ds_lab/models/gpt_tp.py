"""The ds_lab GPT split over T tensor-parallel ranks (Megatron-LM), equal to the one-process GPT.

    initialize_model_parallel(tensor_model_parallel_size=2)    # on every rank
    model_parallel_manual_seed(0)                              # same default seed everywhere
    model = GPTTP(GPTConfig(n_head=4, n_embd=36))              # the full GPT, built, then sharded
    engine, *_ = ds_lab.initialize(model=model, config=...)     # partners see the same micro-batch

Per block (h hidden, s sequence, b batch):
    attention  qkv: ColumnParallelLinear (stride 3: rank i takes heads i*n_head/T ..), attention on the
               rank's heads alone, out-projection: RowParallelLinear    -> f before, g after
    MLP        c_fc: ColumnParallelLinear, GeLU, c_proj: RowParallelLinear -> f before, g after
so 2 all-reduces of b*s*h elements forward and 2 backward per block. The token embedding and the
(tied or untied) head are VocabParallelEmbedding; the loss is vocab_parallel_cross_entropy, so the
b*s*V logits are never gathered (`out.logits` is this rank's vocabulary shard).

sequence_parallel=True (Megatron-SP): LayerNorms, dropouts and the residual stream hold s/T positions
per rank; the column layers all-gather the sequence and the row layers reduce-scatter it, in place
of f and g (the same bytes on the wire), and saved activations there shrink by 1/T. LayerNorm
weights and row-parallel biases then have partial gradients, summed over the tensor group in backward.

Parameter names are gpt.py's, so `full_state_dict()` (gathers the shards) is loadable into `GPT`.
The full model is made first on every rank with the same RNG, then sharded: the same seed gives the
same weights as one process (at the cost of the full model's memory, briefly, during construction).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_lab.models.gpt import GPT, GPTConfig, GPTOutput
from ds_lab.parallel import (ColumnParallelLinear, LayerNorm, RowParallelLinear, VocabParallelEmbedding,
                             gather_parameter, get_rng_tracker, model_parallel_world_size, parallel_lm_logits,
                             scatter_to_sequence_region, tensor_parallel_dropout, vocab_parallel_cross_entropy)


def _dropout(x, p, training, per_rank: bool):
    """Dropout on a replicated tensor uses the shared stream; on a shard, the per-rank stream."""
    if p == 0.0 or not training:
        return x
    return tensor_parallel_dropout(x, p, training) if per_rank else F.dropout(x, p, training)


class ParallelAttention(nn.Module):
    def __init__(self, full, config: GPTConfig, sequence_parallel: bool):
        super().__init__()
        size = model_parallel_world_size()
        if config.n_head % size:
            raise ValueError(f"n_head {config.n_head} is not divisible by the tensor-parallel size {size}; "
                             f"each rank takes whole heads: choose n_head a multiple of {size}")
        self.c_attn = ColumnParallelLinear.from_full(full.c_attn, stride=3, sequence_parallel=sequence_parallel)
        self.c_proj = RowParallelLinear.from_full(full.c_proj, sequence_parallel=sequence_parallel)
        self.local_heads = config.n_head // size
        self.dropout, self.sequence_parallel = config.dropout, sequence_parallel

    def forward(self, x):
        qkv = self.c_attn(x)  # (B, s, 3 * h/T): this rank's heads, whole sequence
        B, S, width = qkv.shape
        q, k, v = (t.view(B, S, self.local_heads, -1).transpose(1, 2) for t in qkv.split(width // 3, dim=2))
        if self.training and self.dropout > 0:
            with get_rng_tracker().fork():  # attention probabilities of this rank's heads: a shard
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = self.c_proj(y.transpose(1, 2).reshape(B, S, width // 3))
        return _dropout(y, self.dropout, self.training, self.sequence_parallel)


class ParallelMLP(nn.Module):
    def __init__(self, full, config: GPTConfig, sequence_parallel: bool):
        super().__init__()
        self.c_fc = ColumnParallelLinear.from_full(full.c_fc, sequence_parallel=sequence_parallel)
        self.c_proj = RowParallelLinear.from_full(full.c_proj, sequence_parallel=sequence_parallel)
        self.dropout, self.sequence_parallel = config.dropout, sequence_parallel

    def forward(self, x):
        y = self.c_proj(F.gelu(self.c_fc(x)))
        return _dropout(y, self.dropout, self.training, self.sequence_parallel)


class ParallelBlock(nn.Module):
    def __init__(self, full, config: GPTConfig, sequence_parallel: bool):
        super().__init__()
        self.ln_1 = LayerNorm.from_full(full.ln_1, sequence_parallel=sequence_parallel)
        self.attn = ParallelAttention(full.attn, config, sequence_parallel)
        self.ln_2 = LayerNorm.from_full(full.ln_2, sequence_parallel=sequence_parallel)
        self.mlp = ParallelMLP(full.mlp, config, sequence_parallel)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPTTP(nn.Module):
    """gpt.GPT, tensor-parallel over the model group. `full`: a GPT to shard (default: build one now)."""

    def __init__(self, config: GPTConfig, sequence_parallel: bool = False, full: Optional[GPT] = None):
        super().__init__()
        full = full if full is not None else GPT(config)
        self.config, self.sequence_parallel = config, sequence_parallel
        self.wte = VocabParallelEmbedding.from_full(full.wte, reduce_scatter_embeddings=sequence_parallel)
        self.wpe = nn.Embedding.from_pretrained(full.wpe.weight.detach().clone(), freeze=False)
        self.blocks = nn.ModuleList(ParallelBlock(b, config, sequence_parallel) for b in full.blocks)
        self.ln_f = LayerNorm.from_full(full.ln_f, sequence_parallel=sequence_parallel)
        self.lm_head = VocabParallelEmbedding.from_full(full.lm_head)  # the output layer: [V/T, h] rows
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight

    def num_parameters(self) -> int:
        """This rank's parameters (its shards, the vocabulary padding, and the replicated ones)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, labels=None, attention_mask=None) -> GPTOutput:
        """As GPT.forward; `logits` are this rank's columns of the (padded) vocabulary."""
        B, S = input_ids.shape
        if S > self.config.block_size:
            raise ValueError(f"sequence length {S} exceeds block_size {self.config.block_size}; "
                             "shorten the input or raise GPTConfig.block_size")
        positions = self.wpe(torch.arange(S, device=input_ids.device))
        if self.sequence_parallel:
            size = model_parallel_world_size()
            if S % size:
                raise ValueError(f"sequence_parallel: sequence length {S} is not divisible by the "
                                 f"tensor-parallel size {size}; pad the batch to a multiple of {size}")
            # wte reduce-scatters to this rank's positions; wpe's gradient is all-gathered back
            x = self.wte(input_ids) + scatter_to_sequence_region(positions, dim=0)
        else:
            x = self.wte(input_ids) + positions
        x = _dropout(x, self.config.dropout, self.training, self.sequence_parallel)
        for block in self.blocks:
            x = block(x)
        logits = parallel_lm_logits(self.ln_f(x), self.lm_head, self.sequence_parallel)

        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            if attention_mask is not None:
                targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
            loss = vocab_parallel_cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1))
        return GPTOutput(loss=loss, logits=logits)

    def full_state_dict(self) -> dict:
        """gpt.GPT's state_dict, whole: every shard gathered (collective over the tensor group)."""
        return {name: gather_parameter(t) for name, t in self.state_dict(keep_vars=True).items()}
