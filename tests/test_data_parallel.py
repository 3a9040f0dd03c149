"""Data parallel equals one process: same seed, same global batch -> same losses and weights."""
import pytest
import torch

import ds_lab
from tests import workers

GLOBAL_BATCH = 24  # divisible by N x accumulation for N in 2, 3, 4 and accumulation 1, 2
STEPS = 4


@pytest.fixture(scope="module")
def batches():
    return workers.make_batches(STEPS, GLOBAL_BATCH, workers.TINY["block_size"])


@pytest.fixture(scope="module")
def reference(batches):
    return workers.reference_train(batches)


def config(accumulation=1, **extra):
    return {"train_batch_size": GLOBAL_BATCH, "gradient_accumulation_steps": accumulation,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, **extra}


def max_weight_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


def fraction_above(a, b, threshold):
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in b])
    return (diffs > threshold).float().mean().item()


# Weights: Adam normalises every element's update to about lr (1e-3), so an element whose gradient
# is nearly zero (a sum that cancels) can move by a small fraction of one step when the N ranks sum
# in another order than one process does. We allow 1e-5 (1% of one step) on the worst element and
# require that fewer than 1 in 1000 elements differ by more than 1e-6.
WEIGHT_TOL, WEIGHT_TYPICAL_TOL = 1e-5, 1e-6


def test_tiny_model_has_a_parameter_count_divisible_by_none_of_2_3_4(batches):
    from ds_lab.models import GPT, GPTConfig
    n = GPT(GPTConfig(**workers.TINY)).num_parameters()
    assert all(n % k for k in (2, 3, 4)), n


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_data_parallel_matches_single_process_fp32(world_size, accumulation, batches, reference):
    results = ds_lab.launch(workers.dp_train_worker, world_size, config(accumulation), batches)
    for r in results:
        assert max(abs(a - b) / abs(b) for a, b in zip(r["losses"], reference["losses"])) <= 1e-5
        assert max_weight_diff(r["weights"], reference["weights"]) <= WEIGHT_TOL
        assert fraction_above(r["weights"], reference["weights"], WEIGHT_TYPICAL_TOL) < 1e-3
    # every rank ends with bit-identical weights: they applied the same averaged gradient
    for r in results[1:]:
        assert all(torch.equal(r["weights"][k], results[0]["weights"][k]) for k in r["weights"])


def test_bf16_data_parallel_matches_bf16_single_process(batches):
    """bf16 all-reduce sums in another order than one process does, so results agree to bf16
    rounding, not bit for bit. The loss itself is a bf16 number (ulp at 5.5 is 1/32), so we allow
    3e-2 relative on losses (a few ulps) and 2e-2 on weights."""
    bf16 = config(bf16={"enabled": True})
    single = ds_lab.launch(workers.dp_train_worker, 1, bf16, batches)[0]
    for r in ds_lab.launch(workers.dp_train_worker, 3, bf16, batches):
        assert max(abs(a - b) / abs(b) for a, b in zip(r["losses"], single["losses"])) <= 3e-2
        assert max_weight_diff(r["weights"], single["weights"]) <= 2e-2


def test_overlap_on_and_off_give_identical_results_and_small_buckets_split_the_reduce(batches):
    small = {"reduce_bucket_size": 2000}
    on = ds_lab.launch(workers.dp_train_worker, 2, config(zero_optimization={**small, "overlap_comm": True}), batches)
    off = ds_lab.launch(workers.dp_train_worker, 2, config(zero_optimization={**small, "overlap_comm": False}), batches)
    assert on[0]["losses"] == off[0]["losses"]
    assert all(torch.equal(on[0]["weights"][k], off[0]["weights"][k]) for k in on[0]["weights"])


@pytest.mark.parametrize("world_size", [2, 4])
def test_gradient_allreduce_bytes_per_step_equal_the_gradient_bytes(world_size, batches):
    r = ds_lab.launch(workers.dp_train_worker, world_size, config(2), batches)[0]
    assert r["grad_bytes"] == [r["num_parameters"] * 4] * STEPS  # once per step, not per micro-step


def test_fp32_adam_model_states_are_exactly_16_bytes_per_parameter(batches):
    r = ds_lab.launch(workers.dp_train_worker, 2, config(), batches)[0]
    m, psi = r["memory"], r["num_parameters"]
    assert m["padding_elements"] == 0
    assert (m["params"], m["grads"], m["optimizer_states"]) == (4 * psi, 4 * psi, 8 * psi)
    assert m["params"] + m["grads"] + m["master_params"] + m["optimizer_states"] == 16 * psi
    assert m["activations_peak"] > 0


def test_bf16_mixed_precision_model_states_are_2_2_4_8_bytes_per_parameter(batches):
    r = ds_lab.launch(workers.dp_train_worker, 2, config(bf16={"enabled": True}), batches)[0]
    m, psi = r["memory"], r["num_parameters"]
    assert (m["params"], m["grads"], m["master_params"], m["optimizer_states"]) == (2 * psi, 2 * psi, 4 * psi, 8 * psi)


def test_fp16_overflow_skips_the_step_halves_the_scale_and_training_continues(batches):
    fp16 = config(fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1})
    r = ds_lab.launch(workers.dp_train_worker, 2, fp16, batches, inject_inf_at=1)[0]
    assert r["applied"] == [True, False, True, True]
    assert r["scales"] == [2.0 ** 8, 2.0 ** 7, 2.0 ** 7, 2.0 ** 7]
    assert all(torch.isfinite(torch.tensor(r["losses"])))
    assert r["losses"][3] < r["losses"][0]


@pytest.mark.parametrize("stage, scales", [(1, [2.0 ** 8] * 4), (0, [2.0 ** 8, 2.0 ** 7, 2.0 ** 7, 2.0 ** 7])])
def test_fp16_default_hysteresis_2_absorbs_the_first_overflow_under_zero_only(stage, scales, batches):
    """DeepSpeed 0.19.8, measured (tests/test_loss_scaler.py): ZeRO's loss scaler halves on the 2nd
    overflow in a row; stage 0's fp16 optimizer has no hysteresis and halves on every overflow."""
    fp16 = config(fp16={"enabled": True, "initial_scale_power": 8}, zero_optimization={"stage": stage})
    r = ds_lab.launch(workers.dp_train_worker, 2, fp16, batches, inject_inf_at=1)[0]
    assert r["applied"] == [True, False, True, True]
    assert r["scales"] == scales


def test_fp16_default_scale_2_pow_16_overflows_at_first_and_backs_off(batches):
    """65536 x loss is past fp16's largest number (65504): DeepSpeed's familiar first skipped step
    (stage 0 has no hysteresis: the scale halves at once and the next step fits)."""
    r = ds_lab.launch(workers.dp_train_worker, 2, config(fp16={"enabled": True}), batches)[0]
    assert r["applied"][:2] == [False, True] and r["scales"][:2] == [2.0 ** 15, 2.0 ** 15]
