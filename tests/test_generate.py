"""ds_lab.generate: greedy, temperature, top-k and top-p sampling do what their docstring says."""
import math

import pytest
import torch

from ds_lab.generate import generate, next_token_probs
from ds_lab.models import GPT, GPTConfig

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])  # a tiny vocabulary of 5 tokens


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are always the same (so its distribution is known)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return self.logits.expand(input_ids.size(0), input_ids.size(1), -1)


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)).eval()


def test_greedy_is_argmax_at_every_step():
    model = tiny_gpt()
    ids = [1, 2, 3]
    out = generate(model, ids, 20, temperature=0)
    for t in range(3, len(out)):
        context = torch.tensor([out[max(0, t - 16):t]])
        assert out[t] == int(model(context).logits[0, -1].argmax())


def test_top_k_1_equals_greedy():
    model = tiny_gpt()
    greedy = generate(model, "ab", 20, temperature=0)
    for seed in range(3):
        assert generate(model, "ab", 20, temperature=1.3, top_k=1, seed=seed) == greedy


def test_top_p_masks_exactly_the_tail_beyond_p():
    probs = torch.softmax(LOGITS, -1)  # about 0.55, 0.20, 0.12, 0.07, 0.03
    cumulative = probs.cumsum(-1)
    for p in (0.3, 0.6, 0.8, 0.9, 0.99):
        kept = next_token_probs(LOGITS, top_p=p) > 0
        smallest = int((cumulative < p).sum()) + 1  # the fewest most probable tokens whose sum reaches p
        assert kept.tolist() == [i < smallest for i in range(5)], p
        torch.testing.assert_close(next_token_probs(LOGITS, top_p=p)[:smallest],
                                   probs[:smallest] / probs[:smallest].sum())
    assert (next_token_probs(LOGITS, top_p=1e-6) > 0).tolist() == [True, False, False, False, False]


def test_temperature_towards_zero_approaches_greedy():
    gaps = [1 - next_token_probs(LOGITS, temperature=t)[0].item() for t in (1.0, 0.3, 0.1, 0.03)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-10
    torch.testing.assert_close(next_token_probs(LOGITS, temperature=0), torch.tensor([1.0, 0, 0, 0, 0]))


def test_seeded_sampling_is_reproducible():
    model = tiny_gpt()
    a = generate(model, "The", 40, temperature=1.0, top_p=0.9, seed=7)
    assert a == generate(model, "The", 40, temperature=1.0, top_p=0.9, seed=7)
    assert a != generate(model, "The", 40, temperature=1.0, top_p=0.9, seed=8)
    assert isinstance(a, str) and a.startswith("The") and len(a.encode("utf-8", "replace")) >= 40


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.5, None, None), (2.0, None, None),
                                                       (1.0, 3, None), (1.0, None, 0.8), (1.5, 4, 0.9)])
def test_samples_follow_the_documented_distribution(temperature, top_k, top_p):
    """Chi-square test: 4,000 draws from generate against softmax(logits / T), cut to the top k,
    then to the top-p nucleus, renormalised (computed here independently of next_token_probs)."""
    expected = torch.softmax(LOGITS / temperature, -1)
    if top_k is not None:
        expected[top_k:] = 0  # LOGITS are sorted, so the top k are the first k
        expected /= expected.sum()
    if top_p is not None:
        before = expected.cumsum(-1) - expected
        expected[before >= top_p] = 0
        expected /= expected.sum()
    draws = 4_000
    tokens = generate(FixedLogits(LOGITS), [0], draws, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)[1:]
    counts = torch.bincount(torch.tensor(tokens), minlength=5).double()
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    chi2 = (((counts - draws * expected) ** 2)[support] / (draws * expected[support])).sum().item()
    dof = int(support.sum()) - 1
    # The 99.9th percentile of chi-square with dof <= 4 degrees of freedom is below 18.5.
    assert chi2 < 18.5, (chi2, dof, counts.tolist(), (draws * expected).tolist())
    assert math.isclose(float(next_token_probs(LOGITS, temperature, top_k, top_p).sum()), 1.0, rel_tol=1e-6)
    torch.testing.assert_close(next_token_probs(LOGITS, temperature, top_k, top_p), expected.float())


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="top_p"):
        next_token_probs(LOGITS, top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        next_token_probs(LOGITS, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        next_token_probs(LOGITS, temperature=-1)
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_gpt(), "", 3)
