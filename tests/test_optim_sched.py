"""Optimizer and scheduler types of issue 13: Lamb (DeepSpeed's FusedLamb), Adam's `torch_adam`,
and the OneCycle / LRRangeTest schedules, checked against DeepSpeed's own numbers.

tests/deepspeed_lr_schedules.json holds the lrs and betas DeepSpeed 0.19.8's own OneCycle and
LRRangeTest classes wrote into a torch.optim.Adam with two param groups (lr 0.5, betas (0.9, 0.999))
at construction and after each of 25 `step()`s, for the configs listed in it. It was made by this
script, run with DeepSpeed's Python (`DS_ACCELERATOR=cpu python gen.py tests/deepspeed_lr_schedules.json`);
DeepSpeed is never imported by the tests:

    import json, sys, torch
    from deepspeed.runtime.lr_schedules import OneCycle, LRRangeTest
    CASES = [  # (type, params): the "params" of each case in the JSON file
        ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "cycle_first_step_size": 5,
                      "decay_lr_rate": 0.1, "decay_step_size": 3, "decay_mom_rate": 0.05}),
        ...]
    out = []
    for name, params in CASES:
        a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.5, betas=(0.9, 0.999))
        sched = {"OneCycle": OneCycle, "LRRangeTest": LRRangeTest}[name](opt, **params)
        lrs, betas = [[g["lr"] for g in opt.param_groups]], [[list(g["betas"]) for g in opt.param_groups]]
        for _ in range(25):
            sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
            betas.append([list(g["betas"]) for g in opt.param_groups])
        out.append({"type": name, "params": params, "lrs": lrs, "betas": betas})
    json.dump({"deepspeed_version": deepspeed.__version__, ..., "cases": out}, open(sys.argv[1], "w"), indent=1)
"""
import json
import math
import pathlib

import pytest
import torch

import ds_lab
from ds_lab.config import DeepSpeedConfig
from ds_lab.optim import Adam, Lamb, build_optimizer
from ds_lab.runtime.lr_schedules import LRRangeTest, OneCycle, build_scheduler
from tests import api_surface_workers as workers

FIXTURE = json.loads((pathlib.Path(__file__).parent / "deepspeed_lr_schedules.json").read_text())


# ---------------------------------------------------------------- OneCycle, LRRangeTest

@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: f"{c['type']}-{sorted(c['params'])[0]}")
def test_schedules_write_exactly_deepspeeds_lrs_and_betas(case):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = Adam([{"params": [a]}, {"params": [b]}], lr=FIXTURE["initial_lr"],
                     betas=tuple(FIXTURE["initial_betas"]))
    # through the config, as a "scheduler" section builds it
    config = DeepSpeedConfig.from_any({"train_batch_size": 1, "scheduler": {"type": case["type"],
                                                                              "params": case["params"]}})
    scheduler = build_scheduler(config.scheduler, optimizer)
    lrs = [[g["lr"] for g in optimizer.param_groups]]
    betas = [[list(g["betas"]) for g in optimizer.param_groups]]
    for _ in range(FIXTURE["steps"]):
        scheduler.step()
        lrs.append([g["lr"] for g in optimizer.param_groups])
        betas.append([list(g["betas"]) for g in optimizer.param_groups])
    assert lrs == case["lrs"]  # exactly: the same float operations in the same order
    assert betas == case["betas"]


def test_one_cycle_resumes_from_its_state_dict():
    def make():
        p = torch.nn.Parameter(torch.zeros(2))
        optimizer = Adam([p], lr=1.0)
        return optimizer, OneCycle(optimizer, 0.01, 0.1, cycle_first_step_size=3, decay_lr_rate=0.2,
                                   decay_step_size=2)
    optimizer, scheduler = make()
    for _ in range(5):
        scheduler.step()
    resumed_optimizer, resumed = make()
    resumed.load_state_dict(scheduler.state_dict())
    scheduler.step(), resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert resumed_optimizer.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]


