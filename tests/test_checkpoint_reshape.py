"""Checkpoints across shapes (issue 9): saved at one (pipe, data, model) grid, loaded directly at another
— tensor-parallel 2 -> 1 and 4, ZeRO-2/3 TP2 x DP2 -> TP1 x DP2, pipeline PP2 (x TP2) -> PP1 and PP4 —
and `ds_lab.zero.consolidate` giving one fp32 state_dict, loadable with strict=True into the unsharded
model (the ds_lab GPT, Hugging Face GPT-2 after AutoTP, a one-stage PipelineModule)."""
import os

import pytest
import torch

import ds_lab
from ds_lab.runtime.safe_load import safe_load
from tests import pipe_workers as pw
from tests import reshape_workers as rw
from tests import workers


@pytest.fixture(scope="module")
def batches():
    return workers.make_batches(3, 8, 16, seed=5)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def gpt_from(state):
    from ds_lab.models import GPT, GPTConfig
    model = GPT(GPTConfig(**rw.TP_MODEL))
    model.load_state_dict(state, strict=True)
    return model


def test_a_tp2_checkpoint_loads_at_tp1_and_tp4_with_the_same_weights_and_loss(batches, tmp_path):
    saved = ds_lab.launch(rw.save_worker, 2, 2, 0, batches[:2], batches[2], str(tmp_path))[0]
    model_file = safe_load(str(tmp_path / "global_step2" / "mp_rank_01_model_states.pt"))
    assert model_file["grid"] == {"pipe": 1, "data": 1, "model": 2}
    layout = model_file["tensor_parallel"]
    assert layout["blocks.0.attn.c_attn.weight"] == [0, 3, 3 * 36]  # fused q|k|v: stride 3
    assert layout["blocks.0.attn.c_proj.weight"] == [1, 1, 36]  # row parallel
    assert layout["wte.weight"] == [0, 1, 257]  # the unpadded vocabulary (padded to 258 at T=2)
    for world, tensor_size in ((1, 0), (4, 4)):  # the plain GPT, and TP4 (vocabulary padded to 260)
        for r in ds_lab.launch(rw.load_worker, world, tensor_size, 0, batches[2], str(tmp_path)):
            assert "load_optimizer_states=False" in r["refusal"] and "model 2" in r["refusal"]
            assert_same(r["weights"], saved["weights"])
            assert r["steps"] == saved["steps"]
            assert r["loss"] == pytest.approx(saved["loss"], rel=1e-5)
            assert r["step_loss"] == pytest.approx(saved["loss"], rel=1e-5)  # lr 0: the loaded weights train
            assert_same(r["after_step"], saved["weights"])
    state = ds_lab.zero.consolidate(str(tmp_path))
    assert_same(dict(gpt_from(state).state_dict()), saved["weights"])


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_tp2_dp2_loads_weights_at_tp1_dp2_and_consolidates(stage, batches, tmp_path):
    saved = ds_lab.launch(rw.save_worker, 4, 2, stage, batches[:2], batches[2], str(tmp_path))[0]
    files = set(os.listdir(tmp_path / "global_step2"))
    assert {f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in (0, 1) for m in (0, 1)} <= files
    for r in ds_lab.launch(rw.load_worker, 2, 0, stage, batches[2], str(tmp_path), False):  # weights only
        assert_same(r["weights"], saved["weights"])
        assert r["loss"] == pytest.approx(saved["loss"], rel=1e-5)
        assert_same(r["after_step"], saved["weights"])
    state = ds_lab.zero.consolidate(str(tmp_path))
    assert all(v.dtype == torch.float32 for v in state.values())
    assert_same(dict(gpt_from(state).state_dict()), saved["weights"])


