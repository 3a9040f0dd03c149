"""DeepSpeed's accelerator abstraction: `get_accelerator()` answers "which device, which backend".

    from ds_lab.accelerator import get_accelerator
    device = get_accelerator().device_name(local_rank)          # 'cpu', or 'cuda:1'
    get_accelerator().communication_backend_name()               # 'gloo' / 'nccl'

Two accelerators, chosen as DeepSpeed chooses (deepspeed/accelerator/real_accelerator.py): the
environment variable DS_ACCELERATOR ("cpu" or "cuda") decides when set; otherwise CUDA when torch
sees a GPU, else the CPU. The choice is made lazily, at the first call of `get_accelerator()`, never
at import. The GPU check is `torch.cuda.device_count() > 0`, which asks NVML (when it loads) and so
neither creates a CUDA context nor initialises the driver; DeepSpeed's `torch.cuda.is_available()`
calls cudaGetDeviceCount, which does, and a process that did cannot hand CUDA to forked children.
So a parent process that forks ranks stays CUDA-free. `set_accelerator(acc)` overrides the choice
(DeepSpeed has it too).

This is a leaf of ds_lab: torch only (no torch.distributed, no other ds_lab module).
"""
from __future__ import annotations

import os

from ds_lab.accelerator.abstract import DeepSpeedAccelerator
from ds_lab.accelerator.cpu import CPU_Accelerator
from ds_lab.accelerator.cuda import CUDA_Accelerator

__all__ = ["get_accelerator", "set_accelerator", "is_current_accelerator_supported", "DeepSpeedAccelerator",
           "CPU_Accelerator", "CUDA_Accelerator", "SUPPORTED_ACCELERATOR_LIST"]

SUPPORTED_ACCELERATOR_LIST = ["cuda", "cpu"]  # DeepSpeed's list also has xpu, npu, mps, hpu, mlu, sdaa
_ACCELERATORS = {"cpu": CPU_Accelerator, "cuda": CUDA_Accelerator}
_current = None


def get_accelerator() -> DeepSpeedAccelerator:
    """The accelerator of this process (chosen at the first call; see the module docstring)."""
    global _current
    if _current is not None:
        return _current
    name = os.environ.get("DS_ACCELERATOR")
    if name is not None:
        if name not in _ACCELERATORS:
            raise ValueError(f"DS_ACCELERATOR={name!r}: ds_lab has the accelerators {SUPPORTED_ACCELERATOR_LIST}; "
                             "set one of them or unset the variable")
        if name == "cuda" and not gpu_present():
            raise ValueError("DS_ACCELERATOR=cuda but torch sees no CUDA device; set DS_ACCELERATOR=cpu or unset it")
    else:
        name = "cuda" if gpu_present() else "cpu"
    _current = _ACCELERATORS[name]()
    return _current


def gpu_present() -> bool:
    """Whether torch sees a CUDA device, asked without initialising CUDA (NVML; see the docstring)."""
    import torch
    return torch.cuda.device_count() > 0


def set_accelerator(accel_obj: DeepSpeedAccelerator) -> None:
    """Use `accel_obj` from now on (DeepSpeed's `set_accelerator`)."""
    global _current
    if not isinstance(accel_obj, DeepSpeedAccelerator):
        raise TypeError(f"set_accelerator takes a DeepSpeedAccelerator, got {type(accel_obj).__name__}")
    _current = accel_obj


def is_current_accelerator_supported() -> bool:
    return get_accelerator().device_name() in SUPPORTED_ACCELERATOR_LIST
