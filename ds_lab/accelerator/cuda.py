"""The CUDA accelerator (DeepSpeed's deepspeed/accelerator/cuda_accelerator.py): 'cuda:i', backend 'nccl'.

Every method is a thin call into torch.cuda, made when the method is called (building the object
touches nothing), so importing or choosing it creates no CUDA context.
`available_memory()` is the driver's free memory (torch.cuda.mem_get_info; DeepSpeed asks NVML).
"""
from __future__ import annotations

import sys

import torch

from ds_lab.accelerator.abstract import DeepSpeedAccelerator


class CUDA_Accelerator(DeepSpeedAccelerator):
    _name = "cuda"
    _communication_backend_name = "nccl" if sys.platform != "win32" else "gloo"

    # ---- device ------------------------------------------------------------------------------
    def device_name(self, device_index=None) -> str:
        return "cuda" if device_index is None else f"cuda:{device_index}"

    def device(self, device_index=None):
        return torch.cuda.device(device_index)

    def set_device(self, device_index) -> None:
        torch.cuda.set_device(device_index)

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def current_device_name(self) -> str:
        return f"cuda:{torch.cuda.current_device()}"

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def is_available(self) -> bool:
        return torch.cuda.device_count() > 0  # NVML: no driver initialisation (see ds_lab/accelerator)

    def synchronize(self, device_index=None) -> None:
        torch.cuda.synchronize(device_index)

    # ---- random numbers -----------------------------------------------------------------------
    def manual_seed(self, seed):
        return torch.cuda.manual_seed(seed)

    def manual_seed_all(self, seed):
        return torch.cuda.manual_seed_all(seed)

    def initial_seed(self) -> int:
        return torch.cuda.initial_seed()

    def get_rng_state(self, device_index=None):
        return torch.cuda.get_rng_state() if device_index is None else torch.cuda.get_rng_state(device_index)

    def set_rng_state(self, new_state, device_index=None):
        if device_index is None:
            return torch.cuda.set_rng_state(new_state)
        return torch.cuda.set_rng_state(new_state, device_index)

    def default_generator(self, device_index):
        return torch.cuda.default_generators[device_index]

    # ---- dtypes -------------------------------------------------------------------------------
    def is_bf16_supported(self) -> bool:
        return self.is_available() and torch.cuda.is_bf16_supported()

    def is_fp16_supported(self) -> bool:
        if not self.is_available():
            return False
        major, _ = torch.cuda.get_device_capability()
        return major >= 7  # DeepSpeed's rule: Volta and later

    # ---- memory (bytes of device memory) ------------------------------------------------------
    def memory_allocated(self, device_index=None) -> int:
        return torch.cuda.memory_allocated(device_index)

    def max_memory_allocated(self, device_index=None) -> int:
        return torch.cuda.max_memory_allocated(device_index)

    def memory_reserved(self, device_index=None) -> int:
        return torch.cuda.memory_reserved(device_index)

    def max_memory_reserved(self, device_index=None) -> int:
        return torch.cuda.max_memory_reserved(device_index)

    def memory_stats(self, device_index=None) -> dict:
        return torch.cuda.memory_stats(device_index)

    def reset_peak_memory_stats(self, device_index=None) -> None:
        torch.cuda.reset_peak_memory_stats(device_index)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def total_memory(self, device_index=None) -> int:
        return torch.cuda.get_device_properties(device_index or 0).total_memory

    def available_memory(self, device_index=None) -> int:
        return torch.cuda.mem_get_info(device_index)[0]

    def pin_memory(self, tensor, align_bytes=1):
        return tensor.pin_memory()

    def on_accelerator(self, tensor) -> bool:
        return tensor.device.type == "cuda"

    def Stream(self, *args, **kwargs):
        return torch.cuda.Stream(*args, **kwargs)

    def Event(self, *args, **kwargs):
        return torch.cuda.Event(*args, **kwargs)

    def stream(self, stream):
        return torch.cuda.stream(stream)
