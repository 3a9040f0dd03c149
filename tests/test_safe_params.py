"""deepspeed.utils' safe_* functions reach a ZeRO-partitioned parameter's whole fp32 state at every stage.

World 2, stages 0-3, fp32 (and bf16 for what does not depend on rounding). What the functions return
is compared with computations that do not use them: the model's own weights, and plain PyTorch
(one process, the whole batch, torch.optim.AdamW) for the gradient and Adam's moments. A value set
through them must be where the next step starts: checked against Adam's update written out by hand.
"""
import pytest
import torch

import ds_lab
from ds_lab.runtime.precision import DTYPES
from tests import safe_params_workers as spw
from tests.zero_workers import Net, make_batches

STAGES = (0, 1, 2, 3)
CASES = [(stage, "fp32") for stage in STAGES] + [(0, "bf16"), (2, "bf16"), (3, "bf16")]
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8  # tests/zero_workers.ADAM (AdamW, no weight decay)


@pytest.fixture(scope="module")
def batches():
    return make_batches(2, 8)


@pytest.fixture(scope="module")
def runs(batches):
    return ds_lab.launch(spw.safe_params_worker, 2, CASES, batches)


@pytest.fixture(scope="module")
def reference(batches):
    """Plain PyTorch: the start weights, the first step's gradients, Adam's moments after it."""
    torch.manual_seed(0)
    model = Net("plain")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    model(*batches[0]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    states = {key: {n: optimizer.state[p][key].clone() for n, p in model.named_parameters()}
              for key in spw.KEYS}
    return dict(start=start, grads=grads, states=states)


@pytest.mark.parametrize("case", CASES)
def test_get_full_fp32_param_is_the_whole_master_on_every_rank(runs, reference, case):
    for out in runs:
        run = out[case]
        for name, value in reference["start"].items():
            # the masters start at the weights rounded to the model's dtype, as DeepSpeed's (runtime/precision.py)
            start = value if case[1] == "fp32" else value.to(DTYPES[case[1]]).float()
            assert torch.equal(run["before"][name], start), name
            assert torch.equal(run["after_step"][name], runs[0][case]["after_step"][name]), name
            if case[1] == "fp32":
                assert torch.equal(run["after_step"][name], run["weights_after_step"][name]), name


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == "fp32"])
def test_get_full_grad_after_backward_is_the_whole_batch_gradient(runs, reference, case):
    for out in runs:
        for name, grad in reference["grads"].items():
            assert torch.allclose(out[case]["grads"][name], grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == "fp32"])
def test_get_full_optimizer_state_is_adams_whole_moment(runs, reference, case):
    for out in runs:
        for key in spw.KEYS:
            for name, value in reference["states"][key].items():
                assert torch.allclose(out[case]["states"][key][name], value, rtol=1e-5, atol=1e-9), (key, name)


@pytest.mark.parametrize("case", CASES)
def test_optimizer_state_before_the_first_step_is_an_error_naming_the_key(runs, case):
    if case == (0, "bf16"):  # DeepSpeed's stage-0 bf16 optimizer steps once with zero gradients at init
        assert runs[0][case]["state_before_step"] == "no error"
        return
    assert "'exp_avg' not found" in runs[0][case]["state_before_step"]


@pytest.mark.parametrize("case", CASES)
def test_set_then_get_returns_the_value_and_the_model_sees_it(runs, case):
    for out in runs:
        run = out[case]
        for name in spw.EDITED:
            values = spw.edit_values(name, reference_shape(run, name))
            for key in ("param",) + spw.KEYS:
                assert torch.equal(run["read_back"][name][key], values[key]), (name, key)
            model_value = values["param"] if case[1] == "fp32" else values["param"].bfloat16().float()
            assert torch.equal(run["model_after_set"][name].float(), model_value), name


def reference_shape(run, name):
    return run["before"][name].shape


@pytest.mark.parametrize("case", CASES)
def test_the_next_step_starts_from_what_was_set(runs, case):
    """AdamW at step t from the set (p, m, v) and the measured gradient g, written out by hand."""
    b1, b2 = BETAS
    t = 3 if case == (0, "bf16") else 2  # stage-0 bf16: Adam's zero-gradient step at init came first
    for out in runs:
        run = out[case]
        for name in spw.EDITED:
            values, g = spw.edit_values(name, reference_shape(run, name)), run["grads_2"][name]
            m = b1 * values["exp_avg"] + (1 - b1) * g
            v = b2 * values["exp_avg_sq"] + (1 - b2) * g * g
            expected = values["param"] - LR / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + EPS)
            assert torch.allclose(run["after_step_2"][name], expected, rtol=1e-5, atol=1e-6), name
            assert not torch.allclose(run["after_step_2"][name], run["after_step"][name])


def test_a_parameter_no_engine_trains_gives_none(runs):
    assert all(out[case]["unmanaged"] is None for out in runs for case in CASES)


@pytest.mark.parametrize("world_size,editor,persistence", [(2, 1, 100_000), (3, 0, 100_000), (2, 0, 0), (3, 2, 0)])
def test_an_edit_without_modifier_rank_raises_on_every_rank_and_is_dropped(world_size, editor, persistence):
    """DeepSpeed 0.19.8's GatheredParameters._exit: an in-place change with modifier_rank=None is detected
    (one all-reduce of a flag), every rank partitions the old values again and raises."""
    results = ds_lab.launch(spw.unannounced_edit_worker, world_size, editor, persistence)
    for r in results:
        assert r["error"] is not None and "modifier_rank=<rank>" in r["error"]
        assert torch.equal(r["after"], r["whole"])  # the edit is gone on every rank, the editor's too
        assert torch.equal(r["master"], r["before"])
