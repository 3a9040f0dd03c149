"""The config's `optimizer` and `scheduler` sections, and what happens when code passes its own.

    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}      -> OptimizerConfig("AdamW", {lr, betas, eps, ...})
    "scheduler": {"type": "WarmupLR", "params": {...}}           -> SchedulerConfig("WarmupLR", {...})

The schedules themselves live in `ds_lab.runtime.lr_schedules`, a layer above this one; the
config only needs their names and argument names, so `SCHEDULES` declares them here and a test
holds the schedules' signatures to it (the config never imports the runtime).

A client optimizer or scheduler passed to `initialize()` overrides the config's section, as in
DeepSpeed (deepspeed.initialize: "This overrides any optimizer definition in the DeepSpeed json
config"); DeepSpeed only logs it, ds_lab warns, so the config's section is never dropped unseen.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

from ds_lab.config.checks import (ConfigError, _betas, _boolean, _check_keys, _integer, _learning_rates, _number,
                                  _positive_integer, _section, _string, _suggestion)


@dataclass
class OptimizerConfig:
    type: str  # "Adam" or "AdamW": the effective algorithm (see ds_lab.config's docstring)
    params: dict  # lr, betas, eps, weight_decay; DeepSpeed/FusedAdam defaults filled in


@dataclass
class SchedulerConfig:
    type: str  # a key of SCHEDULES (and of ds_lab.runtime.lr_schedules.SCHEDULERS)
    params: dict  # keyword arguments for that schedule, as given


SUPPORTED_OPTIMIZERS = ("Adam", "AdamW", "Lamb", "OneBitAdam", "SignAdam", "SignSGD")
# DeepSpeed's own optimizer names, current (runtime/config.py DEEPSPEED_OPTIMIZERS) and removed.
_DEEPSPEED_OPTIMIZERS = ("Adagrad", "Lion", "MuAdam", "MuAdamW", "MuSGD", "Muon",
                         "OneBitLamb", "ZeroOneAdam")
# The communicating optimizers (ds_lab.optim.onebit_adam, ds_lab.optim.sign): params, defaults, checks.
# OneBitAdam's are DeepSpeed ≤ 0.18's (runtime/fp16/onebit/adam.py) plus ds_lab's error_feedback switch
# (false: no error compensation, to show the drift); SignAdam and SignSGD are ds_lab's own.
_COMM_BACKENDS = ("nccl", "mpi", "hccl", "compressed", "gloo")  # DeepSpeed ≤ 0.18's, and gloo
OTHER_OPTIMIZER_PARAMS = {
    "OneBitAdam": {"lr": (1e-3, _number), "betas": ((0.9, 0.999), _betas), "eps": (1e-8, _number),
                   "weight_decay": (0.0, _number), "freeze_step": (100000, _integer),
                   "bias_correction": (True, _boolean), "cuda_aware": (False, _boolean),
                   "comm_backend_name": ("nccl", _string), "error_feedback": (True, _boolean)},
    "SignAdam": {"lr": (1e-3, _number), "betas": ((0.9, 0.999), _betas), "eps": (1e-8, _number),
                 "weight_decay": (0.0, _number), "bias_correction": (True, _boolean)},
    "SignSGD": {"lr": (1e-4, _number), "momentum": (0.0, _number), "weight_decay": (0.0, _number)},
    # DeepSpeed's FusedLamb (ops/lamb/fused_lamb.py) and its defaults; ds_lab.optim.lamb
    "Lamb": {"lr": (1e-3, _number), "bias_correction": (True, _boolean), "betas": ((0.9, 0.999), _betas),
             "eps": (1e-8, _number), "eps_inside_sqrt": (False, _boolean), "weight_decay": (0.0, _number),
             "max_coeff": (10.0, _number), "min_coeff": (0.01, _number), "amsgrad": (False, _boolean)},
}
# the optimizers that exchange data themselves (the engine's gradient all-reduce is off while they do)
COMMUNICATING_OPTIMIZERS = ("OneBitAdam", "SignSGD")
_DEEPSPEED_SCHEDULERS: tuple = ()  # DeepSpeed's five schedules are all in SCHEDULES
_DEEPSPEED_OPTIMIZER_KEYS = {"legacy_fusion": ""}
_DEEPSPEED_ADAM_PARAMS = {"amsgrad": "", "set_grad_none": "",
                          "max_grad_norm": "set the top-level 'gradient_clipping' instead"}

ADAM_PARAM_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
# torch_adam (DeepSpeed: torch.optim.Adam/AdamW instead of FusedAdam) selects ds_lab Adam's torch path, no kernel
_ADAM_PARAM_CHECKERS = {"lr": _number, "betas": _betas, "eps": _number, "weight_decay": _number,
                        "adam_w_mode": _boolean, "torch_adam": _boolean, "bias_correction": _boolean}

WARMUP_TYPES = ("log", "linear")  # the first is the default
_WARMUP_ARGUMENTS = ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration")
# name -> (required arguments, optional arguments): the signatures of ds_lab.runtime.lr_schedules.
SCHEDULES = {
    "WarmupLR": ((), _WARMUP_ARGUMENTS),
    "WarmupDecayLR": (("total_num_steps",), _WARMUP_ARGUMENTS),
    "WarmupCosineLR": (("total_num_steps",), ("warmup_min_ratio", "warmup_num_steps", "cos_min_ratio",
                                              "warmup_type", "last_batch_iteration")),
    "OneCycle": (("cycle_min_lr", "cycle_max_lr"), ("decay_lr_rate", "cycle_first_step_size",
                                                   "cycle_second_step_size", "cycle_first_stair_count",
                                                   "cycle_second_stair_count", "decay_step_size", "cycle_momentum",
                                                   "cycle_min_mom", "cycle_max_mom", "decay_mom_rate",
                                                   "last_batch_iteration")),
    "LRRangeTest": ((), ("lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate",
                         "lr_range_test_staircase", "last_batch_iteration")),
}
# Value checks for schedule arguments, by argument name.
_SCHEDULER_PARAM_CHECKERS: dict[str, Callable] = {
    "warmup_min_lr": _learning_rates, "warmup_max_lr": lambda v, n: None if v is None else _learning_rates(v, n),
    "warmup_num_steps": _positive_integer, "total_num_steps": _positive_integer,
    "warmup_min_ratio": _number, "cos_min_ratio": _number, "warmup_type": _string,
    "last_batch_iteration": lambda v, n: _integer(v, n, minimum=-1),
    "cycle_min_lr": _learning_rates, "cycle_max_lr": _learning_rates, "decay_lr_rate": _number,
    "cycle_first_step_size": _number, "cycle_second_step_size": lambda v, n: None if v is None else _number(v, n),
    "cycle_first_stair_count": lambda v, n: _integer(v, n, minimum=0),
    "cycle_second_stair_count": lambda v, n: None if v is None else _integer(v, n, minimum=0),
    "decay_step_size": _number, "cycle_momentum": _boolean, "cycle_min_mom": _learning_rates,
    "cycle_max_mom": _learning_rates, "decay_mom_rate": _number,
    "lr_range_test_min_lr": _learning_rates, "lr_range_test_step_size": _positive_integer,
    "lr_range_test_step_rate": _number, "lr_range_test_staircase": _boolean}


def _required_type(section: dict, name: str, example: str) -> str:
    if "type" not in section:
        raise ConfigError(f"'{name}' needs a 'type', e.g. \"type\": \"{example}\"")
    return _string(section["type"], f"{name}.type")


def parse_optimizer(raw: dict) -> Optional[OptimizerConfig]:
    if "optimizer" not in raw:
        return None
    section = _section(raw, "optimizer")
    _check_keys(section, ("type", "params"), _DEEPSPEED_OPTIMIZER_KEYS, "optimizer")
    name = _required_type(section, "optimizer", "AdamW")
    canonical = {supported.lower(): supported for supported in SUPPORTED_OPTIMIZERS}.get(name.lower())
    if canonical is None:
        _reject_optimizer(name)
    given = _section(section, "params")
    if canonical == "Lamb":
        _check_lamb(raw)
    if canonical in OTHER_OPTIMIZER_PARAMS:
        return _parse_other_optimizer(canonical, given)
    _check_keys(given, _ADAM_PARAM_CHECKERS, _DEEPSPEED_ADAM_PARAMS, "optimizer.params")
    params = dict(ADAM_PARAM_DEFAULTS)
    params.update({key: _ADAM_PARAM_CHECKERS[key](value, f"optimizer.params.{key}") for key, value in given.items()})
    # DeepSpeed (engine.py _configure_basic_optimizer): effective AdamW = type is AdamW or adam_w_mode (default True).
    adam_w_mode = params.pop("adam_w_mode", True)
    if canonical == "AdamW" and not adam_w_mode:
        raise ConfigError("optimizer.params.adam_w_mode is false but optimizer.type is 'AdamW'; "
                          "for Adam with L2 weight decay write type 'Adam' with adam_w_mode false")
    return OptimizerConfig(type="AdamW" if adam_w_mode else "Adam", params=params)


def _check_lamb(raw: dict) -> None:
    """DeepSpeed's condition on Lamb (runtime/engine.py): dynamic loss scaling when fp16 is on. (With
    ZeRO, Lamb is an untested optimizer there; ds_lab.modes.check_zero_optimizer says so.)"""
    fp16 = raw.get("fp16") if isinstance(raw.get("fp16"), dict) else {}
    if fp16.get("enabled") and fp16.get("loss_scale", 0) != 0:
        raise ConfigError("optimizer 'Lamb' requires dynamic loss scaling (DeepSpeed's rule): "
                          "set fp16.loss_scale to 0 or remove it")


def _parse_other_optimizer(name: str, given: dict) -> OptimizerConfig:
    specs = OTHER_OPTIMIZER_PARAMS[name]
    deepspeed_only = {"max_grad_norm": "set the top-level 'gradient_clipping' instead",
                      "amsgrad": "1-bit Adam has no AMSGrad variant (DeepSpeed refuses it too)",
                      "eps_inside_sqrt": "DeepSpeed's OnebitAdam stores it and never reads it"} \
        if name == "OneBitAdam" else \
        {"max_grad_norm": "set the top-level 'gradient_clipping' instead (DeepSpeed refuses it too)"} \
        if name == "Lamb" else {}
    _check_keys(given, specs, deepspeed_only, "optimizer.params")
    params = {key: default for key, (default, _) in specs.items()}
    params.update({key: specs[key][1](value, f"optimizer.params.{key}") for key, value in given.items()})
    if "momentum" in params and not params["momentum"] < 1:
        raise ConfigError(f"optimizer.params.momentum must be in [0, 1), got {params['momentum']}")
    if params.pop("amsgrad", False):
        raise ConfigError(f"optimizer.params.amsgrad: {name} has no AMSGrad variant (DeepSpeed refuses it too)")
    if params.get("comm_backend_name", "nccl") not in _COMM_BACKENDS:
        raise ConfigError(f"optimizer.params.comm_backend_name must be one of {list(_COMM_BACKENDS)}, "
                          f"got {params['comm_backend_name']!r} (ds_lab uses the process group's own backend)")
    return OptimizerConfig(type=name, params=params)


def _reject_optimizer(name: str) -> None:
    deepspeed_names = {known.lower(): known for known in _DEEPSPEED_OPTIMIZERS}
    supported = ", ".join(SUPPORTED_OPTIMIZERS)
    if name.lower() in deepspeed_names:
        raise ConfigError(f"DeepSpeed optimizer '{deepspeed_names[name.lower()]}' is not supported by ds_lab yet; "
                          f"supported: {supported}")
    import torch  # DeepSpeed falls back to torch.optim for other names; only that path needs torch here

    if isinstance(getattr(torch.optim, name, None), type):
        raise ConfigError(f"optimizer '{name}' (DeepSpeed takes it from torch.optim) is not supported by ds_lab "
                          f"yet; supported: {supported}")
    raise ConfigError(f"unknown optimizer type '{name}'{_suggestion(name, SUPPORTED_OPTIMIZERS)}")


def parse_scheduler(raw: dict) -> Optional[SchedulerConfig]:
    if "scheduler" not in raw:
        return None
    section = _section(raw, "scheduler")
    _check_keys(section, ("type", "params"), {}, "scheduler")
    name = _required_type(section, "scheduler", "WarmupLR")
    if name not in SCHEDULES:
        _reject_scheduler(name)
    given = _section(section, "params")
    required, optional = SCHEDULES[name]
    _check_keys(given, required + optional, {}, "scheduler.params")
    missing = [argument for argument in required if argument not in given]
    if missing:
        raise ConfigError(f"scheduler '{name}' needs scheduler.params.{missing[0]}")
    params = {key: _SCHEDULER_PARAM_CHECKERS[key](value, f"scheduler.params.{key}") for key, value in given.items()}
    if params.get("warmup_type", WARMUP_TYPES[0]) not in WARMUP_TYPES:
        raise ConfigError(f"scheduler.params.warmup_type must be one of {list(WARMUP_TYPES)}, "
                          f"got {params['warmup_type']!r}")
    return SchedulerConfig(type=name, params=params)


def _reject_scheduler(name: str) -> None:
    supported = ", ".join(SCHEDULES)
    if name in _DEEPSPEED_SCHEDULERS:
        raise ConfigError(f"DeepSpeed scheduler '{name}' is not supported by ds_lab yet; supported: {supported}")
    import torch  # DeepSpeed falls back to torch.optim.lr_scheduler for other names

    if isinstance(getattr(torch.optim.lr_scheduler, name, None), type):
        raise ConfigError(f"scheduler '{name}' (DeepSpeed takes it from torch.optim.lr_scheduler) is not "
                          f"supported by ds_lab yet; supported: {supported}")
    raise ConfigError(f"unknown scheduler type '{name}'{_suggestion(name, list(SCHEDULES))}")


# ---------------------------------------------------------------- objects passed to initialize()

def check_client_optimizer(config, client_optimizer) -> None:
    """initialize(optimizer=...) with an 'optimizer' section too: the client's wins (DeepSpeed's
    rule, engine._configure_optimizer), and ds_lab says so instead of dropping the section unseen."""
    if client_optimizer is None or config.optimizer is None:
        return
    what = type(client_optimizer).__name__ if hasattr(client_optimizer, "param_groups") else "callable"
    warnings.warn(f"initialize(optimizer=<{what}>) overrides the config's 'optimizer' section "
                  f"(type {config.optimizer.type}), as in DeepSpeed; remove one of the two to silence this",
                  stacklevel=3)


def check_client_scheduler(config, client_scheduler) -> None:
    """initialize(lr_scheduler=...) with a 'scheduler' section too: the client's wins in DeepSpeed
    (engine._configure_lr_scheduler); ds_lab says so."""
    if client_scheduler is None or config.scheduler is None:
        return
    what = type(client_scheduler).__name__ if hasattr(client_scheduler, "step") else "callable"
    warnings.warn(f"initialize(lr_scheduler=<{what}>) overrides the config's 'scheduler' section "
                  f"(type {config.scheduler.type}), as in DeepSpeed; remove one of the two to silence this",
                  stacklevel=3)
