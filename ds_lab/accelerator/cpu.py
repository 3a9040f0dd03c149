"""The CPU accelerator (DeepSpeed's deepspeed/accelerator/cpu_accelerator.py): device 'cpu', backend 'gloo'.

Memory queries are about the process's host memory, as in DeepSpeed: `memory_allocated()` is the
resident set size (RSS) now, `max_memory_allocated()` the largest RSS seen by these queries since
the last `reset_peak_memory_stats()`, `total_memory()` / `available_memory()` the machine's RAM.
DeepSpeed reads them with psutil; ds_lab uses psutil when it is installed and otherwise reads
/proc/self/status (VmRSS) and /proc/meminfo (MemAvailable), or os.sysconf for the total.

Where ds_lab departs: `current_device()` returns LOCAL_RANK as an int (DeepSpeed returns the
environment string, or the int 0 when it is unset); `is_fp16_supported()` returns False, never None.
"""
from __future__ import annotations

import glob
import os

import torch

from ds_lab.accelerator.abstract import DeepSpeedAccelerator


def _rss_bytes() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # no /proc (macOS): the peak is the best available figure (bytes there, KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _meminfo(key: str):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class CPU_Accelerator(DeepSpeedAccelerator):
    _name = "cpu"
    _communication_backend_name = "gloo"

    def __init__(self):
        self.max_mem = _rss_bytes()

    # ---- device ------------------------------------------------------------------------------
    def device_name(self, device_index=None) -> str:
        return "cpu"

    def device(self, device_index=None):
        return None  # as DeepSpeed's CPU accelerator: there is no device object to enter

    def set_device(self, device_index) -> None:
        return None

    def current_device(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    def current_device_name(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        """LOCAL_SIZE when set, else the number of NUMA nodes with cores (DeepSpeed's count), at least 1."""
        local_size = int(os.environ.get("LOCAL_SIZE", 0))
        if local_size > 0:
            return local_size
        core_lists = []
        for path in sorted(glob.glob("/sys/devices/system/node/node[0-9]*/cpulist")):
            try:
                with open(path) as f:
                    cores = f.read().strip()
            except OSError:
                continue
            if cores and (not core_lists or core_lists[-1] != cores):
                core_lists.append(cores)
        return max(1, len(core_lists))

    def is_available(self) -> bool:
        return True

    def synchronize(self, device_index=None) -> None:
        return None

    def is_synchronized_device(self) -> bool:
        return True

    # ---- random numbers -----------------------------------------------------------------------
    def manual_seed(self, seed):
        return torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        return torch.manual_seed(seed)

    def get_rng_state(self, device_index=None):
        return torch.get_rng_state()

    def set_rng_state(self, new_state, device_index=None):
        return torch.set_rng_state(new_state)

    def default_generator(self, device_index=None):
        return torch.default_generator

    # ---- dtypes -------------------------------------------------------------------------------
    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except Exception:
            return False

    # ---- memory (bytes of host memory) --------------------------------------------------------
    def memory_allocated(self, device_index=None) -> int:
        mem = _rss_bytes()
        self.max_mem = max(self.max_mem, mem)
        return mem

    def max_memory_allocated(self, device_index=None) -> int:
        self.memory_allocated()
        return self.max_mem

    def reset_peak_memory_stats(self, device_index=None) -> None:
        self.max_mem = _rss_bytes()

    def empty_cache(self) -> None:
        return None

    def total_memory(self, device_index=None) -> int:
        try:
            import psutil
            return psutil.virtual_memory().total
        except ImportError:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def available_memory(self, device_index=None) -> int:
        try:
            import psutil
            return psutil.virtual_memory().available
        except ImportError:
            available = _meminfo("MemAvailable")
            return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def pin_memory(self, tensor, align_bytes=1):
        return tensor  # DeepSpeed's CPU accelerator does not pin either (no device to copy to)

    def on_accelerator(self, tensor) -> bool:
        return str(tensor.device).startswith("cpu")
