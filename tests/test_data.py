"""Specification of ds_lab.data: the shipped corpus, the byte tokenizer, the data-parallel loader."""

import pytest
import torch

from ds_lab.data import ByteTokenizer, DistributedLoader, corpus_tokens, load_corpus, train_val_split


def test_corpus_is_the_shipped_ascii_kjv_narrative():
    text = load_corpus()
    assert len(text) == 815_886
    assert text.isascii()
    assert text.startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")


def test_corpus_tokens_are_its_bytes_and_cached():
    tokens = corpus_tokens()
    assert tokens.dtype == torch.long and tokens.shape == (815_886,)
    assert ByteTokenizer().decode(tokens[:9]) == "Genesis 1"
    assert corpus_tokens() is tokens


def test_train_val_split_holds_out_the_tail():
    tokens = torch.arange(100)
    train, val = train_val_split(tokens, val_fraction=0.1)
    assert torch.equal(torch.cat([train, val]), tokens) and len(val) == 10
    with pytest.raises(ValueError):
        train_val_split(tokens, val_fraction=1.0)


def test_tokenizer_round_trips_text_and_tensors():
    tok = ByteTokenizer()
    text = "And God said, Let there be light: and there was light. caf\u00e9"
    assert tok.decode(tok.encode(text)) == text
    ids = tok(text)["input_ids"]
    assert ids.dtype == torch.long and ids.shape == (1, len(text.encode()))
    assert tok.decode(ids[0]) == text
    assert tok.vocab_size == 256


TOKENS = torch.arange(10_000)  # distinct values make every offset recoverable from a batch


@pytest.mark.parametrize("dp_size", [2, 3, 4])
def test_ranks_together_see_exactly_the_single_process_batch(dp_size):
    mb = 3
    single = DistributedLoader(TOKENS, seq_len=8, micro_batch_size=mb * dp_size, seed=5)
    ranks = [DistributedLoader(TOKENS, 8, mb, dp_rank=r, dp_size=dp_size, seed=5) for r in range(dp_size)]
    for i in range(4):
        joined = torch.cat([loader.batch(i)["input_ids"] for loader in ranks])
        assert torch.equal(joined, single.batch(i)["input_ids"])
        assert torch.equal(joined, ranks[1].global_batch(i)["input_ids"])
        assert torch.equal(joined, ranks[0].global_batch(i, mb * dp_size)["input_ids"])
        assert not torch.equal(ranks[0].batch(i)["input_ids"], ranks[1].batch(i)["input_ids"])


def test_batches_are_contiguous_windows_with_labels_equal_to_inputs():
    batch = DistributedLoader(TOKENS, seq_len=8, micro_batch_size=4).batch(0)
    ids = batch["input_ids"]
    assert ids.shape == (4, 8) and ids.dtype == torch.long
    assert torch.equal(batch["labels"], ids)
    assert torch.equal(ids - ids[:, :1], torch.arange(8).expand(4, 8))


def test_same_seed_same_batches_and_different_draws_or_seeds_differ():
    a = DistributedLoader(TOKENS, 8, 4, seed=1)
    b = DistributedLoader(TOKENS, 8, 4, seed=1)
    c = DistributedLoader(TOKENS, 8, 4, seed=2)
    assert torch.equal(a.batch(3)["input_ids"], b.batch(3)["input_ids"])
    assert not torch.equal(a.batch(3)["input_ids"], a.batch(4)["input_ids"])
    assert not torch.equal(a.batch(3)["input_ids"], c.batch(3)["input_ids"])


def test_iteration_yields_draws_in_order_and_resumes_from_state_dict():
    loader = DistributedLoader(TOKENS, 8, 2, dp_rank=1, dp_size=3, seed=4)
    first = [next(loader)["input_ids"] for _ in range(5)]
    for i, ids in enumerate(first):
        assert torch.equal(ids, loader.batch(i)["input_ids"])

    state = loader.state_dict()
    expected = [next(loader)["input_ids"] for _ in range(3)]
    resumed = DistributedLoader(TOKENS, 8, 2, dp_rank=1, dp_size=3, seed=4)
    resumed.load_state_dict(state)
    for ids in expected:
        assert torch.equal(next(iter(resumed))["input_ids"], ids)


def test_every_window_fits_inside_the_tokens():
    tokens = torch.arange(10)
    loader = DistributedLoader(tokens, seq_len=10, micro_batch_size=5)
    assert torch.equal(loader.batch(0)["input_ids"], tokens.expand(5, 10))
    with pytest.raises(ValueError, match="seq_len"):
        DistributedLoader(tokens, seq_len=11, micro_batch_size=1)
    with pytest.raises(ValueError, match="dp_rank"):
        DistributedLoader(tokens, 4, 1, dp_rank=2, dp_size=2)
