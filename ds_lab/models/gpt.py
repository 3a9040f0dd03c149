"""A small GPT (nanoGPT-style causal language model) for every ds_lab experiment.

Token + position embeddings, `n_layer` pre-LayerNorm blocks (causal self-attention with a
fused qkv projection, then a 4x GELU MLP), a final LayerNorm, and an lm_head tied to the token
embedding. The defaults (byte vocabulary, 4 layers of width 128) train on a CPU in minutes.

    from ds_lab.models import GPT, GPTConfig
    model = GPT(GPTConfig())
    out = model(input_ids, labels=input_ids)   # HF convention: the model shifts labels itself
    out.loss.backward()

Odd parameter counts (to exercise uneven ZeRO shards and padding): every count is even while
`n_embd` is even, so pick an odd `n_embd` (with an `n_head` that divides it). Then the total is
odd when `bias=False`, or when `bias=True` and `vocab_size + block_size + n_layer` is odd:

    GPT(GPTConfig(n_embd=35, n_head=5, bias=False)).num_parameters()      # 72_555, odd
    GPT(GPTConfig(vocab_size=257, n_embd=35, n_head=5)).num_parameters()  # 74_165, indivisible by 2, 3, 4

On a GPU with CuPy (and the engine's `fused_kernels` on) the LayerNorms run kernels/layer_norm.cu
and the MLP's bias + GeLU kernels/bias_gelu.cu (ds_lab.ops); attention stays torch's fused
scaled_dot_product_attention. On a CPU every layer is plain torch.
"""

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_lab.ops import backend as kernel_backend
from ds_lab.ops.gelu import bias_gelu
from ds_lab.ops.norm import layer_norm as fused_layer_norm


@dataclass
class GPTConfig:
    vocab_size: int = 256  # bytes; see ds_lab.data.ByteTokenizer
    block_size: int = 128  # longest sequence the position embedding covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    tie_weights: bool = True  # lm_head shares the token embedding matrix


@dataclass
class GPTOutput:
    """What `GPT.forward` returns; readable as `out.loss` or `out["loss"]`, like HF's ModelOutput."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None

    def __getitem__(self, key):
        if isinstance(key, int):  # HF's positional access skips fields that are None
            return tuple(v for v in (self.loss, self.logits) if v is not None)[key]
        if key not in {f.name for f in fields(self)}:
            raise KeyError(f"GPTOutput has no field {key!r}; it has 'loss' and 'logits'")
        return getattr(self, key)


class Linear(nn.Linear):
    """nn.Linear initialised GPT-2 style (normal(0, std) weights, zero bias) inside its own
    constructor. Every weight is initialised by the module that owns it, never afterwards by a
    parent, so `ds_lab.zero.Init` can partition each module the moment it is built."""

    def __init__(self, in_features, out_features, bias=True, std=0.02):
        super().__init__(in_features, out_features, bias=bias)
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim, std=0.02):
        super().__init__(num_embeddings, embedding_dim)
        nn.init.normal_(self.weight, mean=0.0, std=std)


def residual_std(config) -> float:
    """GPT-2: each residual projection adds to the stream once per layer, twice per block;
    scaling its init by 1/sqrt(2 * n_layer) keeps the stream's variance independent of depth."""
    return 0.02 / math.sqrt(2 * config.n_layer)


def _fused(x: torch.Tensor) -> bool:
    """Whether the fused kernels run this layer: where they can (a GPU with CuPy) and the engine's
    `fused_kernels` switch allows (ds_lab/ops/backend.py). On a CPU the layers are plain torch."""
    return kernel_backend.resolve(None, x) != "torch"


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same checkpoints) that runs kernels/layer_norm.cu when fused."""

    def forward(self, x):
        if _fused(x):
            return fused_layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(
                f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}; "
                "choose n_head so that each head gets n_embd // n_head whole dimensions"
            )
        # One Linear for q, k and v: a single matmul instead of three.
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias, std=residual_std(config))
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias, std=residual_std(config))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if _fused(x) and self.c_fc.bias is not None:  # x W^T, then bias + GeLU in one kernel
            return self.dropout(self.c_proj(bias_gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias,
                                                      approximate="none")))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        # Pre-LN: the residual stream itself is never normalized, which keeps deep stacks stable.
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = Embedding(config.vocab_size, config.n_embd)
        self.wpe = Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # One matrix both embeds tokens and scores them: fewer parameters, and the
            # input and output views of a token stay consistent.
            self.lm_head.weight = self.wte.weight
        self.checkpoint_function = None  # set by gradient_checkpointing_enable

    def gradient_checkpointing_enable(self, checkpoint_function=None) -> None:
        """Recompute each block in backward instead of keeping its activations (HF's name): a block
        then keeps only its input, b*s*h elements, instead of 16*b*s*h. `checkpoint_function(block,
        x)`: default torch.utils.checkpoint; pass `deepspeed.checkpointing.checkpoint` for DeepSpeed's
        (partitioned activations over the model-parallel group, ...)."""
        if checkpoint_function is None:
            from torch.utils.checkpoint import checkpoint

            def checkpoint_function(block, x):
                return checkpoint(block, x, use_reentrant=False)
        self.checkpoint_function = checkpoint_function

    def gradient_checkpointing_disable(self) -> None:
        self.checkpoint_function = None

    def num_parameters(self) -> int:
        """Unique parameters: a tied matrix counts once (`parameters()` already deduplicates)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, labels=None, attention_mask=None) -> GPTOutput:
        """Logits for every position; the loss too when `labels` are given.

        labels: aligned with input_ids (HuggingFace convention); position t's logits are scored
            against labels[t + 1], and label -100 is ignored. The loss is the mean cross-entropy
            over the tokens that are not ignored.
        attention_mask: 1 for real tokens, 0 for padding. It only removes padded positions from
            the loss; attention is causal and not masked further, which is exact for
            right-padded batches (no real token ever sees a pad that comes after it).
        """
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size {self.config.block_size}; "
                "shorten the input or raise GPTConfig.block_size"
            )
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        recompute = self.checkpoint_function is not None and torch.is_grad_enabled()
        for block in self.blocks:
            x = self.checkpoint_function(block, x) if recompute else block(x)
        logits = self.lm_head(self.ln_f(x))

        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            if attention_mask is not None:
                targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=-100,
            )
        return GPTOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None):
        """Sample `max_new_tokens` tokens after `input_ids` (B, T); returns (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            context = input_ids[:, -self.config.block_size :]
            logits = self(context).logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            input_ids = torch.cat([input_ids, next_id], dim=1)
        return input_ids
