"""Models trained by ds_lab: a small nanoGPT-style causal language model."""

from .gpt import GPT, GPTConfig, GPTOutput

__all__ = ["GPT", "GPTConfig", "GPTOutput"]
