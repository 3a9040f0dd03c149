"""Byte-level tokenizer: token id = byte value, so the vocabulary is exactly 256.

No training, no merges, no files: every string round-trips, and a model's vocab_size is 256.
The shipped corpus is pure ASCII, so one character is one token.

    tok = ByteTokenizer()
    ids = tok("In the beginning")["input_ids"]   # LongTensor of shape (1, 16)
    tok.decode(ids[0])                          # 'In the beginning'
"""

import torch


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """ids: a list of ints or a 1-D tensor (for a batch, decode one row at a time)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence, got a tensor of shape {tuple(ids.shape)}; pass ids[0]")
            ids = ids.tolist()
        # A sampled model can emit byte sequences that are not valid UTF-8; show them, don't fail.
        return bytes(ids).decode("utf-8", errors="replace")

    def __call__(self, text: str) -> dict:
        """HF-style convenience: {"input_ids": LongTensor of shape (1, len)}, a batch of one."""
        return {"input_ids": torch.tensor([self.encode(text)], dtype=torch.long)}
