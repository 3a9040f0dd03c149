"""ZeRO-3's map from modules to units: which whole parameters a module needs while it runs.

Each module with parameters of its own is one unit per param group (`module_units`). A module may
also read parameters it does not own — a tied LM head reading the embedding's weight, a parent
reading a child's — and then it needs that unit too: registered by hand
(`register_external_parameter`, DeepSpeed's name) or found while running (`_GatheringParameters`).
"""
from __future__ import annotations

import torch

from ds_lab.zero.partition import Unit


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for name in out.__dataclass_fields__ for t in _tensors(getattr(out, name))]
    return []


def module_units(module, groups: list, world_size: int, rank: int):
    """One unit per (module, param group) for the parameters a module registers itself.
    A parameter shared by two modules (tied weights) belongs to the first; the second module
    gathers that unit when it runs. Returns (units, {module: [units it needs]})."""
    group_of = {p: g for g, params in enumerate(groups) for p in params}
    units, needs, owner = [], {}, {}
    for _, mod in module.named_modules():
        own = [p for p in mod._parameters.values() if p is not None and p in group_of]
        for g in sorted({group_of[p] for p in own if p not in owner}):
            members = [p for p in own if group_of[p] == g and p not in owner]
            unit = Unit(len(units), members, g, world_size, rank)
            units.append(unit)
            for p in members:
                owner[p] = unit
        used = []
        for p in own:
            if owner[p] not in used:
                used.append(owner[p])
        if used:
            needs[mod] = used
    for _, mod in module.named_modules():  # registered external parameters (any module may own them)
        for p in getattr(mod, "_ds_external_parameters", {}).values():
            if p in owner and owner[p] not in needs.setdefault(mod, []):
                needs[mod].append(owner[p])
    return units, needs


def register_external_parameter(module, parameter) -> None:
    """DeepSpeed's `deepspeed.zero.register_external_parameter`: `module`'s forward reads `parameter`,
    which another module owns; ZeRO-3 gathers it around `module` (before, or after initialize)."""
    module.__dict__.setdefault("_ds_external_parameters", {})[id(parameter)] = parameter
    zero = getattr(parameter, "ds_zero", None)
    if zero is not None:
        zero.add_external(module, parameter)


class _GatheringParameters(dict):
    """A module's `_parameters` under ZeRO-3: reading a parameter while modules run lets stage 3
    register it as external to the innermost running module and gather it (see the docstring)."""

    def __getitem__(self, name):
        p = dict.__getitem__(self, name)
        zero = getattr(p, "ds_zero", None)
        if zero is not None and zero.running:
            zero.read_while_running(p)
        return p


class _Gathering:
    """One all-gather in flight that brings several units (see `ZeroStage3._issue_gathers`)."""

    def __init__(self, units, handle, whole):
        self.units, self.handle, self.whole = units, handle, whole
