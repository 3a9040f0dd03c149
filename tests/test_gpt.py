"""Specification of ds_lab.models.GPT: shapes, the HF label convention, init, training, counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from ds_lab.models import GPT, GPTConfig, GPTOutput

TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def random_ids(batch=3, length=16, vocab=256, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_have_shape_batch_by_length_by_vocab_and_no_loss_without_labels():
    out = tiny_model()(random_ids(batch=3, length=11))
    assert isinstance(out, GPTOutput)
    assert out.logits.shape == (3, 11, 256)
    assert out.loss is None


def test_attention_is_causal_so_a_later_token_never_changes_earlier_logits():
    model, ids = tiny_model(), random_ids()
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_output_reads_by_attribute_and_by_name():
    ids = random_ids()
    out = tiny_model()(ids, labels=ids)
    assert out["loss"] is out.loss and out["logits"] is out.logits
    assert out[0] is out.loss
    with pytest.raises(KeyError):
        out["hidden_states"]


def test_loss_is_cross_entropy_of_logits_shifted_against_labels():
    ids = random_ids()
    out = tiny_model()(ids, labels=ids)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_labels_of_minus_100_are_ignored_and_attention_mask_zeros_drop_from_loss():
    model, ids = tiny_model(), random_ids()
    labels = ids.clone()
    labels[:, 10:] = -100
    logits = model(ids).logits
    manual = F.cross_entropy(logits[:, :9].reshape(-1, 256), ids[:, 1:10].reshape(-1))
    torch.testing.assert_close(model(ids, labels=labels).loss, manual)

    mask = torch.ones_like(ids)
    mask[:, 10:] = 0  # right padding: same tokens excluded as with -100
    torch.testing.assert_close(model(ids, labels=ids, attention_mask=mask).loss, manual)


def test_tied_lm_head_is_the_token_embedding_and_counts_once():
    tied, untied = tiny_model(), tiny_model(tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_parameters() - tied.num_parameters() == 256 * 32
    assert tied.num_parameters() == sum(p.numel() for p in tied.state_dict().values()) - 256 * 32


def test_default_config_parameter_count():
    assert GPT(GPTConfig()).num_parameters() == 842_496


def test_untrained_model_predicts_nearly_uniform_bytes():
    ids = random_ids(batch=8)
    loss = tiny_model()(ids, labels=ids).loss.item()
    assert abs(loss - math.log(256)) < 0.1


def test_a_few_adamw_steps_overfit_a_tiny_batch():
    model, ids = tiny_model(), random_ids(batch=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(ids, labels=ids).loss.item()
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_same_seed_gives_identical_weights_and_outputs():
    ids = random_ids()
    a, b, c = tiny_model(seed=7), tiny_model(seed=7), tiny_model(seed=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not torch.equal(a(ids).logits, c(ids).logits)


@pytest.mark.parametrize(
    "overrides, expected",
    [(dict(n_embd=35, n_head=5, bias=False), 72_555), (dict(vocab_size=257, n_embd=35, n_head=5), 74_165)],
)
def test_odd_n_embd_gives_an_odd_parameter_count_as_the_docstring_says(overrides, expected):
    n = GPT(GPTConfig(**overrides)).num_parameters()
    assert n == expected and n % 2 == 1


def test_generate_appends_tokens_and_respects_block_size():
    model = tiny_model()
    prompt = random_ids(batch=2, length=10)
    out = model.generate(prompt, max_new_tokens=12, top_k=5)  # runs past block_size 16
    assert out.shape == (2, 22)
    assert torch.equal(out[:, :10], prompt)


def test_too_long_input_raises_with_the_fix():
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(random_ids(length=17))
