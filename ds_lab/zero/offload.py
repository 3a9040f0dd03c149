"""ZeRO-Offload: the optimizer (stages 1-3) and the parameter chunks (stage 3) live in host memory.

    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": true}}
    "zero_optimization": {"stage": 3, "offload_param":     {"device": "cpu"}}

What moves where (Ψ parameters, N data-parallel ranks, mixed precision, Adam):

    offload_optimizer   host: the fp32 master shard (4Ψ/N), its fp32 gradient (4Ψ/N) and the Adam
                        moments (8Ψ/N); the optimizer step runs on the host, over the flat shard
                        (DeepSpeed runs its DeepSpeedCPUAdam there; ds_lab's Adam is the same math).
                        device: the 16-bit parameters, the gradient buckets and shards.
                        Per step: the averaged gradient shard goes device -> host (after the last
                        reduce-scatter), the updated master goes host -> device (into the 16-bit
                        parameters, before the all-gather).
    offload_param       (stage 3) host: the rank's 16-bit parameter chunks. Each all-gather first
                        copies the chunks it sends host -> device; the copy is dropped after use.

Both together leave the device only the parameters of the modules that run (and the buckets).

On a machine without a GPU the "device" is the CPU too (`comm.device()`), so nothing physically
moves; the code path is the same one (explicit copies between a host buffer and a device buffer),
and the memory ledger reports each category's bytes by where the mode *designates* them to live
(`host_tensors`: on a CPU-only machine a tensor's `.device` cannot tell). `pin_memory` page-locks
the host buffers when CUDA is available (fast, asynchronous copies); without CUDA it is a no-op.
DeepSpeed's `nvme` device (ZeRO-Infinity) is refused: ds_lab offloads to host memory only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_lab.config import ConfigError

HOST = torch.device("cpu")


def _device_of(section, name: str) -> str:
    """'none' or 'cpu' from a config section (a dataclass, a dict, or None)."""
    if section is None:
        return "none"
    device = section.get("device", "none") if isinstance(section, dict) else getattr(section, "device", "none")
    device = str(getattr(device, "value", device) or "none").lower()
    if device == "nvme":
        raise ConfigError(f"zero_optimization.{name}.device 'nvme' (ZeRO-Infinity) is not supported by ds_lab; "
                          f"use 'cpu' (host memory) or 'none'")
    if device not in ("none", "cpu"):
        raise ConfigError(f"zero_optimization.{name}.device must be 'none' or 'cpu', got {device!r}")
    return device


def _pin_of(section) -> bool:
    if section is None:
        return True
    return bool(section.get("pin_memory", True) if isinstance(section, dict) else getattr(section, "pin_memory", True))


@dataclass(frozen=True)
class Offload:
    """What a ZeRO stage keeps in host memory (DeepSpeed's defaults: nothing; pin_memory true)."""

    optimizer: bool = False  # fp32 master shard, its gradient and the optimizer states
    params: bool = False  # stage 3: the parameter chunks
    pin_memory: bool = True

    @classmethod
    def from_config(cls, zero_config) -> "Offload":
        optimizer_section = getattr(zero_config, "offload_optimizer", None)
        param_section = getattr(zero_config, "offload_param", None)
        optimizer = _device_of(optimizer_section, "offload_optimizer") == "cpu" \
            or bool(getattr(zero_config, "cpu_offload", False))  # the legacy spelling
        params = _device_of(param_section, "offload_param") == "cpu"
        stage = getattr(zero_config, "stage", 0)
        if params and stage != 3:
            raise ConfigError(f"zero_optimization.offload_param applies to ZeRO stage 3 only (stage is {stage}): "
                              f"set stage 3, or use offload_optimizer, which works at stages 1, 2 and 3")
        if optimizer and stage == 0:
            raise ConfigError("zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
        pin = all(_pin_of(s) for s, used in ((optimizer_section, optimizer), (param_section, params)) if used)
        return cls(optimizer=optimizer, params=params, pin_memory=pin)

    @property
    def any(self) -> bool:
        return self.optimizer or self.params

    def host_zeros(self, numel: int, dtype) -> torch.Tensor:
        """A host buffer, page-locked when asked and CUDA can pin it (a no-op on a CPU-only machine)."""
        t = torch.zeros(numel, dtype=dtype, device=HOST)
        return t.pin_memory() if self.pin_memory and torch.cuda.is_available() else t

    def to_host(self, t: torch.Tensor, dtype=None) -> torch.Tensor:
        """An explicit copy into a new host buffer (pinned when asked)."""
        out = self.host_zeros(t.numel(), dtype or t.dtype).view(t.shape)
        return out.copy_(t)


def to_device(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """An explicit copy of a host tensor into a new device buffer (always a new tensor, also when
    host and device are the same CPU): asynchronous from pinned memory."""
    out = torch.empty(t.shape, dtype=dtype, device=device)
    return out.copy_(t, non_blocking=t.is_pinned())


def send_buffer(zero, units) -> torch.Tensor:
    """The chunks this rank sends in an all-gather of `units`, side by side, on the device. Under
    offload_param the chunks live on the host: copied to the device for the collective, dropped after."""
    shards = units[0].shard if len(units) == 1 else torch.cat([u.shard for u in units])
    return to_device(shards, zero.device, zero.model_dtype) if zero.offload.params else shards


def host_tensors(zero) -> list:
    """The tensors `zero` designates to live in host memory, for the ledger's placement."""
    out = []
    if zero.offload.optimizer:
        out += list(zero.masters) + [m.grad for m in zero.masters if m.grad is not None]
        out += list(getattr(zero, "host_grads", []))
        optimizer = getattr(zero, "optimizer", None)
        if optimizer is not None:
            out += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if zero.offload.params:
        out += [u.shard for u in zero.units if getattr(u, "shard", None) is not None]
    return out
