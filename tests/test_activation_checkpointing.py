"""Activation checkpointing (deepspeed.checkpointing): the same gradients with less kept, measured.

b batch, s sequence, h hidden, nh heads, fp32. The ledger counts what autograd saves (saved-tensor
hooks, parameters excluded). A GPT block without checkpointing keeps its input and 15·b·s·h elements
inside (ln_1 output, qkv 3, attention output (read by c_proj in place), ln_2 input and output, the
MLP's 4h twice) + 2·2·b·s LayerNorm statistics + b·nh·s attention log-sum-exp. Checkpointed: the
input alone, b·s·h (b·s·h/T partitioned over T ranks); in backward one block's inside comes back
at a time, and the ledger counts that too.
"""
import pytest
import torch

import ds_lab
from ds_lab.runtime import activation_checkpointing
from tests import checkpointing_workers as cw

B, S, H, NH = cw.BATCH, cw.SMALL["block_size"], cw.SMALL["n_embd"], cw.SMALL["n_head"]
BSH = B * S * H


def inside_block_bytes():
    return 4 * (15 * BSH + 2 * 2 * B * S + B * NH * S)


def per_block_bytes_without_checkpointing():
    return 4 * BSH + inside_block_bytes()


def test_checkpointed_gpt_trains_bitwise_like_the_plain_one_and_keeps_only_block_inputs():
    runs = [(1, False, 0.0), (1, True, 0.0), (2, False, 0.0), (2, True, 0.0), (2, False, 0.1), (2, True, 0.1)]
    r = ds_lab.launch(cw.engine_worker, 1, runs)[0]
    # the same numbers, to the bit, with and without recompute (with dropout: the RNG is replayed)
    for dropout in (0.0, 0.1):
        plain, ckpt = r[(2, False, dropout)], r[(2, True, dropout)]
        assert plain["losses"] == ckpt["losses"]
        assert all(torch.equal(a, b) for a, b in zip(plain["weights"], ckpt["weights"]))
    # the ledger: one more block costs 16.25 b·s·h x 4 bytes plain, b·s·h x 4 bytes checkpointed
    plain_per_block = r[(2, False, 0.0)]["activations_peak"] - r[(1, False, 0.0)]["activations_peak"]
    ckpt_per_block = r[(2, True, 0.0)]["activations_peak"] - r[(1, True, 0.0)]["activations_peak"]
    assert plain_per_block == per_block_bytes_without_checkpointing()
    assert ckpt_per_block == 4 * BSH
    # checkpointed, the peak is in backward, at the last block's recompute: the token and position
    # ids the embeddings keep (int64), every block input, one block's inside (the head is freed by then)
    for n_layer in (1, 2):
        assert r[(n_layer, True, 0.0)]["activations_peak"] == (
            8 * B * S + 8 * S + n_layer * 4 * BSH + inside_block_bytes())


def test_partitioned_activations_keep_one_tensor_rank_share_and_give_the_same_gradients():
    """T = 2: each rank keeps half of every block input and all-gathers it before the recompute."""
    for r in ds_lab.launch(cw.partition_worker, 2):
        plain, ckpt, part = r["plain"], r["checkpointed"], r["partitioned"]
        assert plain["loss"] == ckpt["loss"] == part["loss"]
        for mode in (ckpt, part):
            assert all(torch.equal(a, b) for a, b in zip(plain["grads"], mode["grads"]))
        n_layer = cw.SMALL["n_layer"]
        assert ckpt["kept"] - part["kept"] == n_layer * 4 * BSH // 2  # half of each block input stays
        assert ckpt["gathers"] == [] and part["gathers"] == [4 * BSH] * n_layer  # one all-gather per block


def test_the_engine_applies_the_config_section_with_its_grid():
    r = ds_lab.launch(cw.config_section_worker, 1)[0]
    assert r == dict(configured=True, partition=True, number=2, mpu_is_grid=True)


def test_configure_follows_deepspeed_precedence_and_refuses_what_cannot_work(tmp_path):
    saved = activation_checkpointing.settings.__dict__.copy()
    try:
        path = tmp_path / "ds.json"
        path.write_text('{"activation_checkpointing": {"partition_activations": true, "profile": true}}')
        ds_lab.checkpointing.configure(None, deepspeed_config=str(path), profile=False)  # keyword wins
        s = activation_checkpointing.settings
        assert ds_lab.checkpointing.is_configured() and s.partition_activations and not s.profile
        with pytest.raises(ValueError, match="needs partition_activations"):
            ds_lab.checkpointing.configure(None, contiguous_checkpointing=True)
        with pytest.raises(ValueError, match="number_checkpoints"):
            ds_lab.checkpointing.configure(None, partition_activations=True, contiguous_checkpointing=True)
        with pytest.warns(UserWarning, match="does nothing"):
            ds_lab.checkpointing.configure(None, partition_activations=True, contiguous_checkpointing=True,
                                           num_checkpoints=4)
        with pytest.raises(ValueError, match="unknown key"):
            ds_lab.checkpointing.configure(None, deepspeed_config={"activation_checkpointing": {"partition": 1}})
    finally:
        activation_checkpointing.settings.__dict__.update(saved)


def test_checkpoint_passes_keywords_and_non_tensor_arguments_and_replays_dropout():
    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)

    def f(x, scale, *, bias):
        return torch.nn.functional.dropout(x @ w * scale + bias, 0.5, training=True)

    x = torch.randn(4, 8, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    torch.manual_seed(1)
    f(x, 2.0, bias=bias).square().sum().backward()
    plain = [t.grad.clone() for t in (x, w, bias)]
    for t in (x, w, bias):
        t.grad = None
    torch.manual_seed(1)
    ds_lab.checkpointing.checkpoint(f, x, 2.0, bias=bias).square().sum().backward()
    assert all(torch.equal(a, t.grad) for a, t in zip(plain, (x, w, bias)))


def test_cpu_checkpointing_synchronize_and_profile_run_and_change_no_number(capsys):
    """On a CPU, cpu_checkpointing moves nothing (the inputs already are in host memory) and
    synchronize waits for nothing; profile prints each segment's times. Gradients are unchanged."""
    saved = activation_checkpointing.settings.__dict__.copy()
    try:
        ds_lab.checkpointing.configure(None, checkpoint_in_cpu=True, synchronize=True, profile=True)
        torch.manual_seed(0)
        layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Dropout(0.3))
        x = torch.randn(4, 8, requires_grad=True)
        torch.manual_seed(1)
        layer(x).sum().backward()
        plain = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        x.grad = None
        layer.zero_grad()
        torch.manual_seed(1)
        ds_lab.checkpointing.checkpoint(layer, x).sum().backward()
        assert all(torch.equal(a, b) for a, b in zip(plain, [x.grad] + [p.grad for p in layer.parameters()]))
        out = capsys.readouterr().out
        assert "activation checkpoint forward" in out and "activation checkpoint backward" in out
    finally:
        activation_checkpointing.settings.__dict__.update(saved)
