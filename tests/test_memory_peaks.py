"""The ledger sees peaks: inside backward and the step, not only at quiet moments. Each figure is
checked against a count made apart, from Ψ (parameters), N (ranks) and the bytes per element."""
import pytest

import ds_lab
from tests import engine_workers as ew
from tests import workers

MODEL = dict(vocab_size=257, block_size=16, n_layer=4, n_head=4, n_embd=64)


def bf16(stage, bucket):
    return {"train_batch_size": 8, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket}}


@pytest.fixture(scope="module")
def batches():
    return workers.make_batches(2, 8, MODEL["block_size"], seed=2)


def test_stage0_peak_gradients_are_the_bf16_buffer_plus_the_fp32_copies(batches):
    r = ds_lab.launch(ew.peak_worker, 2, bf16(0, 10**9), batches, MODEL)[0]
    psi, report = r["psi"], r["report"]
    assert report["grads"] == 2 * psi                      # steady: the bf16 flat buffer
    assert report["peak"]["grads"] == 2 * psi + 4 * psi    # in the step: + the fp32 gradient copies
    assert report["peak"]["total_at"].startswith("step")


def test_stage1_peak_adds_the_fp32_shard_gradient_and_the_outgoing_shards(batches):
    n = 2
    r = ds_lab.launch(ew.peak_worker, n, bf16(1, 10**9), batches, MODEL)[0]
    report = r["report"]
    padded = sum(p for _, p, _ in r["units"])
    shard = sum(c for _, _, c in r["units"])
    assert report["grads"] == 2 * padded
    assert report["peak"]["grads"] == 2 * padded + 4 * shard
    assert report["peak"]["buffers"] >= 2 * shard  # the bf16 copies of the updated shards being sent


def test_stage2_with_a_bucket_smaller_than_the_model_never_holds_the_whole_gradient(batches):
    """The saving ZeRO-2 promises appears only when buckets are smaller than the model: then the
    gradient memory at its peak (shard + buckets in flight) stays far below the whole 2Ψ."""
    n = 2
    psi = ds_lab.launch(ew.peak_worker, 1, bf16(0, 10**9), batches[:1], MODEL)[0]["psi"]
    bucket = psi // 16
    r = ds_lab.launch(ew.peak_worker, n, bf16(2, bucket), batches, MODEL)[0]
    report = r["report"]
    shard = sum(c for _, _, c in r["units"])
    assert report["grads"] == 2 * shard  # steady: only the bf16 gradient shard
    backward = report["peak"]["by_moment"]["backward"]
    in_backward = backward["buffers"]  # reduce buckets that exist at once, at the end of backward
    assert 0 < in_backward <= 2 * 2 * bucket * 1.5  # two buckets in flight (a bucket closes past its size)
    assert backward["grads"] + in_backward < 2 * psi * 0.75  # far from the whole bf16 gradient
