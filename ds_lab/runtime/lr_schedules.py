"""Learning-rate schedules with DeepSpeed's names, arguments and math.

A schedule writes ``param_group['lr']`` itself: once when it is built (with
``last_batch_iteration=-1``) and once on every ``step()``. ``t`` below is
``last_batch_iteration``, the index of the batch just trained; the first
``step()`` makes it 0.

    W = max(2, warmup_num_steps)            (DeepSpeed never warms up over fewer than 2 steps)
    w(t) = ln(t + 1) / ln(W)   warmup_type 'log' (the default)
    w(t) = t / W               warmup_type 'linear'

    WarmupLR        lr = min_lr + (max_lr - min_lr) * g(t),  g = w(t) for t < W, else 1
    WarmupDecayLR   same warmup, then g = max(0, (T - t) / max(1, T - W))          (linear decay to min_lr at T)
    WarmupCosineLR  lr = base_lr * r(t), base_lr = the group's lr when the schedule is built
                    t < W:  r = warmup_min_ratio + (1 - warmup_min_ratio) * w(t)
                    t >= W: p = min(1, (t - W + 1) / max(1, T - W))
                            r = max(0, cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * p)) / 2)

Before the first step (t = -1) WarmupLR/WarmupDecayLR hold min_lr and WarmupCosineLR holds 0.

    LRRangeTest     lr = min_lr * (1 + step_rate * (t + 1) / step_size)   (floor of the fraction with staircase)
    OneCycle        min_lr -> max_lr -> min_lr over one cycle, then decay; beta1 cycles the other way
                    (its class docstring has the formulas)

Source: deepspeed/runtime/lr_schedules.py (deepspeedai/DeepSpeed master, including #7969 and #8171:
``warmup_max_lr=None`` warms each param group up to its own lr). Our code is written fresh.
ds_lab departs in two small ways: an unknown ``warmup_type`` raises ValueError (DeepSpeed logs a
warning and uses 'log'), and a tensor lr is updated in place instead of being replaced.

Usage::

    scheduler = WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=100)
    for batch in loader:
        train_step(batch)
        scheduler.step()
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch

# The config layer (below this one) declares the schedules' names, arguments and warmup types, so it
# can check a config without importing the runtime; tests/test_lr_schedules.py holds the two together.
from ds_lab.config import WARMUP_TYPES, SchedulerConfig

WARMUP_LOG_RATE, WARMUP_LINEAR_RATE = WARMUP_TYPES

LearningRates = Union[float, Sequence[float]]


def _param_groups_owner(optimizer):
    """The object holding ``param_groups``; DeepSpeed-style wrappers keep it in ``.optimizer``."""
    if hasattr(optimizer, "param_groups"):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and hasattr(inner, "param_groups"):
        return inner
    raise TypeError(f"{type(optimizer).__name__} has no param_groups; pass a torch optimizer")


def _per_group(value: LearningRates, optimizer, name: str) -> list[float]:
    """One value per param group: a scalar is broadcast, a list must match the group count."""
    groups = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ValueError(f"{name} has {len(value)} values but the optimizer has {groups} param groups")
        return [float(v) for v in value]
    return [float(value)] * groups


def _check_warmup(warmup_num_steps: int, warmup_type: str) -> None:
    if isinstance(warmup_num_steps, bool) or not isinstance(warmup_num_steps, int) or warmup_num_steps <= 0:
        raise ValueError(f"warmup_num_steps must be a positive integer, got {warmup_num_steps!r}")
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"warmup_type must be one of {list(WARMUP_TYPES)}, got {warmup_type!r}")


def _warn_if_decay_shorter_than_warmup(total_num_steps: int, warmup_num_steps: int) -> None:
    if total_num_steps < warmup_num_steps:
        warnings.warn(f"total_num_steps {total_num_steps} is less than warmup_num_steps {warmup_num_steps}")


def _warmup_fraction(t: int, warmup_steps: int, warmup_type: str) -> float:
    """w(t) in the module docstring; ``warmup_steps`` is already max(2, warmup_num_steps)."""
    if warmup_type == WARMUP_LOG_RATE:
        return math.log(t + 1) / math.log(warmup_steps)
    return t / warmup_steps


class _Schedule:
    """What every schedule shares: stepping, applying lrs to the optimizer, and its (tiny) state."""

    optimizer: torch.optim.Optimizer
    last_batch_iteration: int

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def _start(self, last_batch_iteration: int) -> None:
        self.last_batch_iteration = last_batch_iteration
        self._last_lr: Optional[list[float]] = None
        # A fresh schedule sets the starting lr now; a resumed one (t >= 0) waits for step().
        if last_batch_iteration == -1:
            self._apply(self.get_lr())

    def _apply(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = list(lrs)

    def step(self, last_batch_iteration: Optional[int] = None) -> None:
        """Advance to ``last_batch_iteration`` (default: the next batch) and write its lr."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._apply(self.get_lr())

    def get_last_lr(self) -> list[float]:
        """The lrs most recently written to the optimizer."""
        if self._last_lr is None:
            raise RuntimeError("need to call step() first")
        return self._last_lr

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state_dict: dict) -> None:
        # Like DeepSpeed, only the position is restored; the optimizer's own state_dict carries its lrs.
        self.last_batch_iteration = int(state_dict["last_batch_iteration"])


