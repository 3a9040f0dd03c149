"""The flops profiler (deepspeed.profiling.flops_profiler) on ds_lab's GPT, against formulas.

t = b·s tokens, Ψ_m = the weights of the matmuls (12h² per block + the vocabulary projection h·V).
Forward MACs = t·Ψ_m + 2·b·s²·h per block (attention: QK^T and PV over the full s x s square);
FLOPs = 2 MACs + 5 per element of each LayerNorm + 1 per element of GeLU (DeepSpeed's formulas).
Training = 3 x forward (each matmul's backward is two matmuls of its size: checked with torch's own
aten-level counter), close to 6·Ψ·t: above it by attention's s² term and the per-element terms,
below it by the parameters that do no matmul (position embedding, biases, norms).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import ds_lab
from ds_lab.models import GPT, GPTConfig
from ds_lab.profiling.flops_profiler import FlopsProfiler, get_model_profile
from tests import checkpointing_workers as cw


def expected(cfg: GPTConfig, b: int, s: int) -> dict:
    h, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    t = b * s
    psi_matmul = 12 * h * h * L + h * V
    attention_macs = 2 * b * s * s * h * L
    macs = t * psi_matmul + attention_macs
    elementwise = 5 * t * h * (2 * L + 1) + 4 * t * h * L  # 2L + 1 LayerNorms, L GeLUs on 4h
    return dict(t=t, psi_matmul=psi_matmul, macs=macs, attention_flops=2 * attention_macs,
                elementwise=elementwise, flops=2 * macs + elementwise)


def test_gpt_forward_flops_macs_params_equal_the_formulas():
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, vocab_size=256)
    torch.manual_seed(0)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    flops, macs, params = get_model_profile(model, kwargs={"input_ids": ids, "labels": ids}, print_profile=False,
                                            as_string=False)
    e = expected(cfg, 2, 16)
    assert (flops, macs, params) == (e["flops"], e["macs"], model.num_parameters())
    assert flops == 2 * e["psi_matmul"] * e["t"] + e["attention_flops"] + e["elementwise"]
    assert not hasattr(F.linear, "__wrapped__") and not hasattr(torch.matmul, "__wrapped__")  # restored
    # an independent counter (aten level, no attention on a CPU) agrees on the matmuls
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids)
    assert counter.get_total_flops() == 2 * e["psi_matmul"] * e["t"]
    # ... and sees the backward cost twice the forward: training = 3 x forward
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == 3 * 2 * e["psi_matmul"] * e["t"]


def test_per_module_counts_add_up_and_strings_match_deepspeed(capsys):
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=16)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(ids)
    prof.stop_profile()
    block = model.blocks[0]
    assert block.mlp.c_fc.__macs__ == 2 * 16 * 32 * 128
    assert sum(m.__flops__ for m in block.modules()) == (expected(cfg, 2, 16)["flops"] - 2 * 2 * 16 * 32 * 256
                                                         - 5 * 2 * 16 * 32) // 2  # all but head and ln_f, per block
    assert prof.get_total_params(as_string=True) == "34.18 K"
    prof.print_model_profile(profile_step=1, top_modules=2)
    out = capsys.readouterr().out
    assert "DeepSpeed Flops Profiler" in out and "(c_fc): Linear(" in out and "depth 3:" in out
    prof.end_profile()
    assert not hasattr(model, "__flops__")


@pytest.mark.parametrize("n_layer,n_embd,seq", [(4, 128, 128), (2, 64, 64)])
def test_training_flops_are_close_to_six_psi_tokens(n_layer, n_embd, seq):
    cfg = GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, block_size=seq)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    flops, _, params = get_model_profile(model, args=[ids], print_profile=False, as_string=False, warm_up=0)
    e = expected(cfg, 1, seq)
    ratio = 3 * flops / (6 * params * e["t"])
    # the three differences, each from the shapes alone
    attention = 3 * e["attention_flops"] / (6 * params * e["t"])
    elementwise = 3 * e["elementwise"] / (6 * params * e["t"])
    no_matmul = (params - e["psi_matmul"]) / params
    assert ratio == pytest.approx(1 + attention + elementwise - no_matmul, rel=1e-12)
    assert attention == pytest.approx(2 * seq * n_layer * n_embd / params)  # 2·s·L·h / Ψ
    assert 0.9 < ratio < 1.25  # within 25% of 6·Ψ·t for these shapes (s ≤ h)


def test_engine_profiles_the_configured_step_and_reports_mfu(tmp_path):
    out = tmp_path / "profile.txt"
    r = ds_lab.launch(cw.profiled_engine_worker, 1, str(out))[0]
    assert r["started_at"] == [False, True, False]  # only step 1's forward (profile_step = 1)
    unprofiled = ds_lab.launch(cw.profiled_engine_worker, 1, None, False)[0]
    assert r["losses"] == unprofiled["losses"]  # profiling changes nothing (the dropout masks included)
    cfg = GPTConfig(**cw.SMALL)
    s = r["summary"]
    assert s["flops"] == expected(cfg, cw.BATCH, cw.SMALL["block_size"])["flops"]
    assert s["params"] == r["params"] and s["train_flops"] == 3 * s["flops"]
    assert 0 < s["mfu"] and s["peak_flops_per_second"] > 1e8 and r["restored"]
    text = out.read_text()
    assert "Profile Summary at step 1:" in text and "model FLOPs utilisation (MFU):" in text


def test_bad_input_is_refused_with_the_fix():
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=4, block_size=16))
    with pytest.raises(ValueError, match="input_shape, or args"):
        get_model_profile(model)
    with pytest.raises(ValueError, match="non-empty tuple"):
        get_model_profile(model, input_shape=[2, 16])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        get_model_profile(lambda x: x, input_shape=(2,))