@pytest.mark.parametrize("saved_stage,world,tensor_size,stage", [(2, 2, 0, 2), (3, 4, 4, 1), (1, 1, 0, 3)])
def test_zero_optimizer_state_is_resharded_across_tensor_parallel_sizes(saved_stage, world, tensor_size, stage,
                                                                        batches, tmp_path):
    """Saved at TP2 x DP2 after 2 steps of SGD with momentum; resumed at another (data, model) shape and
    ZeRO stage: the next two steps equal the saved shape's own continuation (momentum carried over)."""
    saved = ds_lab.launch(rw.save_worker, 4, 2, saved_stage, batches[:1], batches[2], str(tmp_path),
                          batches[1:3])[0]
    for r in ds_lab.launch(rw.resume_worker, world, tensor_size, stage, batches[1:3], str(tmp_path)):
        assert r["steps"] == 3
        assert r["losses"] == pytest.approx(saved["continued"], rel=1e-5)
        for k, v in saved["continued_weights"].items():
            torch.testing.assert_close(r["weights"][k], v, rtol=0, atol=2e-6, msg=k)


def test_stage0_optimizer_state_is_refused_across_a_model_parallel_change(batches, tmp_path):
    ds_lab.launch(rw.save_worker, 2, 2, 0, batches[:1], batches[2], str(tmp_path))
    with pytest.raises(ds_lab.RankError, match="load_optimizer_states=False"):
        ds_lab.launch(rw.resume_worker, 2, 0, 2, batches[1:2], str(tmp_path))


def test_autotp_gpt2_consolidates_into_the_hugging_face_model(tmp_path):
    pytest.importorskip("transformers")
    from tests import autotp_workers as aw
    gathered = ds_lab.launch(rw.autotp_save_worker, 2, str(tmp_path))[0]
    state = ds_lab.zero.consolidate(str(tmp_path))
    model = aw.build("gpt2", seed=11)
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    for k, v in gathered.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(loaded["transformer.h.0.attn.c_attn.weight"],
                           aw.build("gpt2").state_dict()["transformer.h.0.attn.c_attn.weight"])  # it trained


def _union(results):
    whole = {}
    for r in results:
        whole.update(r["state"])
    return whole


def test_a_pipeline_consolidates_to_one_state_dict_and_loads_at_another_pipe_size(tmp_path):
    data = pw.make_data(1, 16)
    saved = _union(ds_lab.launch(rw.pipe_save_worker, 2, str(tmp_path), 2, 1, data))
    state = ds_lab.zero.consolidate(str(tmp_path))
    assert_same(state, saved)
    one = ds_lab.launch(rw.pipe_load_worker, 1, str(tmp_path), 1, 1, False, state)[0]
    assert_same(one, saved)  # strict into the one-stage PipelineModule
    for part in ds_lab.launch(rw.pipe_load_worker, 4, str(tmp_path), 4, 1, False):  # PP2 -> PP4, by name
        for k, v in part.items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)


def test_pipeline_with_tensor_parallel_layers_pp2_tp2_loads_at_pp1_tp1(tmp_path):
    data = pw.make_data(1, 16)
    results = ds_lab.launch(rw.pipe_save_worker, 4, str(tmp_path), 2, 2, data)
    saved = _union([r for r in results if r["model_rank"] == 0])
    assert "layer_02-model_01-model_states.pt" in os.listdir(tmp_path / "global_step1")
    state = ds_lab.zero.consolidate(str(tmp_path))
    assert_same(state, saved)
    one = ds_lab.launch(rw.pipe_load_worker, 1, str(tmp_path), 1, 1, True)[0]  # an engine at PP1 x TP1
    assert_same(one, saved)


@pytest.mark.parametrize("world,stages", [(4, 4), (2, 1)])
def test_a_zero1_pipeline_resumes_with_its_optimizer_state_at_another_pipe_and_data_size(world, stages, tmp_path):
    """PP2 x DP2 ZeRO-1 (SGD momentum) -> PP4 x DP1 and PP1 x DP2: the same global batches give the
    losses the saved shape's own continuation gave."""
    data = pw.make_data(3, 8)
    saved = ds_lab.launch(rw.pipe_save_worker, 4, str(tmp_path), 2, 1, data, 1)[0]
    for losses in ds_lab.launch(rw.pipe_resume_worker, world, str(tmp_path), stages, data[1:], 1):
        assert losses == pytest.approx(saved["continued"], rel=1e-5)
