"""The training corpus and a data-parallel loader whose batches do not depend on the world size.

`DistributedLoader` is built for equivalence tests between a single process and N ranks.
Draw i seeds a fresh generator from (seed, i), draws micro_batch_size * dp_size random start
offsets into the token stream, and rank r keeps offsets [r * mb, (r + 1) * mb). So:

    concat(rank 0's batch(i), ..., rank N-1's batch(i))
        == DistributedLoader(tokens, seq_len, mb * N).batch(i)      # dp_size=1
        == any rank's global_batch(i)

i.e. N ranks at micro-batch mb see, between them, exactly the batch one process sees at
micro-batch mb * N. With gradient accumulation, step s consumes draws s*gas ... s*gas + gas - 1.
Because draw i depends only on (seed, i), resuming is just restoring i (`state_dict`).
"""

from functools import lru_cache
from importlib import resources

import torch

CORPUS_FILE = "kjv_narrative.txt"


def load_corpus() -> str:
    """The KJV narrative books shipped with the package (see README.md here)."""
    return resources.files("ds_lab.data").joinpath(CORPUS_FILE).read_text(encoding="ascii")


@lru_cache(maxsize=1)
def corpus_tokens() -> torch.Tensor:
    """The corpus as byte ids, a 1-D LongTensor. Cached and shared: do not modify it in place."""
    return torch.frombuffer(bytearray(load_corpus().encode("ascii")), dtype=torch.uint8).long()


def train_val_split(tokens: torch.Tensor, val_fraction: float = 0.1):
    """(train, val): the last val_fraction of the stream is held out, contiguously, so no
    validation sequence overlaps a training one except at the single boundary."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} must be strictly between 0 and 1")
    n_train = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:n_train], tokens[n_train:]


class DistributedLoader:
    def __init__(self, tokens, seq_len, micro_batch_size, dp_rank=0, dp_size=1, seed=0):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if len(tokens) < seq_len:
            raise ValueError(f"{len(tokens)} tokens cannot fill one sequence of seq_len {seq_len}; lower seq_len")
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.position = 0  # index of the next draw __next__ returns

    def _offsets(self, i, count):
        # One generator per draw, seeded from (seed, i) alone: draw i is the same whoever
        # asks, in whatever order, and never depends on how many draws came before.
        # torch's CPU generator keeps only the low 32 bits of a seed, so (seed, i) is folded
        # into 32 bits: i + seed * (odd constant) never repeats within a run (i < 2**32), and
        # two seeds only meet at draw distances near (seed difference) * 0x9E3779B1 mod 2**32.
        if not 0 <= i < 2**32:
            raise ValueError(f"draw index {i} must be in [0, 2**32)")
        generator = torch.Generator().manual_seed((i + self.seed * 0x9E3779B1) % 2**32)
        return torch.randint(0, len(self.tokens) - self.seq_len + 1, (count,), generator=generator)

    def _sequences(self, offsets):
        input_ids = torch.stack([self.tokens[o : o + self.seq_len] for o in offsets.tolist()])
        # HF convention: labels equal input_ids; the model shifts them to predict the next token.
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    def batch(self, i):
        """This rank's micro-batch of draw i."""
        offsets = self._offsets(i, self.micro_batch_size * self.dp_size)
        mb = self.micro_batch_size
        return self._sequences(offsets[self.dp_rank * mb : (self.dp_rank + 1) * mb])

    def global_batch(self, i, global_batch_size=None):
        """What a single process with micro_batch_size=global_batch_size sees at draw i;
        by default that is all ranks' batch(i) concatenated in rank order."""
        if global_batch_size is None:
            global_batch_size = self.micro_batch_size * self.dp_size
        return self._sequences(self._offsets(i, global_batch_size))

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch(self.position)
        self.position += 1
        return batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]
