"""Specification of ds_lab.runtime.lr_schedules: DeepSpeed's warmup schedules, value by value.

Expected values are computed here from the formulas, independently of the module.
"""
import io
import math

import pytest
import torch

from ds_lab.config import SchedulerConfig
from ds_lab.runtime.lr_schedules import SCHEDULERS, WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler


class ParamGroups:
    """All a schedule touches on an optimizer. (A real torch optimizer costs ~1 s to first build: it
    imports torch._dynamo; one test below uses one.)"""

    def __init__(self, *lrs):
        self.param_groups = [{"params": [], "lr": lr} for lr in lrs]


def make_optimizer(*lrs):
    return ParamGroups(*lrs)


def lrs_after(scheduler, optimizer, steps):
    """lr of every group after ``steps`` calls to step(), i.e. at t = steps - 1."""
    for _ in range(steps):
        scheduler.step()
    return [group["lr"] for group in optimizer.param_groups]


def warmup(t, warmup_steps, kind):
    return math.log(t + 1) / math.log(warmup_steps) if kind == "log" else t / warmup_steps


@pytest.mark.parametrize("kind", ["log", "linear"])
@pytest.mark.parametrize("t", [0, 1, 4, 9, 10, 50])
def test_warmup_lr_follows_the_warmup_curve_then_holds(kind, t):
    low, high, steps = 0.01, 0.1, 10
    optimizer = make_optimizer(0.5)
    scheduler = WarmupLR(optimizer, warmup_min_lr=low, warmup_max_lr=high, warmup_num_steps=steps, warmup_type=kind)
    expected = low + (high - low) * (warmup(t, steps, kind) if t < steps else 1.0)
    assert lrs_after(scheduler, optimizer, t + 1) == pytest.approx([expected])
    assert scheduler.get_last_lr() == pytest.approx([expected])


def test_log_and_linear_warmup_differ_midway():
    log_opt, lin_opt = make_optimizer(1.0), make_optimizer(1.0)
    log = WarmupLR(log_opt, warmup_max_lr=1.0, warmup_num_steps=100)  # 'log' is the default
    linear = WarmupLR(lin_opt, warmup_max_lr=1.0, warmup_num_steps=100, warmup_type="linear")
    assert lrs_after(log, log_opt, 11)[0] == pytest.approx(math.log(11) / math.log(100))
    assert lrs_after(linear, lin_opt, 11)[0] == pytest.approx(0.10)


def test_a_fresh_schedule_sets_the_starting_lr_at_construction():
    optimizer = make_optimizer(0.5)
    WarmupLR(optimizer, warmup_min_lr=0.02, warmup_max_lr=0.1)
    assert optimizer.param_groups[0]["lr"] == 0.02
    cosine_optimizer = make_optimizer(0.5)
    WarmupCosineLR(cosine_optimizer, total_num_steps=100, warmup_num_steps=10)
    assert cosine_optimizer.param_groups[0]["lr"] == 0.0


def test_warmup_max_lr_none_warms_each_group_to_its_own_lr():
    optimizer = make_optimizer(0.1, 0.2)
    scheduler = WarmupLR(optimizer, warmup_num_steps=4, warmup_type="linear")
    assert scheduler.max_lrs == [0.1, 0.2]
    assert lrs_after(scheduler, optimizer, 10) == pytest.approx([0.1, 0.2])


def test_per_group_lists_must_match_the_group_count():
    with pytest.raises(ValueError, match="2 param groups"):
        WarmupLR(make_optimizer(0.1, 0.2), warmup_max_lr=[0.1, 0.2, 0.3])


def test_warmup_shorter_than_two_steps_is_stretched_to_two():
    optimizer = make_optimizer(1.0)
    scheduler = WarmupLR(optimizer, warmup_max_lr=1.0, warmup_num_steps=1, warmup_type="linear")
    assert lrs_after(scheduler, optimizer, 2) == pytest.approx([0.5])  # t = 1 of W = 2


@pytest.mark.parametrize("t", [3, 10, 40, 100, 130])
def test_warmup_decay_lr_decays_linearly_to_min_after_warmup(t):
    low, high, warmup_steps, total = 0.0, 0.01, 10, 100
    optimizer = make_optimizer(1.0)
    scheduler = WarmupDecayLR(optimizer, total_num_steps=total, warmup_min_lr=low, warmup_max_lr=high,
                              warmup_num_steps=warmup_steps, warmup_type="linear")
    if t < warmup_steps:
        gamma = t / warmup_steps
    else:
        gamma = max(0.0, (total - t) / (total - warmup_steps))
    assert lrs_after(scheduler, optimizer, t + 1) == pytest.approx([low + (high - low) * gamma])


def test_warmup_decay_lr_default_max_is_deepspeeds_0_001():
    optimizer = make_optimizer(0.5)
    scheduler = WarmupDecayLR(optimizer, total_num_steps=100, warmup_num_steps=10)
    assert lrs_after(scheduler, optimizer, 11) == pytest.approx([0.001])  # t = W: top of the ramp


@pytest.mark.parametrize("kind", ["log", "linear"])
@pytest.mark.parametrize("t", [0, 5, 19, 20, 60, 119, 120, 500])
def test_warmup_cosine_lr_ratio(kind, t):
    base, warmup_steps, total, start_ratio, floor = 0.2, 20, 120, 0.1, 0.05
    optimizer = make_optimizer(base)
    scheduler = WarmupCosineLR(optimizer, total_num_steps=total, warmup_min_ratio=start_ratio,
                               warmup_num_steps=warmup_steps, cos_min_ratio=floor, warmup_type=kind)
    if t < warmup_steps:
        ratio = start_ratio + (1 - start_ratio) * warmup(t, warmup_steps, kind)
    else:
        progress = min(1.0, (t - warmup_steps + 1) / (total - warmup_steps))
        ratio = floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
    assert lrs_after(scheduler, optimizer, t + 1) == pytest.approx([base * ratio])


