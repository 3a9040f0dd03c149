"""The engine's one path over one grid: no mode branch, an mpu's groups used, norms counted once,
checkpoints keyed by the grid, no_sync and the manual boundary, and the edges an audit found."""
import ast
import pathlib

import pytest
import torch

import ds_lab
from tests import engine_workers as ew
from tests import workers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config(stage=0, **extra):
    return {"train_batch_size": 12, "gradient_clipping": 0.0,
            "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000}, **extra}


@pytest.fixture(scope="module")
def batches():
    return workers.make_batches(3, 12, workers.TINY["block_size"], seed=3)


def assert_weights_equal(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=k)


def test_engine_py_never_asks_which_mode_it_runs():
    """No `if` in engine.py reads the stage, the ZeRO object, the reducer or the masters."""
    tree = ast.parse((ROOT / "ds_lab/runtime/engine.py").read_text())
    words = ("stage", "zero", "reducer", "master_of", "DataParallel", "Zero")
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp)):
            test = ast.unparse(node.test)
            assert not any(w in test for w in words), f"engine.py line {node.lineno} branches on the mode: {test}"
    source = (ROOT / "ds_lab/runtime/engine.py").read_text()
    assert "import ds_lab.zero" not in source and "from ds_lab.zero" not in source


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_an_mpu_supplies_the_data_group_and_the_norm_counts_model_copies_once(stage, batches):
    """4 ranks = 2 data x 2 model (the model replicated on the model axis): equal to one process
    on the whole batch, and the global norm (clipping on) is the single-process norm."""
    clipped = {**config(stage), "train_batch_size": 12, "gradient_clipping": 0.5}
    one = ds_lab.launch(ew.mpu_train_worker, 1, clipped, batches, 1)[0]
    four = ds_lab.launch(ew.mpu_train_worker, 4, clipped, batches, 2)
    assert [r["dp_rank"] for r in four] == [0, 0, 1, 1]
    assert one["norms"][0] > 0.5  # clipping really acted
    for r in four:
        assert r["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert r["norms"] == pytest.approx(one["norms"], rel=1e-5)
        assert_weights_equal(r["weights"], one["weights"])


def test_checkpoint_files_carry_the_model_parallel_rank(batches, tmp_path):
    results = ds_lab.launch(ew.mpu_train_worker, 4, config(1), batches[:1], 2, str(tmp_path))
    files = results[0]["files"]
    assert "mp_rank_00_model_states.pt" in files and "mp_rank_01_model_states.pt" in files
    assert {f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in (0, 1) for m in (0, 1)} <= set(files)


@pytest.mark.parametrize("stage", [0, 1])
def test_no_sync_accumulates_locally_and_one_backward_outside_synchronises(stage, batches):
    cfg = {**config(stage), "train_batch_size": 4 * 2}  # micro 4 per rank at world 2
    one = ds_lab.launch(ew.no_sync_worker, 1, {**cfg, "train_batch_size": 4}, batches)[0]
    two = ds_lab.launch(ew.no_sync_worker, 2, cfg, batches)
    for r in two:
        assert_weights_equal(r["weights"], one["weights"])
        assert "inside no_sync" in r["step_inside"]
        buckets = r["reduces"][0]
        assert buckets >= 1 and r["reduces"] == [buckets] * len(batches)  # one sync per step, not per micro
        assert r["global_steps"] == len(batches)


@pytest.mark.parametrize("stage", [2, 3])
def test_no_sync_is_refused_where_gradients_are_partitioned(stage):
    message = ds_lab.launch(ew.no_sync_refused_worker, 1, {**config(stage), "train_batch_size": 4})[0]
    assert "incompatible with gradient partitioning" in message


def test_set_gradient_accumulation_boundary_decides_when_the_step_acts():
    cfg = {**config(0), "train_batch_size": 4, "gradient_accumulation_steps": 2}
    r = ds_lab.launch(ew.boundary_override_worker, 2, cfg, [False, False, True, False, True])[0]
    assert r["applied"] == [False, False, True, False, True] and r["global_steps"] == 2


def test_a_client_lr_scheduler_wins_over_the_config_one():
    cfg = {"train_batch_size": 2, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}
    r = ds_lab.launch(ew.client_scheduler_worker, 1, cfg)[0]
    assert r["returned_is_client"] and r["engine_has_client"] and r["lr"] == pytest.approx(0.05)


BIGGER = dict(workers.TINY, n_embd=40)


@pytest.mark.parametrize("stage", [0, 3])
def test_loading_into_a_model_of_another_shape_names_the_parameter(stage, batches, tmp_path):
    ds_lab.launch(ew.save_worker, 2, config(stage), batches[:1], str(tmp_path))
    with pytest.raises(ds_lab.RankError, match=r"parameter '[\w.]+': the checkpoint .* has shape \[\d+(, \d+)?\], this model"):
        ds_lab.launch(ew.load_worker, 2, config(stage), [], str(tmp_path), model=BIGGER)
    smaller = dict(workers.TINY, n_layer=1)
    with pytest.raises(ds_lab.RankError, match=r"has parameters this model lacks: \['blocks.1"):
        ds_lab.launch(ew.load_worker, 2, config(stage), [], str(tmp_path), model=smaller)


def test_an_fp32_stage0_checkpoint_continues_in_bf16_from_its_weights(batches, tmp_path):
    saved = ds_lab.launch(ew.save_worker, 2, config(0), batches[:2], str(tmp_path))[0]
    bf16 = {**config(0), "bf16": {"enabled": True}, "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
    r = ds_lab.launch(ew.load_worker, 2, bf16, batches[2:], str(tmp_path), load_optimizer_states=False)[0]
    # lr 0: the step changes nothing, so after it the model must still hold the loaded weights
    # (bf16-rounded), not its own initial ones: the masters were refreshed by the load
    for k, v in saved["weights"].items():
        torch.testing.assert_close(r["weights"][k], v.to(torch.bfloat16).float(), rtol=0, atol=0, msg=k)
    # and the fp32 masters hold the checkpoint's fp32 values exactly, not their bf16 rounding
    by_shape = {}
    for v in saved["weights"].values():
        by_shape.setdefault(tuple(v.shape), []).append(v)
    unique = [m for m in r["masters"] if len(by_shape.get(tuple(m.shape), [])) == 1]
    assert len(unique) >= 1  # e.g. the position embedding: a shape no other parameter has
    for m in unique:
        assert torch.equal(m, by_shape[tuple(m.shape)][0])
        assert not torch.equal(m, m.to(torch.bfloat16).float())  # really finer than bf16


def test_load_module_only_leaves_counters_scheduler_and_scale_alone(batches, tmp_path):
    fp16 = {**config(0), "fp16": {"enabled": True, "initial_scale_power": 6},
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    ds_lab.launch(ew.save_worker, 2, fp16, batches[:2], str(tmp_path))
    r = ds_lab.launch(ew.load_worker, 2, fp16, [], str(tmp_path), load_module_only=True)[0]
    assert r["counters"]["global_steps"] == 0 and r["counters"]["global_samples"] == 0
    assert r["counters"]["loss_scale"] == 2.0 ** 6
    full = ds_lab.launch(ew.load_worker, 2, fp16, [], str(tmp_path))[0]
    assert full["counters"]["global_steps"] == 2


@pytest.mark.parametrize("saved_stage", [1, 2])
def test_a_stage_1_or_2_checkpoint_continues_at_stage_3(saved_stage, batches, tmp_path):
    adam = lambda s: {**config(s), "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}  # noqa: E731
    ds_lab.launch(ew.save_worker, 2, adam(saved_stage), batches[:2], str(tmp_path))
    same = ds_lab.launch(ew.load_worker, 2, adam(saved_stage), batches[2:], str(tmp_path))[0]
    three = ds_lab.launch(ew.load_worker, 3, {**adam(3), "train_batch_size": 12}, batches[2:], str(tmp_path))[0]
    assert_weights_equal(three["loaded"], same["loaded"])
    assert three["losses"] == pytest.approx(same["losses"], rel=1e-5)
    assert_weights_equal(three["weights"], same["weights"])


@pytest.mark.parametrize("first,second", [(3, 0), (2, 0), (3, 3), (0, 3)])
def test_initialize_again_on_the_same_model_takes_it_over(first, second, batches):
    r = ds_lab.launch(ew.reinitialize_worker, 2, config(first), config(second), batches)[0]
    assert r["again"] == pytest.approx(r["expected"], rel=1e-6)


def test_fp16_auto_cast_casts_positional_float_inputs_as_deepspeed():
    assert ds_lab.launch(ew.auto_cast_worker, 1, True)[0] == ["torch.float16", "torch.float32"]
    assert ds_lab.launch(ew.auto_cast_worker, 1, False)[0] == ["torch.float32", "torch.float32"]
