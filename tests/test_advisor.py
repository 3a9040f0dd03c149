"""The config advisor (ds_lab/lab/advisor.py) and the failures chapter 11 causes on purpose."""
import pytest

import ds_lab
from ds_lab.config import ConfigError, DeepSpeedConfig
from ds_lab.lab import failures
from ds_lab.lab.advisor import AdvisorError, recommend
from ds_lab.zero.estimate import estimate_activations, estimate_ledger

SHAPE = dict(layers=2, hidden=64, seq_len=32, vocab_size=256)
PSI = 1_000_000


def activations(b):
    return estimate_activations(b, 32, 64, 2, num_heads=None, vocab_size=256, dropout=False)["total"]


def test_picks_the_lowest_stage_whose_states_and_one_micro_batch_fit():
    # on 2 GPUs: stage 0 needs 16 MB, stage 1 4Ψ + 6Ψ = 10 MB, stage 2 2Ψ + 7Ψ = 9 MB, stage 3 8 MB
    room = 9.5e6 + activations(1)                      # stage 2 fits, stage 1 does not
    advice = recommend(PSI, 2, room / 0.8, **SHAPE)
    assert advice.stage == 2 and advice.states_bytes == estimate_ledger(PSI, 2, 2)["total"] == 9_000_000
    assert recommend(PSI, 2, 100e6, **SHAPE).stage == 0


def test_micro_batch_is_the_largest_power_of_two_that_fits_and_divides():
    budget = 16e6 + activations(4) + 1                 # stage 0 with b = 4 fits, b = 8 does not
    advice = recommend(PSI, 2, budget, reserve=0.0, **SHAPE)
    assert (advice.stage, advice.micro_batch, advice.activation_bytes) == (0, 4, activations(4))
    advice = recommend(PSI, 2, budget, reserve=0.0, global_batch=12, **SHAPE)  # 6 per GPU: b = 2, accumulation 3
    assert (advice.micro_batch, advice.accumulation, advice.config["train_batch_size"]) == (2, 3, 12)


def test_the_config_is_one_deepspeed_config_accepts():
    advice = recommend(7.5e9, 64, 80e9, layers=32, hidden=4096, seq_len=2048, heads=32, vocab_size=51200,
                       global_batch=512)
    cfg = DeepSpeedConfig.from_any(advice.config, world_size=64)
    assert cfg.zero_optimization.stage == advice.stage == 1 and cfg.train_batch_size == 512
    assert advice.config["bf16"] == {"enabled": True} and "offload" not in str(advice.config)
    assert "stage 0: 2Ψ + 2Ψ + 12Ψ = 120.0 GB" in advice.explain()


def test_fp16_without_bf16_and_stage3_warning():
    advice = recommend(PSI, 8, 3e6, reserve=0.0, bf16_supported=False, **SHAPE)
    assert advice.precision == "fp16" and advice.config["fp16"] == {"enabled": True} and advice.stage == 3
    assert any("1.5x the bytes" in reason for reason in advice.reasons)


def test_nothing_fits_names_the_gpus_that_would():
    with pytest.raises(AdvisorError, match=r"even ZeRO stage 3 .* use 3 GPUs or more"):
        recommend(PSI, 2, 8e6 / 0.8 * 0.9, **SHAPE)  # 90 % of what stage 3 on 2 needs, with activations
    with pytest.raises(ValueError, match="not a multiple of the 3 GPUs"):
        recommend(PSI, 3, 1e9, global_batch=8, **SHAPE)


def test_a_crashing_rank_raises_rank_error_with_its_traceback():
    with pytest.raises(ds_lab.RankError, match="loss is nan at step 1") as err:
        ds_lab.launch(failures.crash_on_rank, 2, 1, timeout=10)
    assert err.value.rank == 1 and "crash_on_rank" in err.value.remote_traceback


def test_a_collective_one_rank_never_calls_times_out_and_names_itself():
    with pytest.raises(ds_lab.RankError, match=r"all_reduce \(4000 bytes, group of 2\) did not complete"):
        ds_lab.launch(failures.hang, 2, 30, timeout=2)


def test_a_bad_config_says_did_you_mean():
    config = {"train_batch_size": 2, "zero_optimisation": {"stage": 1}}
    with pytest.raises(ds_lab.RankError, match="did you mean 'zero_optimization'"):
        ds_lab.launch(failures.bad_config, 2, config, dict(n_layer=1, n_head=2, n_embd=16, block_size=16))
    with pytest.raises(ConfigError):
        DeepSpeedConfig.from_any(config)