def test_one_cycle_without_betas_warns_and_cycles_lr_only():
    p = torch.nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([p], lr=1.0)
    with pytest.warns(UserWarning, match="cycle_momentum is disabled"):
        scheduler = OneCycle(sgd, 0.01, 0.1, cycle_first_step_size=2)
    scheduler.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.055) and "betas" not in sgd.param_groups[0]


def test_schedule_configs_are_checked():
    with pytest.raises(ds_lab.ConfigError, match="needs scheduler.params.cycle_min_lr"):
        DeepSpeedConfig.from_any({"train_batch_size": 1, "scheduler": {"type": "OneCycle", "params": {}}})
    with pytest.raises(ds_lab.ConfigError, match="lr_range_test_step_size"):
        DeepSpeedConfig.from_any({"train_batch_size": 1, "scheduler": {"type": "LRRangeTest",
                                                                        "params": {"lr_range_test_step_size": 0}}})
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="lr_range_test_step_size"):
        LRRangeTest(Adam([p]), lr_range_test_step_size=1.5)


# ---------------------------------------------------------------- Lamb

def reference_lamb(weights, grads, lr, betas, eps, weight_decay, bias_correction, eps_inside_sqrt,
                   max_coeff, min_coeff):
    """LAMB per tensor in float64, written from DeepSpeed's kernel (csrc/lamb/fused_lamb_cuda_kernel.cu):
    one list of gradients per step; returns the final weights and each step's coefficients."""
    beta1, beta2 = betas
    weights = [w.double().clone() for w in weights]
    ms = [torch.zeros_like(w) for w in weights]
    vs = [torch.zeros_like(w) for w in weights]
    coefficients = []
    for t, step_grads in enumerate(grads, start=1):
        step = []
        for i, g in enumerate(step_grads):
            g = g.double()
            ms[i] = beta1 * ms[i] + (1 - beta1) * g
            vs[i] = beta2 * vs[i] + (1 - beta2) * g * g
            denom = torch.sqrt(vs[i] + eps) if eps_inside_sqrt else torch.sqrt(vs[i]) + eps
            update = ms[i] / denom + weight_decay * weights[i]
            w_norm, u_norm = float(torch.linalg.norm(weights[i])), float(torch.linalg.norm(update))
            coeff = 1.0
            if w_norm != 0 and u_norm != 0:
                coeff = min(max(w_norm / u_norm, min_coeff), max_coeff)
            if bias_correction:
                step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            else:
                step_size = lr
            weights[i] = weights[i] - step_size * coeff * update
            step.append(coeff)
        coefficients.append(step)
    return weights, coefficients


@pytest.mark.parametrize("options", [
    dict(),
    dict(weight_decay=0.01, bias_correction=False),
    dict(eps_inside_sqrt=True, betas=(0.8, 0.9), lr=0.05),
    dict(max_coeff=0.5, min_coeff=0.2, weight_decay=0.1),  # both clamps reached
])
def test_lamb_equals_a_per_tensor_reference(options):
    hyper = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True,
                 eps_inside_sqrt=False, max_coeff=10.0, min_coeff=0.01)
    hyper.update(options)
    torch.manual_seed(0)
    # a large tensor, a tiny one (its coefficient clamped at min_coeff), and a zero one (coefficient 1)
    start = [torch.randn(6, 4) * 3, torch.randn(9) * 1e-3, torch.zeros(3)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(8)]
    params = [torch.nn.Parameter(w.clone()) for w in start]
    optimizer = Lamb(params, **hyper)
    ours = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
        ours.append(optimizer.get_lamb_coeffs())
    expected, coefficients = reference_lamb(start, grads, **hyper)
    for p, w in zip(params, expected):
        assert torch.allclose(p.double(), w, rtol=1e-5, atol=1e-6), (p, w)
    assert sum(ours, []) == pytest.approx(sum(coefficients, []), rel=1e-5)
    assert coefficients[0][2] == 1.0  # zero weights: the ratio is undefined, the coefficient is 1
    assert coefficients[0][0] == hyper["max_coeff"] or coefficients[0][1] == hyper["min_coeff"]


