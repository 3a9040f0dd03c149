"""Text generation from a causal language model: greedy, temperature, top-k and top-p sampling.

    from ds_lab.generate import generate
    generate(model, "And the LORD said", max_new_tokens=80, temperature=0.7, top_p=0.9, seed=0)

One token at a time: run the model on the text so far (its last `block_size` tokens), take the
logits z of the last position, turn them into a distribution, draw the next token, append it.
The distribution (`next_token_probs`) is, in this order:

    temperature T > 0   p = softmax(z / T)               T < 1 sharpens, T > 1 flattens
    top_k = k           keep the k most probable tokens (ties at the k-th value are all kept)
    top_p = p           keep the smallest set of most probable tokens whose probability adds up
                        to at least p (the "nucleus", Holtzman et al. 2020); the most probable
                        token is always kept
                        then renormalise what is kept to sum to 1
    temperature 0       greedy: all mass on argmax z (the first one, on a tie); top_k and
                        top_p cannot change that, since both always keep the most probable token

top_k=1 is greedy too, and as T -> 0 softmax(z / T) tends to greedy's one-hot. top_p is applied
to the distribution top_k left, renormalised, as Hugging Face's samplers do. With a `seed`, the
draws come from a generator of their own, so the same call gives the same text on any run.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ds_lab.data import ByteTokenizer


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None) -> torch.Tensor:
    """The distribution the next token is drawn from, for logits of shape (..., vocab)."""
    if temperature < 0:
        raise ValueError(f"temperature {temperature} is negative; use 0 for greedy or a positive value")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k {top_k} keeps no token; use top_k >= 1, or None for no limit")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p {top_p} must be in (0, 1]; 1 (or None) keeps every token")
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    probs = F.softmax(logits / temperature, dim=-1)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # A token stays if the tokens more probable than it add up to less than p: that keeps the
        # smallest prefix reaching p, and always the first token.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@torch.no_grad()
def generate(model, prompt: Union[str, Sequence[int], torch.Tensor], max_new_tokens: int,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             seed: Optional[int] = None):
    """Continue `prompt` by `max_new_tokens` tokens.

    model: called as model(input_ids) with input_ids of shape (1, T); must return logits of shape
        (1, T, vocab), as `.logits` or directly. Its `config.block_size`, when it has one, bounds
        the context it sees.
    prompt: a str (encoded with the byte tokenizer; the result is then a str, prompt included) or
        token ids (the result is then a list of ids, prompt included).
    temperature, top_k, top_p: see `next_token_probs`. seed: None draws from torch's global
        generator; an int makes the draws reproducible.
    """
    as_text = isinstance(prompt, str)
    ids = ByteTokenizer().encode(prompt) if as_text else [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty; give at least one token to continue from")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    block_size = getattr(getattr(model, "config", None), "block_size", None) or len(ids) + max_new_tokens
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        for _ in range(max_new_tokens):
            context = torch.tensor([ids[-block_size:]], dtype=torch.long)
            out = model(context)
            logits = getattr(out, "logits", out)[0, -1]
            probs = next_token_probs(logits, temperature, top_k, top_p)
            ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    finally:
        if was_training:
            model.train()
    return ByteTokenizer().decode(ids) if as_text else ids
