"""What every accelerator answers (DeepSpeed's deepspeed/accelerator/abstract_accelerator.py, the part
ds_lab's users call), with the answers the CPU and CUDA accelerators share.

Streams, events, graphs and op builders are DeepSpeed's machinery for its own kernels; here they
raise NotImplementedError naming what to use instead, except where DeepSpeed's CPU accelerator itself
answers with a no-op (`Stream` None, `stream()` a null context), which ds_lab copies.
"""
from __future__ import annotations

import contextlib

import torch


class DeepSpeedAccelerator:
    _name = "abstract"
    _communication_backend_name = "gloo"

    # ---- device ------------------------------------------------------------------------------
    def device_name(self, device_index=None) -> str:
        raise NotImplementedError

    def device(self, device_index=None):
        raise NotImplementedError

    def set_device(self, device_index) -> None:
        raise NotImplementedError

    def current_device(self) -> int:
        raise NotImplementedError

    def current_device_name(self) -> str:
        raise NotImplementedError

    def device_count(self) -> int:
        raise NotImplementedError

    def is_available(self) -> bool:
        raise NotImplementedError

    def synchronize(self, device_index=None) -> None:
        raise NotImplementedError

    def is_synchronized_device(self) -> bool:
        return False

    def communication_backend_name(self) -> str:
        return self._communication_backend_name

    def on_accelerator(self, tensor) -> bool:
        return str(tensor.device).startswith(self._name)

    # ---- random numbers -----------------------------------------------------------------------
    def random(self):
        return torch.random

    def manual_seed(self, seed):
        raise NotImplementedError

    def manual_seed_all(self, seed):
        raise NotImplementedError

    def initial_seed(self) -> int:
        return torch.initial_seed()

    # ---- dtypes -------------------------------------------------------------------------------
    def is_bf16_supported(self) -> bool:
        raise NotImplementedError

    def is_fp16_supported(self) -> bool:
        raise NotImplementedError

    def supported_dtypes(self) -> list:
        dtypes = [torch.float]
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        if self.is_fp16_supported():
            dtypes.append(torch.half)
        return dtypes

    # ---- memory (bytes) -----------------------------------------------------------------------
    def pin_memory(self, tensor, align_bytes=1):
        return tensor

    def is_pinned(self, tensor) -> bool:
        return tensor.is_pinned()

    def memory_reserved(self, device_index=None) -> int:
        return self.memory_allocated(device_index)

    def max_memory_reserved(self, device_index=None) -> int:
        return self.max_memory_allocated(device_index)

    def memory_cached(self, device_index=None) -> int:
        return self.memory_reserved(device_index)

    def max_memory_cached(self, device_index=None) -> int:
        return self.max_memory_reserved(device_index)

    def reset_max_memory_allocated(self, device_index=None) -> None:
        self.reset_peak_memory_stats(device_index)

    def reset_max_memory_cached(self, device_index=None) -> None:
        self.reset_peak_memory_stats(device_index)

    def memory_stats(self, device_index=None) -> dict:
        return {"allocated_bytes.all.current": self.memory_allocated(device_index),
                "allocated_bytes.all.peak": self.max_memory_allocated(device_index)}

    # ---- what ds_lab leaves out -----------------------------------------------------------------
    def Stream(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.Stream: ds_lab has no accelerator streams; "
                                  "use torch.cuda.Stream directly")

    def Event(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.Event: ds_lab has no accelerator events; "
                                  "use torch.cuda.Event directly, or time.perf_counter() after synchronize()")

    def stream(self, stream):
        return contextlib.nullcontext()

    def create_op_builder(self, class_name):
        raise NotImplementedError("ds_lab builds no DeepSpeed ops; its kernels are in ds_lab.ops "
                                  "(FusedAdam, DeepSpeedCPUAdam: ds_lab.ops.adam)")

    def get_op_builder(self, class_name):
        return self.create_op_builder(class_name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device_name={self._name!r}, backend={self._communication_backend_name!r})"
