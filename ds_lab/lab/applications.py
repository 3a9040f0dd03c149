"""Applications (chapter 08): train a small GPT on prose or on code, score it per token, complete text.

    results = ds_lab.launch(train_language_model, 2, tokens, MODEL, steps=200, dashboard=Dashboard())
    model = model_from(results[0])                 # the trained GPT, on the caller's side
    per_token_loss(model, held_out, MODEL["block_size"])

The code corpus is ds_lab's own Python sources (Apache-2.0), concatenated once by
scripts/build_code_corpus.py into ds_lab/data/code_corpus.txt; see ds_lab/data/README.md.
"""
from __future__ import annotations

import math
from importlib import resources

import torch
import torch.nn.functional as F

import ds_lab
from ds_lab import comm
from ds_lab.data import DistributedLoader
from ds_lab.models import GPT, GPTConfig

CODE_CORPUS_FILE = "code_corpus.txt"
FILE_MARKER = "# ==== file: "  # the line that starts each source file in the code corpus


def code_corpus_text() -> str:
    """ds_lab's Python sources as shipped in ds_lab/data/code_corpus.txt (UTF-8)."""
    return resources.files("ds_lab.data").joinpath(CODE_CORPUS_FILE).read_text(encoding="utf-8")


def code_corpus_tokens() -> torch.Tensor:
    """The code corpus as byte ids (UTF-8 bytes: a non-ASCII character is several tokens)."""
    return torch.tensor(list(code_corpus_text().encode("utf-8")), dtype=torch.long)


def corpus_files(text: str) -> list:
    """The file paths the code corpus holds, in order."""
    return [line[len(FILE_MARKER):] for line in text.splitlines() if line.startswith(FILE_MARKER)]


def train_language_model(tokens: torch.Tensor, model: dict, steps: int, global_batch: int = 16, lr: float = 3e-3,
                         warmup: int = 20, seed: int = 0) -> dict:
    """Runs on every rank: train a GPT on `tokens` with the engine (data parallel, AdamW, warmup then
    cosine decay, gradient clipping 1.0). Each rank draws its own rows of every global batch from a
    DistributedLoader (dp_rank = rank), so N ranks see exactly what one process would see.

    Returns the rank's losses per step and its final weights (the same on every rank)."""
    rank, world_size = comm.get_rank(), comm.get_world_size()
    if global_batch % world_size:
        raise ValueError(f"global_batch {global_batch} is not divisible by {world_size} ranks; "
                         f"pick a multiple of the world size")
    torch.manual_seed(seed)  # the same initial weights on every rank
    gpt = GPT(GPTConfig(**model))
    config = {"train_batch_size": global_batch, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.95]}},
              "scheduler": {"type": "WarmupCosineLR",
                            "params": {"total_num_steps": steps, "warmup_num_steps": warmup}}}
    engine, *_ = ds_lab.initialize(model=gpt, config=config)
    loader = DistributedLoader(tokens, model["block_size"], global_batch // world_size, rank, world_size, seed=seed)
    losses = []
    for _ in range(steps):
        batch = next(loader)
        loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    state = {name: t.detach().clone() for name, t in engine.module.state_dict().items()}
    return dict(losses=losses, state_dict=state, model=model)


def model_from(result: dict) -> GPT:
    """The GPT a rank trained, rebuilt from its result on the caller's side, in eval mode."""
    gpt = GPT(GPTConfig(**result["model"]))
    gpt.load_state_dict(result["state_dict"])
    return gpt.eval()


def untrained_model(model: dict, seed: int = 0) -> GPT:
    """The GPT every rank starts from (same seed), before any step."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**model)).eval()


@torch.no_grad()
def per_token_loss(model, tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """-log p(token | the tokens before it), in nats, for every token of `tokens` but the first.

    The text is cut into windows of block_size tokens that overlap by one, so every token is
    predicted exactly once; a token early in a window sees little context, as in training."""
    step = block_size - 1
    starts = list(range(0, len(tokens) - 1, step))
    full = [s for s in starts if s + block_size <= len(tokens)]
    out = []
    if full:  # all whole windows in one batch
        windows = torch.stack([tokens[s:s + block_size] for s in full])
        logits = model(windows).logits[:, :-1]
        out.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), windows[:, 1:].reshape(-1),
                                   reduction="none"))
    if len(full) < len(starts) and len(tokens) - starts[len(full)] >= 2:  # the short window at the end
        window = tokens[starts[len(full)]:].unsqueeze(0)
        logits = model(window).logits[0, :-1]
        out.append(F.cross_entropy(logits.float(), window[0, 1:], reduction="none"))
    return torch.cat(out)


def mean_loss(model, tokens: torch.Tensor, block_size: int) -> float:
    """Mean per-token loss in nats (divide by ln 2 for bits per byte)."""
    return per_token_loss(model, tokens, block_size).mean().item()


def bits_per_byte(nats: float) -> float:
    return nats / math.log(2)


def draw_token_losses(text: str, curves: dict, title: str = "", figsize=(10, 3)):
    """Per-token loss along a passage, one line per model (curves: label -> tensor of len(text) - 1)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses.tolist(), label=f"{label} (mean {losses.mean():.2f})", lw=1)
    ax.set_xticks(range(1, len(text)))
    ax.set_xticklabels([c if c.strip() else "·" for c in text[1:]], fontsize=7, family="monospace")
    ax.set_ylabel("loss (nats)"), ax.set_title(title), ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw_training(curves: dict, title: str = "", figsize=(8, 3.5)):
    """Training loss against step, one line per run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=label)
    ax.set_xlabel("step"), ax.set_ylabel("training loss (nats per byte)"), ax.set_title(title), ax.legend()
    fig.tight_layout()
    return fig
