"""Run the CUDA kernels of `kernels/*.cu` on the CPU: the same source, compiled by the system C++
compiler against `kernels/emu/cuda_emu.h` (CUDA's execution model: blocks, threads as OS threads,
__syncthreads, __shared__, warp shuffles, atomics), loaded with ctypes.

    lib = emulate.load("layer_norm")                     # kernels/layer_norm.cu, built once, cached
    lib.launch("layer_norm_fwd_f32", grid=(rows,), block=(128,), args=(y, x, w, b, rows, cols, 1e-5))
    text = lib.launch(..., capture=True)                 # what the kernel printf'ed

How: the .cu's `extern "C" __global__` kernels are found by a regular expression; for each one a
launcher `emu_launch_<name>(gx, gy, gz, bx, by, bz, <the kernel's own parameters>)` is generated,
which runs the kernel as every thread of every block (`emu::launch`). The generated file includes
the header and the .cu unchanged, and g++ -std=c++20 -O2 builds it into a shared library in the
cache (`DS_LAB_CACHE`, default ~/.cache/ds_lab), named by a hash of everything that went in.
Tensors are passed by address (`data_ptr()`): they must be contiguous and on the CPU.

It is slow (a thread per CUDA thread) and exact: the point is that every kernel is tested in CI
without a GPU, and that a learner can run, and print from, a real kernel on a laptop.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import re
import subprocess
import tempfile
import threading

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"
EMU = KERNELS / "emu"
CXX = os.environ.get("CXX", "g++")
FLAGS = ("-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-fno-fast-math")

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)',
                     re.S)
_CTYPES = {"float": ctypes.c_float, "double": ctypes.c_double, "int": ctypes.c_int, "unsigned": ctypes.c_uint,
           "unsigned int": ctypes.c_uint, "long long": ctypes.c_longlong, "int64_t": ctypes.c_int64,
           "size_t": ctypes.c_size_t, "bool": ctypes.c_bool, "uint32_t": ctypes.c_uint32}


class EmulationError(RuntimeError):
    """The emulation could not build or launch a kernel (the compiler's message is included)."""


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DS_LAB_CACHE", pathlib.Path.home() / ".cache" / "ds_lab")) / "emulate"


def kernels_of(source: str) -> dict:
    """{kernel name: [(C type, parameter name)]} for every `extern "C" __global__` kernel of a .cu source."""
    found = {}
    for name, params in _KERNEL.findall(source):
        parsed = []
        for param in filter(None, (p.strip() for p in params.split(","))):
            param = " ".join(param.replace("__restrict__", "").split())
            match = re.match(r"(.*?)([A-Za-z_]\w*)$", param)
            parsed.append((match.group(1).strip(), match.group(2)))
        found[name] = parsed
    return found


def _ctype(ctype: str):
    if "*" in ctype:
        return ctypes.c_void_p
    base = " ".join(w for w in ctype.split() if w != "const")
    if base not in _CTYPES:
        raise EmulationError(f"parameter type {ctype!r} is not known to the emulation's launcher")
    return _CTYPES[base]


def _wrapper(cu: pathlib.Path, kernels: dict) -> str:
    lines = ['#include "cuda_emu.h"', f'#include "{cu}"', ""]
    for name, params in kernels.items():
        declared = ", ".join(f"{ctype} {pname}" for ctype, pname in params)
        passed = ", ".join(pname for _, pname in params)
        lines += [f'extern "C" void emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                  f'unsigned by, unsigned bz{", " if params else ""}{declared}) {{',
                  f"    emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), [&] {{ {name}({passed}); }});", "}", ""]
    return "\n".join(lines)


def build(cu: pathlib.Path) -> tuple:
    """Compile `cu` for the CPU (cached); return (library path, kernels)."""
    source = cu.read_text()
    kernels = kernels_of(source)
    if not kernels:
        raise EmulationError(f'{cu} has no extern "C" __global__ kernel')
    wrapper = _wrapper(cu, kernels)
    digest = hashlib.sha256("\0".join([source, wrapper, CXX, *FLAGS] + [p.read_text() for p in sorted(EMU.glob("*.h"))])
                            .encode()).hexdigest()[:16]
    target = cache_dir() / f"{cu.stem}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = pathlib.Path(tmp) / f"{cu.stem}_emu.cpp"
            src.write_text(wrapper)
            built = pathlib.Path(tmp) / target.name
            cmd = [CXX, *FLAGS, f"-I{EMU}", f"-I{cu.parent}", str(src), "-o", str(built)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise EmulationError(f"building {cu.name} for the CPU failed:\n{' '.join(cmd)}\n{done.stderr}")
            os.replace(built, target)  # atomic: a concurrent build never loads half a library
    return target, kernels


class Library:
    """One .cu file built for the CPU: `launch(kernel, grid, block, args)`."""

    def __init__(self, cu: pathlib.Path):
        self.path, self.kernels = build(cu)
        self.lib = ctypes.CDLL(str(self.path))
        self._functions = {}
        for name, params in self.kernels.items():
            fn = getattr(self.lib, f"emu_launch_{name}")
            fn.argtypes = [ctypes.c_uint] * 6 + [_ctype(ctype) for ctype, _ in params]
            fn.restype = None
            self._functions[name] = fn

    def launch(self, kernel: str, grid, block, args, capture: bool = False):
        """Run `kernel<<<grid, block>>>(*args)`: tensors by address, numbers by value. With
        `capture`, return what the kernel printed (C's stdout, taken from file descriptor 1)."""
        if kernel not in self._functions:
            raise EmulationError(f"no kernel {kernel!r} here; there are {sorted(self._functions)}")
        params = self.kernels[kernel]
        if len(args) != len(params):
            raise EmulationError(f"{kernel} takes {len(params)} arguments ({', '.join(p for _, p in params)}), "
                                 f"got {len(args)}")
        values = []
        for arg, (ctype, pname) in zip(args, params):
            if isinstance(arg, torch.Tensor):
                if arg.device.type != "cpu" or not arg.is_contiguous():
                    raise EmulationError(f"{kernel}: {pname} must be a contiguous CPU tensor")
                values.append(arg.data_ptr())
            else:
                values.append(arg)
        grid, block = _dim3(grid), _dim3(block)
        if block[0] * block[1] * block[2] > 1024:
            raise EmulationError(f"{kernel}: {block} is more than 1024 threads per block (CUDA's limit)")
        call = lambda: self._functions[kernel](*grid, *block, *values)  # noqa: E731
        return _captured(call) if capture else call()


def _dim3(shape) -> tuple:
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    return tuple(int(v) for v in shape) + (1,) * (3 - len(shape))


_capture_lock = threading.Lock()


def _captured(call) -> str:
    """Run `call` with file descriptor 1 redirected to a temporary file; return what was written."""
    libc = ctypes.CDLL(None)
    with _capture_lock, tempfile.TemporaryFile() as sink:
        libc.fflush(None)
        saved = os.dup(1)
        os.dup2(sink.fileno(), 1)
        try:
            call()
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        return sink.read().decode(errors="replace")


_loaded: dict = {}


def load(name: str) -> Library:
    """kernels/<name>.cu built for the CPU, once per process."""
    if name not in _loaded:
        _loaded[name] = Library(KERNELS / f"{name}.cu")
    return _loaded[name]


def available() -> bool:
    """True if a C++20 compiler is there to build the emulation."""
    try:
        return subprocess.run([CXX, "--version"], capture_output=True).returncode == 0
    except OSError:
        return False
