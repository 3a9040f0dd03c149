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


SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR}


def build_scheduler(scheduler_config: SchedulerConfig, optimizer) -> _Schedule:
    """Instantiate the schedule a validated ``SchedulerConfig`` names, on ``optimizer``."""
    if scheduler_config.type not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler_config.type!r}; ds_lab has {list(SCHEDULERS)}")
    return SCHEDULERS[scheduler_config.type](optimizer, **scheduler_config.params)
