"""Data for ds_lab: a byte tokenizer, the shipped KJV corpus, and a data-parallel loader."""

from .loader import DistributedLoader, corpus_tokens, load_corpus, train_val_split
from .tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "load_corpus", "corpus_tokens", "train_val_split", "DistributedLoader"]
