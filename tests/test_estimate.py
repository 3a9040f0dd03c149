"""Specification of ds_lab.zero.estimate: ZeRO's memory arithmetic, the paper's numbers, DeepSpeed's tables."""
import math

import pytest

from ds_lab import cli
from ds_lab.zero.estimate import (LEDGER_CATEGORIES, STAGES, estimate_activations, estimate_ledger,
                                  estimate_model_states, estimate_zero2_model_states_mem_needs_all_cold,
                                  estimate_zero3_model_states_mem_needs_all_cold, format_bytes, format_table,
                                  formula, what_fits)

GB = 1e9  # the ZeRO paper's unit
GIB = 2 ** 30  # DeepSpeed's printed "GB"
FIGURE_1 = {0: "120.0 GB", 1: "31.4 GB", 2: "16.6 GB", 3: "1.9 GB"}  # Ψ = 7.5B, N = 64, K = 12


# ---------------------------------------------------------------- the ZeRO paper

@pytest.mark.parametrize("stage, printed", FIGURE_1.items())
def test_reproduces_zero_paper_figure_1(stage, printed):
    total = estimate_model_states(7.5e9, 64, stage)["total"]
    assert format_bytes(total) == printed
    assert f"{total / GB:.1f} GB" == printed


def test_figure_1_exact_bytes_follow_the_formulas():
    psi, n = 7_500_000_000, 64
    assert [estimate_model_states(psi, n, s)["total"] for s in STAGES] == [
        16 * psi, 2 * psi + 2 * psi + 12 * psi // n, 2 * psi + 14 * psi // n, 16 * psi // n]


def test_categories_of_mixed_precision_stage_2():
    psi, n = 7_500_000_000, 64
    assert estimate_model_states(psi, n, 2) == dict(params=2 * psi, grads=2 * psi // n,
                                                    optimizer_states=12 * psi // n, total=2 * psi + 14 * psi // n)


@pytest.mark.parametrize("psi, n", [(1_000_000, 1), (1_000_000, 4), (7_500_000_000, 64), (3_000, 3)])
def test_fp32_analogue(psi, n):
    totals = [estimate_model_states(psi, n, s, precision="fp32")["total"] for s in STAGES]
    assert totals == [16 * psi, 8 * psi + 8 * psi // n, 4 * psi + 12 * psi // n, 16 * psi // n]
    assert estimate_ledger(psi, n, 0, "fp32")["master_params"] == 0


@pytest.mark.parametrize("precision", ["mixed", "fp32"])
@pytest.mark.parametrize("psi, n", [(65, 1), (65, 2), (65, 3), (10 ** 9, 8)])
def test_each_stage_needs_no_more_than_the_one_before(psi, n, precision):
    totals = [estimate_model_states(psi, n, s, precision)["total"] for s in STAGES]
    assert totals == sorted(totals, reverse=True)
    if n > 1:
        assert len(set(totals)) == 4


def test_uneven_shards_round_up_like_a_padded_flat_buffer():
    # 65 parameters over 3 ranks: each rank owns ceil(65/3) = 22 elements of a partitioned state.
    assert estimate_ledger(65, 3, 3) == dict(params=44, grads=44, master_params=88, optimizer_states=176,
                                             total=352)


@pytest.mark.parametrize("precision", ["mixed", "bf16", "fp16", "fp32"])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("psi, n", [(65, 3), (7_500_000_000, 64)])
def test_ledger_splits_the_same_bytes_into_ds_labs_categories(psi, n, stage, precision):
    ledger = estimate_ledger(psi, n, stage, precision)
    states = estimate_model_states(psi, n, stage, precision)
    assert set(ledger) == set(LEDGER_CATEGORIES) | {"total"}
    assert sum(ledger[c] for c in LEDGER_CATEGORIES) == ledger["total"] == states["total"]
    assert ledger["master_params"] + ledger["optimizer_states"] == states["optimizer_states"]


def test_optimizer_bytes_k_is_master_plus_optimizer_states():
    assert estimate_ledger(1000, 1, 0, optimizer_bytes=12) == estimate_ledger(1000, 1, 0)
    sgd_momentum = estimate_ledger(1000, 1, 0, optimizer_bytes=8)  # 4 master + 4 momentum
    assert (sgd_momentum["master_params"], sgd_momentum["optimizer_states"]) == (4000, 4000)
    with pytest.raises(ValueError, match="K >= 4"):
        estimate_ledger(1000, 1, 0, optimizer_bytes=2)


def test_formulas_name_what_each_stage_partitions():
    assert [formula(s) for s in STAGES] == ["2Ψ + 2Ψ + 12Ψ", "2Ψ + 2Ψ + 12Ψ/N", "2Ψ + (2 + 12)Ψ/N",
                                            "(2 + 2 + 12)Ψ/N"]
    assert formula(2, "fp32") == "4Ψ + (4 + 8)Ψ/N"


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="use 0, 1, 2 or 3"):
        estimate_model_states(1000, 2, stage=4)
    with pytest.raises(ValueError, match="'mixed'"):
        estimate_model_states(1000, 2, 1, precision="int8")
    with pytest.raises(ValueError, match="at least 1"):
        estimate_model_states(1000, 0, 1)


# ---------------------------------------------------------------- what fits

@pytest.mark.parametrize("precision", ["mixed", "fp32"])
@pytest.mark.parametrize("gpu_bytes, n", [(80e9, 8), (80e9, 64), (24e9, 3), (1000, 3)])
def test_what_fits_is_the_largest_model_that_fits(gpu_bytes, n, precision):
    for stage, psi in what_fits(gpu_bytes, n, precision).items():
        assert estimate_model_states(psi, n, stage, precision)["total"] <= gpu_bytes
        assert estimate_model_states(psi + 1, n, stage, precision)["total"] > gpu_bytes


def test_what_fits_on_an_80_gb_gpu_with_8_ranks():
    # Ψ_max = 80e9 / (bytes per parameter per rank), less a few parameters where ceil(Ψ/N) rounds up.
    fits = what_fits(80e9, 8)
    for stage, bytes_per_param in {0: 16, 1: 4 + 12 / 8, 2: 2 + 14 / 8, 3: 16 / 8}.items():
        assert 0 <= 80e9 / bytes_per_param - fits[stage] < 8
    assert fits == {0: 5_000_000_000, 1: 14_545_454_544, 2: 21_333_333_331, 3: 40_000_000_000}


# ---------------------------------------------------------------- activations

def test_activations_match_korthikanti_per_layer_formula():
    s, b, h, a, layers = 2048, 1, 4096, 32, 32
    per_layer = s * b * h * (34 + 5 * a * s / h)  # 16-bit, no recomputation
    got = estimate_activations(b, s, h, layers, num_heads=a)
    assert got["per_layer"] == per_layer == 956_301_312
    assert got["layers"] == got["total"] == layers * per_layer
    assert got["logits"] == 0


def test_activations_variants():
    s, b, h, a, v = 128, 4, 256, 4, 1000
    assert estimate_activations(b, s, h, 2, checkpointing=True)["per_layer"] == 2 * s * b * h
    assert estimate_activations(b, s, h, 2)["per_layer"] == 34 * s * b * h  # no scores kept (FlashAttention)
    assert estimate_activations(b, s, h, 2, num_heads=a, dropout=False)["per_layer"] == 2 * (16 * s * b * h
                                                                                               + a * s * s * b)
    fp32 = estimate_activations(b, s, h, 2, num_heads=a, bytes_per_element=4)["per_layer"]
    assert fp32 == 66 * s * b * h + 9 * a * s * s * b
    with_logits = estimate_activations(b, s, h, 2, vocab_size=v)
    assert with_logits["logits"] == s * b * v * 2
    assert with_logits["total"] == with_logits["layers"] + with_logits["logits"]


# ---------------------------------------------------------------- DeepSpeed's estimators

def test_zero2_cold_prints_deepspeeds_table(capsys):
    psi, gpus = 13e9, 8
    rows = estimate_zero2_model_states_mem_needs_all_cold(psi, num_gpus_per_node=gpus)
    out = capsys.readouterr().out
    offload = dict(per_cpu=int(psi * max(4 * gpus, 16) * 1.5), per_gpu=int(2 * psi))
    no_offload = dict(per_cpu=int(psi * 4 * gpus * 1.5), per_gpu=int(2 * psi + 18 * psi / gpus))
    assert [(r["offload_optimizer"], r["per_cpu"], r["per_gpu"]) for r in rows] == [
        ("cpu", offload["per_cpu"], offload["per_gpu"]), ("none", no_offload["per_cpu"], no_offload["per_gpu"])]
    assert "HW: Setup with 1 node, 8 GPUs per node.\nSW: Model with 13000M total params." in out
    assert "  per CPU  |  per GPU |   Options" in out
    assert f" {offload['per_cpu'] / GIB:7.2f}GB |  24.21GB | offload_optimizer=cpu \n" in out
    assert "  581.15GB |  51.46GB | offload_optimizer=none" in out


def test_zero3_cold_matches_deepspeeds_published_t5_small_numbers(capsys):
    # DeepSpeed's memory docs and blog posts print, for t5-small on 1 GPU:
    # 1.52/0.06, 1.52/0.06, 1.35/0.17, 1.35/0.17, 0.09/1.08, 0.34/1.08 (per CPU / per GPU, GiB).
    psi, largest = 60_506_624, 16_449_536
    rows = estimate_zero3_model_states_mem_needs_all_cold(psi, largest)
    out = capsys.readouterr().out
    printed = [(round(r["per_cpu"] / GIB, 2), round(r["per_gpu"] / GIB, 2)) for r in rows]
    assert printed == [(1.52, 0.06), (1.52, 0.06), (1.35, 0.17), (1.35, 0.17), (0.09, 1.08), (0.34, 1.08)]
    assert "SW: Model with 60M total params, 16M largest layer params." in out
    assert "    1.52GB |   0.06GB | offload_param=cpu , offload_optimizer=cpu , zero_init=1" in out
    assert "    0.34GB |   1.08GB | offload_param=none, offload_optimizer=none, zero_init=0" in out


def test_zero3_cold_rows_on_two_nodes():
    psi, largest, gpus, nodes, factor = 13e9, 325e6, 8, 2, 1.5
    rows = estimate_zero3_model_states_mem_needs_all_cold(psi, largest, gpus, nodes)
    total_gpus = gpus * nodes
    expected = [  # (offload_param, offload_optimizer, zero_init, per_cpu, per_gpu)
        ("cpu", "cpu", True, psi * 18 / nodes * factor, 4 * largest),
        ("cpu", "cpu", False, psi * max(4 * gpus, 18 / nodes) * factor, 4 * largest),
        ("none", "cpu", True, psi * 16 / nodes * factor, 4 * largest + 2 * psi / total_gpus),
        ("none", "cpu", False, psi * max(4 * gpus, 16 / nodes) * factor, 4 * largest + 2 * psi / total_gpus),
        ("none", "none", True, largest * 4 * gpus * factor, 4 * largest + 18 * psi / total_gpus),
        ("none", "none", False, psi * 4 * gpus * factor, 4 * largest + 18 * psi / total_gpus),
    ]
    assert len(rows) == len(expected)
    for row, (param, optimizer, zero_init, per_cpu, per_gpu) in zip(rows, expected):
        assert (row["offload_param"], row["offload_optimizer"], row["zero_init"]) == (param, optimizer, zero_init)
        assert math.isclose(row["per_cpu"], per_cpu, abs_tol=2)
        assert math.isclose(row["per_gpu"], per_gpu, abs_tol=2)


# ---------------------------------------------------------------- table and command line

def test_format_table_lists_the_four_stages_in_human_units():
    table = format_table(7.5e9, 64)
    lines = table.splitlines()
    assert len(lines) == 2 + len(STAGES)
    for stage, printed in FIGURE_1.items():
        assert lines[2 + stage].startswith(str(stage)) and printed in lines[2 + stage]
    assert "master_params" in lines[1] and "(2 + 2 + 12)Ψ/N" in lines[-1]


def test_cli_estimate_prints_figure_1(capsys):
    assert cli.main(["estimate", "--params", "7.5e9", "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for stage, printed in FIGURE_1.items():
        assert any(line.startswith(str(stage)) and printed in line for line in lines), (stage, out)
    assert "fits" not in out


def test_cli_estimate_with_gpu_memory_prints_what_fits(capsys):
    assert cli.main(["estimate", "--params", "7.5e9", "--world-size", "8", "--gpu-memory", "80e9",
                     "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "fp32 precision" in out
    assert "stage 3: Ψ <= 40.0B parameters" in out  # 80e9 / (16/8)
