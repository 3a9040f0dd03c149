"""DeepSpeed's engine API as DeepSpeed 0.19.8 has it: the accessors, backward's keyword and return
value, step(lr_kwargs), save/load_checkpoint's exclude_frozen_parameters and custom_load_fn,
save_16bit_model, and `engine.zero` failing as in DeepSpeed.

What DeepSpeed 0.19.8 does (CPU, gloo, torchrun, a Linear stack with one frozen weight) and these
tests assert of ds_lab: backward returns loss / gradient_accumulation_steps (not loss-scaled) and has
no `scale_wrt_gradient_accumulation_steps` keyword; a checkpoint saved with
exclude_frozen_parameters=True lacks the frozen weights, and loading it strictly fails ("Missing
key(s)") while load_module_strict=False loads it; custom_load_fn is called as fn(src=the saved module
state dict, dst=engine.module); load_checkpoint on a folder without `latest` returns (None, None);
`engine.zero` raises AttributeError: 'DeepSpeedEngine' object has no attribute 'zero'.
"""
import os

import pytest
import torch

import ds_lab
from ds_lab.lab import workers as lab_workers
from ds_lab.models import GPT, GPTConfig
from tests import engine_api_workers as aw
from tests import workers

ZERO_MESSAGE = "AttributeError: 'DeepSpeedEngine' object has no attribute 'zero'"


def config(stage=0, batch=8, **extra):
    return {"train_batch_size": batch, "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
            "zero_optimization": {"stage": stage}, **extra}


@pytest.fixture(scope="module")
def batches():
    return workers.make_batches(2, 8, workers.TINY["block_size"], seed=5)


def assert_weights_equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def reference_grad_norm(batch) -> float:
    """Plain PyTorch, one process, the whole batch: the gradient norm of the first step."""
    model = aw.gpt()
    model(input_ids=batch, labels=batch).loss.backward()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


@pytest.mark.parametrize("stage,extra,expect", [
    (0, {}, dict(fp16=False, bf16=False, zero_enabled=False, comm_dtype=torch.float32, clipping=1.0,
                 zero_optimizer_type="NoneType", partitions=(False, False))),
    (2, {"bf16": {"enabled": True}, "gradient_clipping": 0.5, "steps_per_print": 7},
     dict(fp16=False, bf16=True, zero_enabled=True, comm_dtype=torch.bfloat16, clipping=0.5, steps_per_print=7,
          zero_optimizer_type="ZeroStage2", partitions=(True, False))),
])
def test_accessors_answer_as_deepspeed_at_two_ranks(stage, extra, expect, batches):
    results = ds_lab.launch(aw.accessors_worker, 2, config(stage, **extra), batches[:1])
    norm = reference_grad_norm(batches[0])
    for rank, r in enumerate(results):
        assert (r["local_rank"], r["global_rank"], r["world_size"]) == (rank, rank, 2)
        assert r["stage"] == stage and r["offload_optimizer"] is None and r["offload_param"] is None
        assert r["dynamic"] is True  # fp16.loss_scale defaults to 0: DeepSpeed says True whatever the precision
        assert r["steps_per_print"] == expect.get("steps_per_print")  # DeepSpeed 0.19.8's default: None
        assert r["lr"] == [1e-2] and r["zero_optimizer_is_mode"]
        for key, value in expect.items():
            assert r[key] == value, key
        # the norm of the averaged gradient before clipping, as one process computes it on the whole batch
        assert r["norm"] == pytest.approx(norm, rel=1e-4 if stage == 0 else 3e-2)
        assert r["eval"] == (False, False) and r["train"] == (True, True)
        assert r["zero"] == ZERO_MESSAGE


