"""What chapters 1 and 2 import from ds_lab.lab (background, alpha_beta, naive_dp), each checked
against a count made apart: the model's shape, a one-process run, the α–β formula written out here."""
import math
import statistics

import pytest
import torch

import ds_lab
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.lab.alpha_beta import all_reduce_seconds, data_parallel_step, fit_per_message, ring_against_gloo
from ds_lab.lab.background import GPU_MEMORY, MODEL_GROWTH, count_step_flops, gib, growth_table, matmul_parameters
from ds_lab.lab.naive_dp import naive_data_parallel
from ds_lab.models import GPT, GPTConfig
from tests import lab_ch01_02_workers as w


def test_model_growth_corrects_the_article_lamda_is_smaller_than_gpt3_and_megatron_came_first():
    rows = {name: (billions, year) for name, billions, year, _, _ in MODEL_GROWTH}
    assert rows["LaMDA"][0] < rows["GPT-3"][0] == 175
    assert rows["Megatron-LM 8.3B"][1] < rows["GPT-3"][1]
    assert (rows["BERT-Large"], rows["PaLM"]) == ((0.34, 2018), (540, 2022))
    table = growth_table().splitlines()[1:]
    assert [int(line.split()[0]) for line in table] == sorted(year for _, _, year, _, _ in MODEL_GROWTH)


def test_gpu_capacities_in_gib():
    assert round(gib(GPU_MEMORY["A100 / H100 80 GB"]), 1) == 74.5
    assert round(gib(141e9), 1) == 131.3 and gib(2**30) == 1.0


def test_flops_counted_are_six_per_matrix_weight_per_token():
    config = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    b, s, h, layers, vocab = 2, 16, 32, 2, 256
    batch = DistributedLoader(corpus_tokens(), s, b, seed=0).batch(0)
    assert matmul_parameters(model) == 12 * layers * h * h + vocab * h  # qkv 3h², proj h², MLP 8h²; tied head
    assert count_step_flops(model, batch) == 6 * matmul_parameters(model) * b * s
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_allocations_see_adams_sqrt_and_the_bf16_fp32_gradient_copies(precision):
    psi, allocations = ds_lab.launch(w.allocations_worker, 1, precision)[0]
    assert allocations["aten::sqrt"] == 4 * psi  # sqrt(v), fp32, one element per parameter
    if precision == "bf16":
        assert allocations["aten::empty_strided"] >= 4 * psi  # the fp32 copies of the bf16 gradients


def test_alpha_beta_model_terms():
    alpha, beta, m = 1e-5, 1e10, 4e9
    for n in (2, 3, 8):
        one = all_reduce_seconds(m, n, alpha, beta)
        assert one == pytest.approx(2 * (n - 1) * alpha + 2 * (n - 1) / n * m / beta)
        assert all_reduce_seconds(m, n, alpha, beta, messages=10) - one == pytest.approx(9 * 2 * (n - 1) * alpha)
    assert all_reduce_seconds(m, 1, alpha, beta) == 0.0
    small, large = (data_parallel_step(1e9, 1e6, n, 3, alpha, beta, 1e14) for n in (8, 64))
    assert large["compute"] == pytest.approx(small["compute"] / 8)         # compute falls as 1/N
    assert large["bandwidth"] > small["bandwidth"] and large["latency"] > small["latency"]  # traffic does not


def test_fit_per_message_recovers_the_line():
    counts = [1, 4, 16, 64]
    a, b = fit_per_message(counts, [3e-4 * k + 2e-3 for k in counts])
    assert a == pytest.approx(3e-4) and b == pytest.approx(2e-3)


@pytest.mark.parametrize("numel", [12 * 101, 12 * 101 + 5])
def test_ring_sends_two_n_minus_one_over_n_and_sums_like_gloo_at_world_size_3(numel):
    n = 3
    runs = ds_lab.launch(ring_against_gloo, n, numel)
    base, extra = divmod(numel, n)
    chunk = [base + (i < extra) for i in range(n)]
    for rank, r in enumerate(runs):
        assert r["equal"]
        # every chunk but one in each pass: 2·numel − |chunk r+1| − |chunk r+2| elements, 4 bytes each
        assert r["sent"] == 4 * (2 * numel - chunk[(rank + 1) % n] - chunk[(rank + 2) % n])
    if numel % n == 0:
        assert all(r["sent"] * n == 2 * (n - 1) * 4 * numel for r in runs)


def test_naive_data_parallel_matches_one_process_and_sends_one_message_per_tensor():
    batches = [DistributedLoader(corpus_tokens(), 16, 4, seed=0).batch(i)["input_ids"] for i in range(3)]
    single = ds_lab.launch(naive_data_parallel, 1, w.plain_step, batches, w.TINY)[0]
    pair = ds_lab.launch(naive_data_parallel, 2, w.plain_step, batches, w.TINY)
    psi = sum(p.numel() for p in GPT(GPTConfig(**w.TINY)).parameters())
    tensors = len(list(GPT(GPTConfig(**w.TINY)).parameters()))
    for r in pair:
        assert r["collectives"] == [tensors] * 3 and r["bytes"] == [4 * psi] * 3 and r["tensors"] == tensors
    assert single["collectives"] == [tensors] * 3  # a world of 1 still calls all_reduce (a no-op)
    for step in range(3):
        both = statistics.fmean(r["losses"][step] for r in pair)
        assert math.isclose(both, single["losses"][step], rel_tol=1e-5)