def test_lamb_config_defaults_and_deepspeeds_refusals():
    config = DeepSpeedConfig.from_any({"train_batch_size": 1, "optimizer": {"type": "Lamb",
                                                                             "params": {"lr": 0.02}}})
    assert config.optimizer.type == "Lamb"
    assert config.optimizer.params == dict(lr=0.02, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                                           eps_inside_sqrt=False, weight_decay=0.0, max_coeff=10.0, min_coeff=0.01)
    assert isinstance(build_optimizer(config.optimizer, [torch.nn.Parameter(torch.zeros(2))]), Lamb)
    base = {"train_batch_size": 1, "optimizer": {"type": "Lamb"}}
    with pytest.raises(ds_lab.ConfigError, match="gradient_clipping"):
        DeepSpeedConfig.from_any({**base, "optimizer": {"type": "Lamb", "params": {"max_grad_norm": 1.0}}})
    with pytest.raises(ds_lab.ConfigError, match="dynamic loss scaling"):
        DeepSpeedConfig.from_any({**base, "fp16": {"enabled": True, "loss_scale": 128}})
    with pytest.raises(ds_lab.ConfigError, match="AMSGrad"):
        DeepSpeedConfig.from_any({**base, "optimizer": {"type": "Lamb", "params": {"amsgrad": True}}})


def test_lamb_from_the_config_two_ranks_equal_one():
    config = {"train_batch_size": workers.GLOBAL_BATCH, "gradient_clipping": 0.0,
              "optimizer": {"type": "Lamb", "params": {"lr": 0.01, "weight_decay": 0.01}}}
    one = ds_lab.launch(workers.train_worker, 1, config, None, 4)[0]
    two = ds_lab.launch(workers.train_worker, 2, config, None, 4)
    assert one["optimizer"] == "Lamb" and one["losses"][-1] < one["losses"][0]
    for rank in two:
        assert rank["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert torch.allclose(rank["weights"], one["weights"], atol=1e-6)


# ---------------------------------------------------------------- torch_adam

def test_torch_adam_is_accepted_and_takes_the_torch_path(monkeypatch):
    import ds_lab.optim.adam as adam_module
    config = DeepSpeedConfig.from_any({"train_batch_size": 1, "optimizer": {
        "type": "Adam", "params": {"lr": 0.01, "torch_adam": True, "weight_decay": 0.1}}})
    assert config.optimizer.type == "AdamW" and config.optimizer.params["torch_adam"] is True
    backends = []
    real = adam_module.fused_adam_step
    monkeypatch.setattr(adam_module, "fused_adam_step",
                        lambda *a, **k: (backends.append(k.get("backend")), real(*a, **k)))
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    q = torch.nn.Parameter(p.detach().clone())
    ours, theirs = build_optimizer(config.optimizer, [p]), torch.optim.AdamW([q], lr=0.01, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(5)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step(), theirs.step()
    assert backends == ["torch"] * 3 and torch.allclose(p, q, atol=1e-7)


def test_one_cycle_from_the_config_cycles_the_engines_betas():
    config = {"train_batch_size": workers.GLOBAL_BATCH, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
              "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01,
                                                           "cycle_first_step_size": 2}}}
    result = ds_lab.launch(workers.train_worker, 1, config, None, 4)[0]
    assert result["scheduler"] == "OneCycle"
    assert [lr[0] for lr in result["lrs"]] == pytest.approx([0.0055, 0.01, 0.0055, 0.001])
    assert [b[0][0] for b in result["betas"]] == pytest.approx([0.85, 0.8, 0.85, 0.9])
    assert {b[0][1] for b in result["betas"]} == {0.99}  # DeepSpeed's OneCycle writes beta2 = 0.99