class WarmupLR(_Schedule):
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``, then hold.

    lr = min_lr + (max_lr - min_lr) * w(t) for t < W, max_lr afterwards (W, w: module docstring).
    ``warmup_max_lr=None`` means each param group's current lr. Scalars or per-group lists.
    """

    def __init__(self, optimizer, warmup_min_lr: LearningRates = 0.0, warmup_max_lr: Optional[LearningRates] = None,
                 warmup_num_steps: int = 1000, warmup_type: str = WARMUP_LOG_RATE, last_batch_iteration: int = -1):
        _check_warmup(warmup_num_steps, warmup_type)
        self.optimizer = _param_groups_owner(optimizer)
        if warmup_max_lr is None:
            warmup_max_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.min_lrs = _per_group(warmup_min_lr, self.optimizer, "warmup_min_lr")
        self.max_lrs = _per_group(warmup_max_lr, self.optimizer, "warmup_max_lr")
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type
        self._start(last_batch_iteration)

    def _gamma(self) -> float:
        """Fraction of the way from min_lr to max_lr at the current step."""
        if self.last_batch_iteration < self.warmup_num_steps:
            return _warmup_fraction(self.last_batch_iteration, self.warmup_num_steps, self.warmup_type)
        return 1.0

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [low + (high - low) * gamma for low, high in zip(self.min_lrs, self.max_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay back to ``warmup_min_lr`` at ``total_num_steps``.

    After warmup: lr = min_lr + (max_lr - min_lr) * max(0, (T - t) / max(1, T - W)).
    Note DeepSpeed's default ``warmup_max_lr`` here is 0.001, not the optimizer's lr.
    """

    def __init__(self, optimizer, total_num_steps: int, warmup_min_lr: LearningRates = 0.0,
                 warmup_max_lr: LearningRates = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = WARMUP_LOG_RATE, last_batch_iteration: int = -1):
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        _warn_if_decay_shorter_than_warmup(total_num_steps, warmup_num_steps)

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return super()._gamma()
        remaining = self.total_num_steps - self.last_batch_iteration
        return max(0.0, remaining / max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(_Schedule):
    """Scale each group's starting lr by a ratio: warm up to 1, then cosine-decay to ``cos_min_ratio``.

    t < W:  r = warmup_min_ratio + (1 - warmup_min_ratio) * w(t)
    t >= W: p = min(1, (t - W + 1) / max(1, T - W))
            r = max(0, cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi p)) / 2)
    lr = base_lr * r, with base_lr read from the optimizer when the schedule is built.
    """

    def __init__(self, optimizer, total_num_steps: int, warmup_min_ratio: float = 0.0, warmup_num_steps: int = 1000,
                 cos_min_ratio: float = 0.0001, warmup_type: str = WARMUP_LOG_RATE, last_batch_iteration: int = -1):
        _check_warmup(warmup_num_steps, warmup_type)
        self.optimizer = _param_groups_owner(optimizer)
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = warmup_type
        _warn_if_decay_shorter_than_warmup(total_num_steps, warmup_num_steps)
        self.org_lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        self._start(last_batch_iteration)

    def get_lr_ratio(self) -> float:
        t = self.last_batch_iteration
        if t < 0:
            return 0.0
        if t < self.warmup_num_steps:
            fraction = _warmup_fraction(t, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * fraction
        # Clamped at 1 so the ratio stays at cos_min_ratio after total_num_steps instead of rising again.
        progress = min(1.0, (t - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:
        ratio = self.get_lr_ratio()
        return [base_lr * ratio for base_lr in self.org_lrs]


class LRRangeTest(_Schedule):
    """Leslie Smith's LR range test: lr grows from ``lr_range_test_min_lr`` without bound.

    lr = min_lr * (1 + step_rate * i),  i = (t + 1) / step_size, or floor of it with staircase.
    """

    def __init__(self, optimizer, lr_range_test_min_lr: LearningRates = 1e-3, lr_range_test_step_size: int = 2000,
                 lr_range_test_step_rate: float = 1.0, lr_range_test_staircase: bool = False,
                 last_batch_iteration: int = -1):
        if isinstance(lr_range_test_step_size, bool) or not isinstance(lr_range_test_step_size, int) \
                or lr_range_test_step_size <= 0:
            raise ValueError(f"lr_range_test_step_size must be a positive integer, got {lr_range_test_step_size!r}")
        self.optimizer = _param_groups_owner(optimizer)
        self.min_lr = _per_group(lr_range_test_min_lr, self.optimizer, "lr_range_test_min_lr")
        self.step_size, self.step_rate = lr_range_test_step_size, lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        self._start(last_batch_iteration)

    def get_lr(self) -> list[float]:
        interval = float(self.last_batch_iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [low * (1 + self.step_rate * interval) for low in self.min_lr]


class OneCycle(_Schedule):
    """1Cycle: lr climbs min -> max over the first half-cycle and back over the second, then decays;
    with ``cycle_momentum`` Adam's beta1 moves the opposite way (max -> min -> max).

    Cycle (t < S1 + S2, S = S1 + S2): x = (t + 1) / S - floor(1 + (t + 1) / S) + 1;
        scale = x / r on the way up (x <= r = S1 / S), (x - 1) / (r - 1) on the way down;
        with a stair count n > 0, scale = floor(position * n) / n (lr and momentum move in n steps);
        lr = min_lr + (max_lr - min_lr) * scale,  beta1 = max_mom - (max_mom - min_mom) * scale.
    After it, d = t - S + 1:  lr = min_lr / (1 + decay_lr_rate * d / decay_step_size),
        beta1 = max_mom * (1 + decay_mom_rate * d / decay_step_size); either stays at min_lr / max_mom
        when its rate or decay_step_size is 0.
    As DeepSpeed, momentum cycling writes ``betas = (beta1, 0.99)``: beta2 becomes 0.99. It is off,
    with a warning, when the optimizer has no betas.
    """

    def __init__(self, optimizer, cycle_min_lr: LearningRates, cycle_max_lr: LearningRates, decay_lr_rate=0.,
                 cycle_first_step_size=2000, cycle_second_step_size=None, cycle_first_stair_count=0,
                 cycle_second_stair_count=None, decay_step_size=0, cycle_momentum=True, cycle_min_mom=0.8,
                 cycle_max_mom=0.9, decay_mom_rate=0., last_batch_iteration=-1):
        self.optimizer = _param_groups_owner(optimizer)
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        if first <= 0 or second < 0:
            raise ValueError(f"cycle_first_step_size must be positive and cycle_second_step_size non-negative, "
                             f"got {cycle_first_step_size} and {cycle_second_step_size}")
        self.first_step_size, self.second_step_size, self.total_size = first, second, first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = cycle_first_stair_count if cycle_second_stair_count is None \
            else cycle_second_stair_count
        self.decay_step_size = decay_step_size
        no_decay = math.isclose(decay_step_size, 0)
        self.min_lrs = _per_group(cycle_min_lr, self.optimizer, "cycle_min_lr")
        self.max_lrs = _per_group(cycle_max_lr, self.optimizer, "cycle_max_lr")
        self.decay_lr_rate = decay_lr_rate
        self.skip_lr_decay = no_decay or math.isclose(decay_lr_rate, 0)
        self.cycle_momentum = cycle_momentum and "betas" in getattr(self.optimizer, "defaults", {})
        if cycle_momentum and not self.cycle_momentum:
            warnings.warn(f"cycle_momentum is disabled because optimizer {type(self.optimizer).__name__} "
                          "has no betas in its defaults")
        self.decay_mom_rate = decay_mom_rate
        self.skip_mom_decay = no_decay or math.isclose(decay_mom_rate, 0)
        self.min_moms = _per_group(cycle_min_mom, self.optimizer, "cycle_min_mom")
        self.max_moms = _per_group(cycle_max_mom, self.optimizer, "cycle_max_mom")
        if self.cycle_momentum and last_batch_iteration == -1:
            for group, momentum in zip(self.optimizer.param_groups, self.min_moms):
                group["betas"] = (momentum, 0.99)
        self._start(last_batch_iteration)

    def _scale(self) -> float:
        t = self.last_batch_iteration + 1
        cycle = math.floor(1 + t / self.total_size)
        x = 1. + t / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:  # from the integer position, as DeepSpeed (a float scale can sit 1e-16 under a stair)
            in_cycle = t % self.total_size
            if in_cycle <= self.first_step_size:
                position = in_cycle * stairs / self.first_step_size
            else:
                position = (self.total_size - in_cycle) * stairs / self.second_step_size
            scale = math.floor(position) / stairs
        return scale

    def _decay_factor(self, rate: float) -> float:
        return 1 + rate * ((self.last_batch_iteration - self.total_size + 1) / self.decay_step_size)

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < self.total_size:
            scale = self._scale()
            return [low + (high - low) * scale for low, high in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        return [low / self._decay_factor(self.decay_lr_rate) for low in self.min_lrs]

    def get_mom(self):
        """The (beta1, beta2) pairs this step writes, or None without momentum cycling."""
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            scale = self._scale()
            return [(high - (high - low) * scale, 0.99) for low, high in zip(self.min_moms, self.max_moms)]
        if self.skip_mom_decay:
            return [(high, 0.99) for high in self.max_moms]
        return [(high * self._decay_factor(self.decay_mom_rate), 0.99) for high in self.max_moms]

    def step(self, last_batch_iteration: Optional[int] = None) -> None:
        super().step(last_batch_iteration)
        if self.cycle_momentum:
            for group, betas in zip(self.optimizer.param_groups, self.get_mom()):
                group["betas"] = betas


SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
              "OneCycle": OneCycle, "LRRangeTest": LRRangeTest}


def build_scheduler(scheduler_config: SchedulerConfig, optimizer) -> _Schedule:
    """Instantiate the schedule a validated ``SchedulerConfig`` names, on ``optimizer``."""
    if scheduler_config.type not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler_config.type!r}; ds_lab has {list(SCHEDULERS)}")
    return SCHEDULERS[scheduler_config.type](optimizer, **scheduler_config.params)
