"""Which backend runs a kernel, and the one call that runs it there.

    backend   what runs                                              where
    "cuda"    the kernels/*.cu source compiled for the GPU, via CuPy   tensors on a CUDA device
    "emulate" the same source compiled for the CPU (ops/emulate.py)   contiguous CPU tensors
    "torch"   the op's torch reference (each op module has one)       anywhere

`resolve(backend, *tensors)`: None means the best available: "cuda" when the tensors are on a GPU
and CuPy is installed (and `set_fused_kernels(False)` has not turned it off), else "torch". The
emulation is never chosen by default: it is exact but slow, and is asked for by name (tests, the
chapter). An explicit backend that cannot run here is a clear error, never a silent fallback.

`launch(module, kernel, grid, block, args, backend)`: run `kernel` of kernels/<module>.cu.
"""
from __future__ import annotations

import importlib.util

import torch

BACKENDS = ("cuda", "emulate", "torch")
# what the row kernels' launchers share (norm.py, gelu.py, softmax.py)
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}  # the kernel entry point for each dtype
MAX_THREADS = 256
MAX_BLOCKS = 256  # rows per launch beyond this are grid-strided; also the number of dweight partials


def threads_for(width: int) -> int:
    """A block size for `width` elements per row: a multiple of 32 (the kernels' reductions
    assume whole warps), at most MAX_THREADS."""
    return min(MAX_THREADS, max(32, (width + 31) // 32 * 32))

_fused = {"enabled": True}  # the engine's "fused_kernels" config switch sets this


class BackendError(RuntimeError):
    """A backend was asked for where it cannot run."""


def set_fused_kernels(enabled: bool) -> None:
    """Let the default backend use the CUDA kernels (True) or always torch (False)."""
    _fused["enabled"] = bool(enabled)


def fused_kernels_enabled() -> bool:
    return _fused["enabled"]


def cupy_available() -> bool:
    return importlib.util.find_spec("cupy") is not None and torch.cuda.is_available()


def resolve(backend, *tensors) -> str:
    """The backend that will run: `backend` checked, or the best available for these tensors."""
    on_gpu = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    if backend is None:
        return "cuda" if on_gpu and cupy_available() and _fused["enabled"] else "torch"
    if backend not in BACKENDS:
        raise BackendError(f"backend={backend!r}: choose one of {BACKENDS} (or None for the best available)")
    if backend == "cuda" and not (on_gpu and cupy_available()):
        raise BackendError("backend='cuda' needs the tensors on a CUDA device and CuPy installed "
                           "(pip install cupy-cuda12x); use backend='emulate' to run the same kernel on the CPU")
    if backend == "emulate" and on_gpu:
        raise BackendError("backend='emulate' runs on CPU tensors; move them with .cpu() or use backend='cuda'")
    return backend


def launch(module: str, kernel: str, grid, block, args, backend: str, capture: bool = False):
    """Run `kernel` from kernels/<module>.cu with `backend` ("cuda" or "emulate")."""
    if backend == "emulate":
        from ds_lab.ops import emulate
        return emulate.load(module).launch(kernel, grid, block, args, capture=capture)
    if backend == "cuda":
        from ds_lab.ops import cuda
        return cuda.load(module).launch(kernel, grid, block, args)
    raise BackendError(f"launch() runs kernels on 'cuda' or 'emulate', not {backend!r}")


_poison = {"on": False}


class poison_outputs:
    """`with poison_outputs():` every output `empty()` makes is filled with NaN (integers: 0xAB)
    first, so an element a kernel forgets to write shows in the result (the parity tests use it)."""

    def __enter__(self):
        self.before, _poison["on"] = _poison["on"], True
        return self

    def __exit__(self, *exc):
        _poison["on"] = self.before


def empty(shape, dtype, device) -> torch.Tensor:
    """A kernel's output buffer: torch.empty, poisoned inside `poison_outputs()`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison["on"]:
        out.fill_(float("nan") if out.is_floating_point() else 0xAB)
    return out
