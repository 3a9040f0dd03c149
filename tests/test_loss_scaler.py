"""The fp16 dynamic loss scaler moves its scale exactly as DeepSpeed's does, at stage 0 and under ZeRO.

The expected sequences below were measured from DeepSpeed itself, not derived from its source:
DeepSpeed 0.19.8, torch 2.13.0+cpu, one process (gloo), its CPU accelerator's fp16 refusal patched
out (`type(get_accelerator()).is_fp16_supported = lambda self: True`). The probe script:

    model = torch.nn.Linear(4, 2)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": STAGE}, "zero_allow_untested_optimizer": True,
              "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 4,
                       "loss_scale_window": 3, "hysteresis": 2, "min_loss_scale": 1, **OVERRIDES}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
                                      config=config)
    for step in range(N):
        scale = engine.optimizer.loss_scale_config.cur_scale  # ZeRO: .loss_scaler.cur_scale
        loss = engine(torch.ones(1, 4, dtype=torch.half)).float().sum()
        engine.backward(loss * float("inf") if step in OVERFLOW_STEPS else loss)
        engine.step()                                  # record scale, engine.skipped_steps; or the raise

Stage 0 ran both FP16_UnfusedOptimizer (a torch optimizer) and FP16_Optimizer (config "Adam", i.e.
FusedAdam): same sequences. ZeRO stages 1, 2 (DeepSpeedZeroOptimizer) and 3
(DeepSpeedZeroOptimizer_Stage3), both with DynamicLossScaler: same sequences. In every run
engine.skipped_steps counted exactly the overflowing steps. The probe is the outline above, run
outside the repository against DeepSpeed's own venv.
"""
import pytest
import torch

import ds_lab
from ds_lab.config import FP16Config
from ds_lab.runtime.precision import LossScaleAtMinimumError, make_loss_scaler

# What the engine's modes pass (DeepSpeed's stage-0 fp16 optimizer vs its ZeRO loss scaler).
STAGE0 = dict(use_hysteresis=False, raise_below_minimum=False)
ZERO = dict(use_hysteresis=True, raise_below_minimum=True)

BASE = dict(enabled=True, loss_scale=0.0, initial_scale_power=4, loss_scale_window=3, hysteresis=2,
            min_loss_scale=1.0)

# name: (mode, fp16 overrides, overflow steps, scale in effect at each step, scale after the last step,
#        step at which DeepSpeed raises "Current loss scale already at minimum", or None)
DEEPSPEED_0_19_8 = {
    "stage0_overflows_at_2_3": (STAGE0, {}, {2, 3}, [16, 16, 16, 8, 4, 4, 4, 4, 8, 8, 8, 16], 16, None),
    "zero_overflows_at_2_3": (ZERO, {}, {2, 3}, [16, 16, 16, 16, 8, 8, 8, 8, 16, 16, 16, 32], 32, None),
    "stage0_no_overflow": (STAGE0, {}, set(), [16, 16, 16, 16, 32, 32, 32, 64], 64, None),
    "zero_no_overflow": (ZERO, {}, set(), [16, 16, 16, 16, 32, 32, 32, 64], 64, None),
    "stage0_stays_at_min_silently": (STAGE0, {"initial_scale_power": 1}, {0, 1, 2, 3, 4}, [2, 1, 1, 1, 1, 1], 1, None),
    "zero_raises_below_min": (ZERO, {"initial_scale_power": 1}, {0, 1, 2, 3, 4}, [2, 2, 1], None, 2),
    "zero_raises_at_a_min_that_is_not_a_power_of_2": (ZERO, {"initial_scale_power": 2, "min_loss_scale": 3.0},
                                                      {0, 1, 2, 3}, [4, 4, 3], None, 2),
    "zero_alternating_overflows": (ZERO, {}, {1, 3, 5, 7}, [16, 16, 16, 16, 8, 8, 4, 4, 2], 2, None),
    "zero_consecutive_hysteresis_refills": (ZERO, {"consecutive_hysteresis": True}, {1, 3, 5, 7},
                                            [16] * 9, 16, None),
    "stage0_ignores_consecutive_hysteresis": (STAGE0, {"consecutive_hysteresis": True}, {1, 3, 5, 7},
                                              [16, 16, 8, 8, 4, 4, 2, 2, 1], 1, None),
    "stage0_static_scale": (STAGE0, {"loss_scale": 8.0}, {1, 2}, [8, 8, 8, 8], 8, None),
    "zero_static_scale": (ZERO, {"loss_scale": 8.0}, {1, 2}, [8, 8, 8, 8], 8, None),
    "zero_hysteresis_3": (ZERO, {"hysteresis": 3}, {1, 2, 3, 4, 9, 10},
                          [16, 16, 16, 16, 8, 4, 4, 4, 4, 8, 8, 8, 8, 8], 8, None),
    "stage0_ignores_hysteresis_3": (STAGE0, {"hysteresis": 3}, {1, 2, 3, 4, 9, 10},
                                    [16, 16, 8, 4, 2, 1, 1, 1, 1, 2, 1, 1, 1, 1], 1, None),
}