def test_communication_data_type_follows_the_config_and_offload_sections_are_returned(batches):
    cfg = config(2, bf16={"enabled": True}, communication_data_type="fp32",
                 zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    r = ds_lab.launch(aw.accessors_worker, 1, {**cfg, "train_batch_size": 4}, batches[:1])[0]
    assert r["comm_dtype"] == torch.float32
    assert r["offload_optimizer"].device == "cpu" and r["offload_param"] is None


def test_the_articles_engine_zero_init_fails_as_in_deepspeed(batches):
    """The chapter's worker runs §3.1's line verbatim after initialize: the chapter prints this."""
    cfg = {"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 3}}
    r = ds_lab.launch(lab_workers.zero_train, 2, cfg, batches[:1], workers.TINY, article_call=True)[0]
    assert r["article_call"] == ZERO_MESSAGE


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_backward_returns_the_loss_over_accumulation_steps_and_scale_wrt_gas_false_does_not_divide(
        precision, batches):
    cfg = {**config(0, batch=8), "gradient_accumulation_steps": 2, "gradient_clipping": 0.0}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    gas = ds_lab.launch(aw.backward_worker, 1, cfg, batches[0], "gas")[0]
    for returned, loss in zip(gas["returned"], gas["losses"]):
        assert returned.item() == (loss / 2).item()  # not times the loss scale
    if precision == "fp16":
        assert gas["loss_scale"] == 2 ** 8
    no_gas = ds_lab.launch(aw.backward_worker, 1, cfg, batches[0], "no_gas")[0]
    doubled = ds_lab.launch(aw.backward_worker, 1, cfg, batches[0], "doubled")[0]
    assert [r.item() for r in no_gas["returned"]] == [loss.item() for loss in no_gas["losses"]]
    assert_weights_equal(no_gas["weights"], doubled["weights"])  # undivided = twice the divided loss
    with pytest.raises(AssertionError):  # and it is not what dividing gives
        assert_weights_equal(no_gas["weights"], gas["weights"], atol=1e-6)
    assert "scale_wrt_gradient_accumulation_steps" in gas["old_keyword"]  # DeepSpeed has no such keyword


def test_step_passes_lr_kwargs_to_the_scheduler_at_each_boundary_only(batches):
    cfg = {**config(1, batch=8), "gradient_accumulation_steps": 2}
    for r in ds_lab.launch(aw.lr_kwargs_worker, 2, cfg, batches):
        assert r["calls"] == [{"lr": 0.01, "step_index": 0}, {"lr": 0.02, "step_index": 1}]
        assert r["lr"] == [0.02]


def test_step_lr_kwargs_reach_the_configs_warmup_scheduler(batches):
    cfg = {**config(0, batch=4), "scheduler": {"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 10, "warmup_type": "linear"}}}
    r = ds_lab.launch(aw.warmup_lr_kwargs_worker, 1, cfg, batches[0])[0]
    assert r["last"] == 5 and r["lr"] == [pytest.approx(0.01 * 5 / 10)]


FROZEN = ("blocks.0.attn.c_attn.weight", "ln_f.bias")


@pytest.mark.parametrize("stage", [0, 2])
def test_exclude_frozen_parameters_leaves_them_out_and_only_a_non_strict_load_takes_it(stage, batches, tmp_path):
    names = {n for n, _ in aw.gpt().named_parameters()}
    assert set(FROZEN) <= names
    results = ds_lab.launch(aw.frozen_checkpoint_worker, 2, config(stage), batches, str(tmp_path), FROZEN)
    for r in results:
        assert not set(FROZEN) & set(r["module_keys"]) and "blocks.0.attn.c_proj.weight" in r["module_keys"]
        assert "load_module_strict=False" in r["strict_error"] and FROZEN[0] in r["strict_error"]
        assert r["path"] == os.path.join(str(tmp_path), "t", "mp_rank_00_model_states.pt")
        assert r["client"] == {"epoch": 3}
        for key in r["saved"]:
            want = r["before"][key] if key in FROZEN else r["saved"][key]  # frozen: kept as they were
            torch.testing.assert_close(r["loaded"][key], want, rtol=0, atol=0, msg=key)
        assert not torch.equal(r["before"][FROZEN[0]], r["saved"][FROZEN[0]])  # the two seeds differ


@pytest.mark.parametrize("stage", [0, 2])
def test_custom_load_fn_gets_the_saved_state_and_the_masters_follow_the_module(stage, batches, tmp_path):
    results = ds_lab.launch(aw.custom_load_worker, 2, config(stage), batches, str(tmp_path))
    for r in results:
        assert r["nothing"] == (None, None)
        assert r["path"] == os.path.join(str(tmp_path), "global_step2", "mp_rank_00_model_states.pt")
        assert r["calls"] == [dict(keys=r["state_keys"], module="GPT")]
        want = dict(r["saved"], **{"ln_f.weight": 2 * r["saved"]["ln_f.weight"]})
        assert_weights_equal(r["loaded"], want)
        assert_weights_equal(r["after_step"], want)  # lr 0: the masters hold the custom values too


def test_custom_load_fn_is_refused_at_zero3_with_the_fix(tmp_path):
    message = ds_lab.launch(aw.custom_load_refused_worker, 1, {**config(3), "train_batch_size": 4},
                            str(tmp_path))[0]
    assert message.startswith("CheckpointError") and "ZeRO stage 0-2" in message


@pytest.mark.parametrize("stage", [0, 3])
def test_save_16bit_model_writes_the_whole_bf16_weights_from_rank_0(stage, batches, tmp_path):
    zero = {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}
    cfg = config(stage, bf16={"enabled": True}, zero_optimization=zero)
    results = ds_lab.launch(aw.save_16bit_worker, 2, cfg, batches, str(tmp_path))
    assert all(r["saved"] is True and r["alias"] is True and r["exists"] for r in results)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert_weights_equal(state, results[0]["whole"])
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert_weights_equal(torch.load(tmp_path / "alias.bin", weights_only=True), state)
    fresh = GPT(GPTConfig(**workers.TINY)).to(torch.bfloat16)
    fresh.load_state_dict(state)  # strict: every key of the model, nothing else
    assert torch.equal(fresh.lm_head.weight, state["lm_head.weight"])
    if stage == 3:  # one gathered run equals the other rank's gathered weights
        assert_weights_equal(results[1]["whole"], results[0]["whole"])


def test_save_16bit_model_at_zero3_without_the_gather_flag_returns_false_and_writes_nothing(batches, tmp_path):
    results = ds_lab.launch(aw.save_16bit_worker, 2, config(3), batches[:1], str(tmp_path))
    assert [r["saved"] for r in results] == [False, False] and not os.listdir(tmp_path)


def test_save_16bit_model_in_fp32_excludes_frozen_parameters(batches, tmp_path):
    results = ds_lab.launch(aw.save_16bit_worker, 2, config(0), batches[:1], str(tmp_path), FROZEN)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert not set(FROZEN) & set(state)
    whole = {k: v for k, v in results[0]["whole"].items() if k not in FROZEN}
    assert_weights_equal(state, whole)
    assert all(v.dtype == torch.float32 for v in state.values())
