"""Models trained by ds_lab: a small nanoGPT-style causal language model, and its tensor-parallel form."""

from .gpt import GPT, GPTConfig, GPTOutput
from .gpt_tp import GPTTP

__all__ = ["GPT", "GPTConfig", "GPTOutput", "GPTTP"]
