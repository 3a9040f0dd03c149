"""The scale simulator's formulas (ds_lab/lab/scale.py), each against a case computed by hand."""
import math

import pytest

from ds_lab.comm.links import LinkModel
from ds_lab.lab.scale import (A100_80GB, GPT3_175B, GPU, MEGATRON_1T, MEGATRON_TABLE1, Cluster, Layout, Transformer,
                              activation_bytes_per_layer, calibrate, dp_records, hardware_flops_per_token,
                              megatron_flops_per_batch, megatron_row, memory_per_gpu, model_flops_per_token,
                              passes_per_parameter, simulate, step_time, training_days)
from ds_lab.zero.estimate import estimate_activations

TINY = Transformer("tiny", layers=2, hidden=4, heads=2, seq_len=8, vocab=10)
# round numbers: 1 s per 1e3 bytes between nodes, 1 s per 1e4 bytes inside one, no latency
SLOW = LinkModel(intra_bandwidth=1e4, intra_latency=0.0, inter_bandwidth=1e3, inter_latency=0.0)


def test_parameter_count_is_megatrons_formula_by_hand():
    # 12·2·16 + 13·2·4 + (10 + 8)·4 = 384 + 104 + 72
    assert TINY.params == 560
    assert round(MEGATRON_1T.params / 1e9, 1) == 1008.0  # Narayanan et al. 2021, Table 1
    assert round(GPT3_175B.params / 1e9) == 175


def test_every_megatron_table1_row_has_the_parameters_it_reports():
    for row in MEGATRON_TABLE1:
        model, layout, _ = megatron_row(row)
        assert math.isclose(model.params / 1e9, row[0], rel_tol=0.03), row
        assert layout.gpus == row[6]


def test_flops_per_token_six_psi_plus_attention_plus_recomputation():
    assert model_flops_per_token(TINY, attention=False) == 6 * 560
    assert model_flops_per_token(TINY) == 6 * 560 + 12 * 2 * 8 * 4            # + 12·l·s·h = 768
    assert hardware_flops_per_token(TINY, recompute=True) == 3360 + 768 + 2 * (24 * 16 + 4 * 8 * 4)


def test_hardware_flops_match_megatron_equation_3():
    for model in (GPT3_175B, MEGATRON_1T):
        ours = hardware_flops_per_token(model, recompute=True) * model.seq_len * 4
        assert math.isclose(ours, megatron_flops_per_batch(model, 4), rel_tol=2e-4)


def test_activations_korthikanti_table2_and_the_estimator_agree_at_t1():
    # s·b·h·(10 + 24/t + 5as/(ht)) with s=8, b=3, h=4, a=2: 96·(10 + 24 + 20) at t=1
    assert activation_bytes_per_layer(TINY, 3) == 96 * 54
    assert activation_bytes_per_layer(TINY, 3, tp=2) == 96 * (10 + 12 + 10)
    assert activation_bytes_per_layer(TINY, 3, recompute=True) == 2 * 96
    per_layer = estimate_activations(3, 8, 4, 2, num_heads=2)["per_layer"]
    assert activation_bytes_per_layer(TINY, 3) == per_layer


def test_memory_per_gpu_states_split_by_t_and_p_zero_by_d():
    # Ψ = 560, t·p = 2 -> 280 per GPU; ZeRO-3 over d = 4: 16·280/4 bytes
    layout = Layout(dp=4, tp=2, zero=3, global_batch=8)
    memory = memory_per_gpu(TINY, layout)
    assert memory["states"] == 16 * 280 / 4
    assert memory["activations"] == 2 * 96 / 3 * (10 + 12 + 10)  # 2 layers, b = 1, t = 2
    stage0 = memory_per_gpu(TINY, Layout(dp=4, tp=2, global_batch=8))["states"]
    assert stage0 == 16 * 280