def test_warmup_cosine_lr_stays_at_the_floor_after_the_end():
    optimizer = make_optimizer(1.0)
    scheduler = WarmupCosineLR(optimizer, total_num_steps=30, warmup_num_steps=10, cos_min_ratio=0.1)
    assert lrs_after(scheduler, optimizer, 30) == pytest.approx([0.1])
    assert lrs_after(scheduler, optimizer, 25) == pytest.approx([0.1])


def test_step_can_jump_to_a_given_iteration():
    optimizer = make_optimizer(1.0)
    scheduler = WarmupLR(optimizer, warmup_max_lr=1.0, warmup_num_steps=10, warmup_type="linear")
    scheduler.step(last_batch_iteration=4)
    assert scheduler.last_batch_iteration == 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4)


def test_a_resumed_schedule_leaves_the_lr_alone_until_it_steps():
    optimizer = make_optimizer(0.7)
    scheduler = WarmupLR(optimizer, warmup_max_lr=1.0, warmup_num_steps=10, warmup_type="linear",
                         last_batch_iteration=4)
    assert optimizer.param_groups[0]["lr"] == 0.7
    with pytest.raises(RuntimeError, match="step"):
        scheduler.get_last_lr()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.parametrize("make", [
    lambda opt: WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10),
    lambda opt: WarmupDecayLR(opt, total_num_steps=20, warmup_num_steps=5),
    lambda opt: WarmupCosineLR(opt, total_num_steps=20, warmup_num_steps=5),
])
def test_state_dict_round_trips_through_torch_save_weights_only(make):
    original_optimizer = make_optimizer(0.1)
    original = make(original_optimizer)
    lrs_after(original, original_optimizer, 7)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state == {"last_batch_iteration": 6}

    resumed_optimizer = make_optimizer(0.1)
    resumed = make(resumed_optimizer)
    resumed.load_state_dict(state)
    assert lrs_after(resumed, resumed_optimizer, 3) == pytest.approx(lrs_after(original, original_optimizer, 3))


def test_tensor_learning_rates_are_updated_in_place():
    optimizer = make_optimizer(0.1)
    optimizer.param_groups[0]["lr"] = torch.tensor(0.1)
    scheduler = WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10, warmup_type="linear")
    lrs_after(scheduler, optimizer, 6)
    assert torch.is_tensor(optimizer.param_groups[0]["lr"])
    assert optimizer.param_groups[0]["lr"].item() == pytest.approx(0.05)


def test_works_on_a_real_torch_optimizer():
    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    scheduler = WarmupCosineLR(optimizer, total_num_steps=20, warmup_num_steps=4, warmup_type="linear")
    for _ in range(3):
        parameter.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 2 / 4)  # t = 2 of a 4-step linear warmup


def test_wrapped_optimizers_are_unwrapped():
    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    optimizer = make_optimizer(0.1)
    WarmupLR(Wrapper(optimizer), warmup_min_lr=0.03)
    assert optimizer.param_groups[0]["lr"] == 0.03


@pytest.mark.parametrize("kwargs, message", [
    ({"warmup_num_steps": 0}, "warmup_num_steps must be a positive integer"),
    ({"warmup_num_steps": 10.0}, "warmup_num_steps must be a positive integer"),
    ({"warmup_type": "cosine"}, "warmup_type must be one of"),
])
def test_bad_warmup_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WarmupLR(make_optimizer(0.1), **kwargs)
    with pytest.raises(ValueError, match=message):
        WarmupCosineLR(make_optimizer(0.1), total_num_steps=100, **kwargs)


def test_decay_shorter_than_warmup_warns():
    with pytest.warns(UserWarning, match="less than warmup_num_steps"):
        WarmupDecayLR(make_optimizer(0.1), total_num_steps=5, warmup_num_steps=10)


def test_build_scheduler_instantiates_the_named_schedule():
    assert set(SCHEDULERS) == {"WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest"}
    optimizer = make_optimizer(0.1)
    scheduler = build_scheduler(SchedulerConfig(type="WarmupDecayLR", params={"total_num_steps": 50,
                                                                              "warmup_num_steps": 5}), optimizer)
    assert isinstance(scheduler, WarmupDecayLR) and scheduler.total_num_steps == 50
    with pytest.raises(ValueError, match="unknown scheduler"):
        build_scheduler(SchedulerConfig(type="CyclicLR", params={}), optimizer)


def test_the_configs_schedule_catalogue_is_the_schedules_signatures():
    """ds_lab.config checks scheduler params against SCHEDULES without importing the runtime; this
    holds the declared names and arguments to the real signatures."""
    import inspect

    from ds_lab.config import SCHEDULES

    assert set(SCHEDULES) == set(SCHEDULERS)
    for name, schedule in SCHEDULERS.items():
        arguments = list(inspect.signature(schedule).parameters.values())[1:]  # drop the optimizer
        required = tuple(a.name for a in arguments if a.default is inspect.Parameter.empty)
        optional = tuple(a.name for a in arguments if a.default is not inspect.Parameter.empty)
        assert SCHEDULES[name] == (required, optional), name