def run_scaler(scaler, overflow_steps, steps):
    """Drive the scaler like the engine does: read the scale for the step, then report the overflow."""
    used, raised_at = [], None
    for step in range(steps):
        used.append(scaler.loss_scale)
        try:
            scaler.update_scale(step in overflow_steps)
        except LossScaleAtMinimumError:
            raised_at = step
            break
    return used, (None if raised_at is not None else scaler.loss_scale), raised_at


@pytest.mark.parametrize("name", list(DEEPSPEED_0_19_8))
def test_scale_sequence_matches_deepspeed(name):
    options, overrides, overflows, scales, final, raises_at = DEEPSPEED_0_19_8[name]
    scaler = make_loss_scaler(FP16Config(**{**BASE, **overrides}), **options)
    steps = len(scales) if raises_at is None else raises_at + 5
    assert run_scaler(scaler, overflows, steps) == (scales, final, raises_at)


def test_defaults_are_the_zero_behaviour():
    config = FP16Config(**{**BASE, "initial_scale_power": 1})
    used, _, raised_at = run_scaler(make_loss_scaler(config), {0, 1, 2}, 3)
    assert (used, raised_at) == ([2, 2, 1], 2)


def test_the_error_at_the_minimum_says_what_to_do():
    scaler = make_loss_scaler(FP16Config(**{**BASE, "initial_scale_power": 0, "hysteresis": 1}), **ZERO)
    with pytest.raises(LossScaleAtMinimumError, match=r"Current loss scale already at minimum \(1\) - cannot "
                                                      r"decrease scale anymore.*fp16.min_loss_scale"):
        scaler.update_scale(True)


def test_state_dict_round_trip_continues_the_same_sequence():
    options, overrides, overflows, scales, final, _ = DEEPSPEED_0_19_8["zero_hysteresis_3"]
    config = FP16Config(**{**BASE, **overrides})
    first = make_loss_scaler(config, **options)
    run_scaler(first, overflows, 6)
    second = make_loss_scaler(config, **options)
    second.load_state_dict(first.state_dict())
    rest = [s - 6 for s in overflows if s >= 6]
    assert run_scaler(second, rest, len(scales) - 6) == (scales[6:], final, None)


def test_bf16_and_fp32_have_no_scaler():
    assert make_loss_scaler(FP16Config(enabled=False)) is None


# ---- end to end: the engine's modes pass the right options -------------------------------------

def fp16_engine_run(stage, overrides, overflow_steps, steps):
    config = {"train_batch_size": 1, "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "fp16": {**BASE, **overrides}}
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2, bias=False)
    engine, _, _, _ = ds_lab.initialize(model=model, model_parameters=model.parameters(), config=config)
    scales, applied = [], []
    for step in range(steps):
        scales.append(engine.loss_scale)
        loss = engine(torch.ones(1, 4, dtype=torch.half)).float().sum()
        engine.backward(loss * float("inf") if step in overflow_steps else loss)
        try:
            engine.step()
        except LossScaleAtMinimumError:
            return dict(scales=scales, applied=applied, raised_at=step, skipped=engine.skipped_steps)
        applied.append(engine.was_step_applied())
    return dict(scales=scales + [engine.loss_scale], applied=applied, raised_at=None, skipped=engine.skipped_steps)


@pytest.mark.parametrize("stage, name", [(0, "stage0_overflows_at_2_3"), (1, "zero_overflows_at_2_3"),
                                         (2, "zero_overflows_at_2_3"), (3, "zero_overflows_at_2_3"),
                                         (0, "stage0_stays_at_min_silently")])
def test_engine_follows_deepspeed_sequence(stage, name):
    _, overrides, overflows, scales, final, _ = DEEPSPEED_0_19_8[name]
    r = ds_lab.launch(fp16_engine_run, 1, stage, overrides, overflows, len(scales))[0]
    assert r["scales"] == scales + [final]
    assert r["applied"] == [step not in overflows for step in range(len(scales))]
    assert r["skipped"] == len(overflows)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_engine_under_zero_raises_when_the_scale_must_go_below_minimum(stage):
    _, overrides, overflows, scales, _, raises_at = DEEPSPEED_0_19_8["zero_raises_below_min"]
    r = ds_lab.launch(fp16_engine_run, 1, stage, overrides, overflows, 6)[0]
    assert (r["scales"], r["raised_at"]) == (scales, raises_at)
