"""The small checkers every config section is built from; each error says what to change.

A checker takes (value, dotted name) and returns the cleaned value or raises `ConfigError`:
`_integer(5e8, "zero_optimization.reduce_bucket_size")` -> 500000000. `_check_keys` refuses any
key a section does not model: a typo gets a "did you mean", a DeepSpeed key ds_lab lacks is named
as such. Nothing here knows which sections exist; `sections.py` and `__init__.py` do.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Optional

SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)


class ConfigError(ValueError):
    """A config that ds_lab cannot run; the message says what to change."""


def _got(value: Any) -> str:
    hint = " ('auto' is a Hugging Face Trainer placeholder; put a number here)" if value == "auto" else ""
    return f"got {value!r}{hint}"


def _integer(value: Any, name: str, minimum: int = 0) -> int:
    # JSON writes 5e8 as a float; accept floats that are whole numbers, as DeepSpeed's pydantic models do.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, {_got(value)}")
    return value


def _positive_integer(value: Any, name: str) -> int:
    return _integer(value, name, minimum=1)


def _number(value: Any, name: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be a number >= {minimum:g}, {_got(value)}")
    return float(value)


def _positive_number(value: Any, name: str) -> float:
    if _number(value, name) <= 0:
        raise ConfigError(f"{name} must be a number > 0, {_got(value)}")
    return float(value)


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, {_got(value)}")
    return value


def _optional_boolean(value: Any, name: str) -> Optional[bool]:
    return None if value is None else _boolean(value, name)


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, {_got(value)}")
    return value


def _string_list(value: Any, name: str) -> list:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{name} must be a list of strings, {_got(value)}")
    return list(value)


def _zero_stage(value: Any, name: str) -> int:
    stage = _integer(value, name)
    if stage > 3:
        raise ConfigError(f"{name} must be 0, 1, 2 or 3, got {stage}")
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"ZeRO stage {stage} is not implemented yet in ds_lab (it arrives with the ZeRO issue); "
                          f"set {name} to one of {list(SUPPORTED_ZERO_STAGES)}")
    return stage


def _betas(value: Any, name: str) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{name} must be a list of two numbers in [0, 1), {_got(value)}")
    betas = tuple(_number(beta, f"{name}[{i}]") for i, beta in enumerate(value))
    if not all(beta < 1 for beta in betas):
        raise ConfigError(f"{name} must be a list of two numbers in [0, 1), {_got(value)}")
    return betas


def _learning_rates(value: Any, name: str):
    """A scalar lr or one per param group (DeepSpeed's schedules take both)."""
    if isinstance(value, list):
        return [_number(item, f"{name}[{i}]") for i, item in enumerate(value)]
    return _number(value, name)


# ---------------------------------------------------------------- key checking

def _where(section: str) -> str:
    return f" in '{section}'" if section else ""


def _check_keys(given: dict, known, deepspeed_only: dict, section: str = "") -> None:
    """Every key must be one ds_lab models; name DeepSpeed-only keys and suggest fixes for typos."""
    known = list(known)
    for key in given:
        if key in known:
            continue
        if key in deepspeed_only:
            hint = f"; {deepspeed_only[key]}" if deepspeed_only[key] else "; remove it to continue"
            raise ConfigError(f"'{key}'{_where(section)} is a DeepSpeed config key that ds_lab does not "
                              f"support yet{hint}")
        raise ConfigError(f"unknown config key '{key}'{_where(section)}{_suggestion(str(key), known)}")


def _suggestion(word: str, candidates) -> str:
    candidates = list(candidates)
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    close = [by_lower[word.lower()]] if word.lower() in by_lower else \
        difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid: {', '.join(sorted(candidates))}"


def _section(raw: dict, key: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}' must be a JSON object (a dict), {_got(value)}")
    return value


def _build(cls, given: dict, section: str, checkers: dict, deepspeed_only: dict):
    """Check ``given`` against ``checkers`` (one per dataclass field) and build ``cls``; defaults live on cls."""
    _check_keys(given, checkers, deepspeed_only, section)
    return cls(**{key: checkers[key](value, f"{section}.{key}") for key, value in given.items()})

