"""Checkpoints: resume reproduces the uninterrupted run; damaged checkpoints are refused clearly."""
import os

import pytest

import ds_lab
from ds_lab.runtime.checkpoint import MANIFEST, MODEL_FILE
from tests import workers

STEPS, SPLIT = 6, 3


@pytest.fixture(scope="module")
def batches():
    return workers.make_batches(STEPS, 12, workers.TINY["block_size"], seed=5)


CONFIGS = {
    "fp32": {"train_batch_size": 12, "gradient_accumulation_steps": 2,
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
             "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-3}}},
    "bf16": {"train_batch_size": 12, "bf16": {"enabled": True},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
    "fp16": {"train_batch_size": 12, "fp16": {"enabled": True, "initial_scale_power": 8},
             "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}},
}


@pytest.mark.parametrize("precision", list(CONFIGS))
def test_resume_in_a_fresh_launch_reproduces_the_uninterrupted_losses(precision, batches, tmp_path):
    config = CONFIGS[precision]
    straight = ds_lab.launch(workers.checkpoint_worker, 2, config, batches, str(tmp_path / "unused"))
    first = ds_lab.launch(workers.checkpoint_worker, 2, config, batches[:SPLIT], str(tmp_path / "ck"))
    second = ds_lab.launch(workers.checkpoint_worker, 2, config, batches[SPLIT:], str(tmp_path / "ck"), resume=True)
    assert first[0]["losses"] + second[0]["losses"] == straight[0]["losses"]  # exactly
    assert second[0]["client_state"] == {"data_position": SPLIT}
    assert second[0]["global_steps"] == straight[0]["global_steps"] == STEPS
    assert second[0]["lr"] == straight[0]["lr"] and second[0]["scale"] == straight[0]["scale"]
    assert open(tmp_path / "ck" / "latest").read() == f"global_step{SPLIT}"


def _saved(tmp_path, batches):
    ds_lab.launch(workers.checkpoint_worker, 2, CONFIGS["fp32"], batches[:2], str(tmp_path))
    return tmp_path / "global_step2"


def test_a_truncated_checkpoint_file_is_refused_with_its_name(batches, tmp_path):
    folder = _saved(tmp_path, batches)
    path = folder / MODEL_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ds_lab.RankError, match=r"(?s)CheckpointError.*truncated or corrupted.*mp_rank_00_model_states"):
        ds_lab.launch(workers.load_only_worker, 2, str(tmp_path), CONFIGS["fp32"])


def test_a_checkpoint_without_manifest_is_incomplete(batches, tmp_path):
    folder = _saved(tmp_path, batches)
    os.unlink(folder / MANIFEST)
    with pytest.raises(ds_lab.RankError, match="incomplete"):
        ds_lab.launch(workers.load_only_worker, 1, str(tmp_path), CONFIGS["fp32"])


def test_a_file_that_is_not_tensors_is_refused_by_weights_only(batches, tmp_path):
    import pickle
    from ds_lab.runtime.checkpoint import CheckpointError, safe_load
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(os.system))  # a pickle that would call code on a plain load
    with pytest.raises(CheckpointError, match="weights_only=True"):
        safe_load(str(evil))


def test_no_checkpoint_returns_none_like_deepspeed(tmp_path):
    assert ds_lab.launch(workers.load_only_worker, 1, str(tmp_path), CONFIGS["fp32"]) == [(None, None)]


def test_a_crash_mid_write_leaves_no_file_in_place(tmp_path):
    from ds_lab.runtime.checkpoint import atomic_write

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(tmp_path / "x.pt"), crash)
    assert os.listdir(tmp_path) == []