def test_pipeline_first_stage_holds_min_p_m_micro_batches_of_l_over_p_layers():
    one = activation_bytes_per_layer(TINY, 1)
    assert memory_per_gpu(TINY, Layout(dp=1, pp=2, global_batch=8))["activations"] == 2 * one   # 2/2·2
    assert memory_per_gpu(TINY, Layout(dp=1, pp=2, global_batch=1))["activations"] == 1 * one   # m = 1


def test_data_parallel_passes_per_stage():
    assert [passes_per_parameter(z, 4) for z in range(4)] == [2, 2, 5, 12]


def test_dp_records_bytes_and_link():
    cluster = Cluster(A100_80GB, gpus_per_node=4, links=SLOW)
    layout = Layout(dp=4, zero=3, global_batch=8)  # m = 2 micro batches
    records = dp_records(TINY, layout, cluster)
    assert [r.op for r in records] == ["all_gather"] * 4 + ["reduce_scatter"] * 2
    assert all(r.bytes == 2 * 560 and r.wire_bytes == 3 / 4 * 1120 and r.link == "intra" for r in records)
    assert dp_records(TINY, Layout(dp=8, global_batch=8), cluster)[0].link == "inter"
    assert dp_records(TINY, Layout(dp=1, global_batch=8), cluster) == []


def test_step_time_by_hand():
    gpu = GPU("toy", peak_flops=1e3, memory=1e9)
    cluster = Cluster(gpu, gpus_per_node=1, links=SLOW)  # one GPU per node: every link is the network
    layout = Layout(dp=2, tp=1, pp=2, micro_batch=1, global_batch=4)  # m = 2
    time = step_time(TINY, layout, cluster)
    compute = 8 * (3360 + 768) / 2 / 1e3                 # b·s·FLOPs/token / p / peak per micro batch
    pp = 2 * (2 * 1 * 8 * 4) / 1e3                        # two sends of 2·b·s·h bytes, inter-node (t·p = 2 > 1)
    slot = compute + pp
    dp = 2 * 1 / 2 * 2 * 280 / 1e3                        # all-reduce 2(d-1)/d·2Ψ/p, inter (d·p = 4 > 1)
    assert math.isclose(time["step"], (2 + 1) * slot + dp)
    assert math.isclose(time["bubble"], slot) and time["bubble_fraction"] == 1 / 2
    assert math.isclose(time["dp_comm"], dp)


def test_tensor_parallel_allreduces_four_per_layer_six_with_recomputation():
    gpu = GPU("toy", peak_flops=1e30, memory=1e9)  # compute free: only the all-reduces remain
    cluster = Cluster(gpu, gpus_per_node=2, links=SLOW)
    one = 2 * 1 / 2 * (2 * 8 * 4) / 1e4                   # all-reduce of 2·b·s·h bytes over t = 2, intra
    plain = step_time(TINY, Layout(dp=1, tp=2, global_batch=1), cluster)
    assert math.isclose(plain["tp_comm"], 2 * 4 * one, rel_tol=1e-12)
    again = step_time(TINY, Layout(dp=1, tp=2, global_batch=1, recompute=True), cluster)
    assert math.isclose(again["tp_comm"], 2 * 6 * one, rel_tol=1e-12)


def test_layout_refuses_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match="not a multiple of dp 3"):
        Layout(dp=3, global_batch=8).micro_batches


def test_calibrate_recovers_the_efficiency_it_was_made_with():
    model, layout, _ = megatron_row(MEGATRON_TABLE1[-1])
    cluster = Cluster(A100_80GB)
    target = simulate(model, layout, cluster, efficiency=0.5)["flops_per_gpu"]
    assert math.isclose(calibrate(model, layout, cluster, target), 0.5, rel_tol=1e-6)


def test_training_days_reproduce_megatrons_estimates():
    assert round(training_days(175e9, 300e9, 1024, 140e12)) == 34   # GPT-3 175B
    assert round(training_days(1008e9, 450e9, 3072, 163e12)) == 84  # 1T
