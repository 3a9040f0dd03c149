"""Run the kernels of `kernels/*.cu` on a GPU through CuPy, on torch's tensors and torch's stream.

    module = cuda.load("layer_norm")           # compiled once per process, binary cached on disk
    module.launch("layer_norm_fwd_f32", grid=(rows,), block=(128,), args=(y, mean, rstd, x, w, b, rows, cols, 1e-5))

The same call as `ops/emulate.py`, the CPU twin; both read a kernel's parameters with
`emulate.kernels_of` (the `extern "C" __global__` signatures), so a launch is checked the same way.

Build. `compile.cubin` runs nvcc (`-arch=sm_XX -cubin`, XX = the device's compute capability) and
keeps the cubin in the cache (`DS_LAB_CACHE`/cuda). Without nvcc (or with DS_LAB_CUDA_COMPILER=nvrtc)
CuPy's NVRTC compiles the source, also straight to a cubin for sm_XX (`-arch=sm_XX`), cached next
to nvcc's. Machine code, not PTX, on purpose: PTX would be finished by the driver's own ptxas at
load time, and a newer NVRTC's PTX is refused by an older driver (NVRTC 13.5's PTX, ptxas 13.0:
"Unsupported .version"). A warning names an NVRTC newer than the driver; pin the NVRTC wheel to the
driver's CUDA version then (`pip install "nvidia-cuda-nvrtc==13.0.*"` for a 13.0 driver). The
binary is loaded with `cupy.RawModule(path=...)`, once per device, its kernels with `get_function`.

Launch. Tensors go by address, zero-copy (`numpy.uint64(t.data_ptr())`; None is a null pointer),
after a check of device, contiguity and dtype against the parameter's C type; numbers go as the
numpy type of theirs (`int` -> int32, `float` -> float32, `size_t` -> uint64, ...), range-checked.
Grid and block are checked against CUDA's limits and the kernel's own `max_threads_per_block`
(its __launch_bounds__, its registers). The launch runs on `torch.cuda.current_stream()` (as a
`cupy.cuda.ExternalStream`), so it is ordered with the torch work around it, no sync needed.

Errors. CuPy launches with the driver API: `cuLaunchKernel`'s own errors (bad configuration, too
many resources) come back from the call, and are re-raised naming the kernel, grid and block. The
runtime's `cudaGetLastError` would not see them, so it is not used. A fault inside the kernel (a
bad address) is asynchronous: it surfaces at a later sync, anywhere. With DS_LAB_CUDA_SYNC=1 (or
CUDA_LAUNCH_BLOCKING=1) every launch is followed by a sync of its stream, so the fault names the
kernel that made it: the debug mode, slow, for tests and for hunting a fault.

CuPy is imported lazily: this module imports on a machine without it.
"""
from __future__ import annotations

import os
import pathlib
import warnings

import numpy
import torch

from ds_lab.ops import compile as build
from ds_lab.ops.emulate import _dim3, kernels_of

# C type of a pointer's target -> the torch dtypes a tensor for it may have (absent: any dtype)
POINTER_DTYPES = {
    "float": (torch.float32,), "double": (torch.float64,), "__half": (torch.float16,), "half": (torch.float16,),
    "__nv_bfloat16": (torch.bfloat16,), "nv_bfloat16": (torch.bfloat16,), "int": (torch.int32,),
    "int32_t": (torch.int32,), "unsigned": (torch.int32, torch.uint32), "unsigned int": (torch.int32, torch.uint32),
    "uint32_t": (torch.int32, torch.uint32), "long long": (torch.int64,), "int64_t": (torch.int64,),
    "unsigned char": (torch.uint8,), "uint8_t": (torch.uint8,), "signed char": (torch.int8,), "int8_t": (torch.int8,),
    "bool": (torch.bool,)}
# C type of a number parameter -> the numpy type it is passed as (its size and bits are the ABI)
SCALAR_TYPES = {
    "float": numpy.float32, "double": numpy.float64, "int": numpy.int32, "int32_t": numpy.int32,
    "unsigned": numpy.uint32, "unsigned int": numpy.uint32, "uint32_t": numpy.uint32, "long long": numpy.int64,
    "int64_t": numpy.int64, "unsigned long long": numpy.uint64, "uint64_t": numpy.uint64, "size_t": numpy.uint64,
    "bool": numpy.bool_}
MAX_BLOCK = (1024, 1024, 64)  # threads per block <= 1024 too
MAX_GRID = (2**31 - 1, 65535, 65535)


class CudaError(RuntimeError):
    """A kernel could not be built, loaded or launched on the GPU (the reason is in the message)."""


def debug_sync() -> bool:
    """Sync after every launch (DS_LAB_CUDA_SYNC=1 or CUDA_LAUNCH_BLOCKING=1)."""
    return os.environ.get("DS_LAB_CUDA_SYNC", "0") not in ("", "0") or os.environ.get("CUDA_LAUNCH_BLOCKING") == "1"


def _cupy():
    try:
        import cupy
    except ImportError:
        raise CudaError("the 'cuda' backend needs CuPy: pip install cupy-cuda12x (cupy-cuda13x for a CUDA 13 "
                        "toolkit), or use backend='emulate' to run the same kernel on the CPU") from None
    return cupy


def _base(ctype: str) -> str:
    """'const float *' -> 'float'."""
    return " ".join(w for w in ctype.replace("*", " ").split() if w not in ("const", "volatile"))


# ---------------------------------------------------------------- checks (no GPU needed)

def check_shape(kernel: str, grid, block, max_threads: int = 1024) -> tuple:
    """(grid, block) as 3-tuples, within CUDA's limits and the kernel's threads-per-block limit."""
    grid, block = _dim3(grid), _dim3(block)
    for what, dims, limits in (("grid", grid, MAX_GRID), ("block", block, MAX_BLOCK)):
        for axis, value, limit in zip("xyz", dims, limits):
            if not 1 <= value <= limit:
                raise CudaError(f"{kernel}: {what}.{axis} = {value} is outside CUDA's limit 1..{limit} "
                                f"(grid={grid}, block={block})")
    threads = block[0] * block[1] * block[2]
    if threads > max_threads:
        raise CudaError(f"{kernel}: block {block} has {threads} threads; this kernel takes at most {max_threads} "
                        f"per block (CUDA's 1024, its __launch_bounds__, or its registers)")
    return grid, block


def marshal(kernel: str, params: list, args, device_type: str = "cuda") -> tuple:
    """(kernel arguments as numpy values, the tensors' device) for `params` (from kernels_of):
    tensors by address after a dtype/device/contiguity check, numbers as their parameter's type."""
    if len(args) != len(params):
        raise CudaError(f"{kernel} takes {len(params)} arguments ({', '.join(p for _, p in params)}), "
                        f"got {len(args)}")
    values, device = [], None
    for arg, (ctype, pname) in zip(args, params):
        where = f"{kernel}: argument {pname} ({ctype})"
        if "*" in ctype:
            if arg is None:
                values.append(numpy.uint64(0))
                continue
            if not isinstance(arg, torch.Tensor):
                raise CudaError(f"{where} is a pointer: pass a tensor (or None for a null pointer), "
                                f"got {type(arg).__name__}")
            if arg.device.type != device_type:
                raise CudaError(f"{where} is on {arg.device}; the 'cuda' backend needs every tensor on the GPU")
            if device is not None and arg.device != device:
                raise CudaError(f"{where} is on {arg.device}, an earlier tensor on {device}: put them on one device")
            if not arg.is_contiguous():
                raise CudaError(f"{where} must be contiguous: pass .contiguous()")
            allowed = POINTER_DTYPES.get(_base(ctype))
            if allowed and arg.dtype not in allowed and ctype.count("*") == 1:
                raise CudaError(f"{where} needs a tensor of {' or '.join(map(str, allowed))}, got {arg.dtype}")
            device = arg.device
            values.append(numpy.uint64(arg.data_ptr()))
        else:
            values.append(_number(arg, ctype, where))
    return values, device


def _number(arg, ctype: str, where: str):
    scalar = SCALAR_TYPES.get(_base(ctype))
    if scalar is None:
        raise CudaError(f"{where}: the CUDA launcher does not know the type {ctype!r}; add it to "
                        f"ds_lab/ops/cuda.py SCALAR_TYPES")
    if isinstance(arg, torch.Tensor):
        raise CudaError(f"{where} is a number; got a tensor (for a 0-d tensor pass .item())")
    if scalar is numpy.bool_:
        if not isinstance(arg, (bool, numpy.bool_)):
            raise CudaError(f"{where} must be a bool, got {arg!r}")
        return numpy.bool_(arg)
    if numpy.issubdtype(scalar, numpy.integer):
        if isinstance(arg, (bool, numpy.bool_)) or not isinstance(arg, (int, numpy.integer)):
            raise CudaError(f"{where} must be an integer, got {arg!r}")
        info = numpy.iinfo(scalar)
        if not info.min <= int(arg) <= info.max:
            raise CudaError(f"{where} = {arg} does not fit in {ctype} ({info.min}..{info.max})")
        return scalar(int(arg))
    if isinstance(arg, (bool, numpy.bool_)) or not isinstance(arg, (int, float, numpy.integer, numpy.floating)):
        raise CudaError(f"{where} must be a number, got {arg!r}")
    return scalar(arg)


def check_types(module: str, kernels: dict) -> None:
    """Every number parameter has a known numpy type (said at load, not at the first launch)."""
    for kernel, params in kernels.items():
        for ctype, pname in params:
            if "*" not in ctype and _base(ctype) not in SCALAR_TYPES:
                raise CudaError(f"kernels/{module}.cu {kernel}: parameter {pname} has type {ctype!r}, which the "
                                f"CUDA launcher does not know; add it to ds_lab/ops/cuda.py SCALAR_TYPES")


# ---------------------------------------------------------------- build and load

def compiler() -> str:
    """'nvcc' when nvcc is found (or asked for), else 'nvrtc' (CuPy's); DS_LAB_CUDA_COMPILER overrides."""
    chosen = os.environ.get("DS_LAB_CUDA_COMPILER") or ("nvcc" if build.nvcc() else "nvrtc")
    if chosen not in ("nvcc", "nvrtc"):
        raise CudaError(f"DS_LAB_CUDA_COMPILER={chosen!r}: set it to 'nvcc' or 'nvrtc'")
    return chosen


def binary(module: str, arch: int) -> tuple:
    """(cubin path, how it was made) for kernels/<module>.cu at sm_<arch>, from the cache when there."""
    if compiler() == "nvcc":
        return build.cubin(module, arch), f"nvcc ({build.nvcc_version()})"
    return _nvrtc_cubin(module, arch)


def _nvrtc_cubin(module: str, arch: int) -> tuple:
    nvrtc, runtime = _cupy().cuda.nvrtc, _cupy().cuda.runtime
    cu = build.source_of(module)
    version, driver = nvrtc.getVersion(), runtime.driverGetVersion()
    if version[0] * 1000 + version[1] * 10 > driver:
        warnings.warn(f"NVRTC {version[0]}.{version[1]} is newer than the driver's CUDA {driver // 1000}."
                      f"{driver % 1000 // 10}: ds_lab asks it for machine code (no PTX for the driver to refuse), "
                      f"but if loading fails, pin the NVRTC wheel to the driver's version or install nvcc",
                      stacklevel=3)
    options = [f"-arch=sm_{arch}", "-std=c++17", f"-I{cu.parent}"]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (pathlib.Path(home) / "include").is_dir():
        options.append(f"-I{pathlib.Path(home) / 'include'}")
    how = f"nvrtc {version[0]}.{version[1]}"
    target = build.cache_dir() / f"{cu.stem}-sm_{arch}-{build.source_digest(cu, how, *options)}.nvrtc.cubin"
    if not target.exists():
        source = cu.read_text()
        # printf is built into NVRTC, which has no C library headers: those includes become empty
        stubs = [name for name in ("cstdio", "stdio.h") if f"<{name}>" in source]
        program = nvrtc.createProgram(source, cu.name, [""] * len(stubs), stubs)
        try:
            try:
                nvrtc.compileProgram(program, options)
            except nvrtc.NVRTCError as error:
                raise CudaError(f"NVRTC could not build kernels/{cu.name} for sm_{arch} ({error}):\n"
                                f"{nvrtc.getProgramLog(program)}") from None
            data = nvrtc.getCUBIN(program)
        finally:
            nvrtc.destroyProgram(program)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(data)
        os.replace(partial, target)  # atomic: a concurrent build never loads half a binary
    return target, how


class Module:
    """One kernels/<name>.cu on the GPU: `launch(kernel, grid, block, args)`; built on first use
    per device (compute capability), its functions looked up once."""

    def __init__(self, name: str):
        self.name = name
        self.kernels = kernels_of(build.source_of(name).read_text())
        if not self.kernels:
            raise CudaError(f'kernels/{name}.cu has no extern "C" __global__ kernel')
        check_types(name, self.kernels)
        self._modules, self._functions, self.built_with = {}, {}, {}

    def function(self, kernel: str, device_index: int):
        """The CuPy function of `kernel` on GPU `device_index` (loading the module there if needed)."""
        key = (kernel, device_index)
        if key not in self._functions:
            cupy = _cupy()
            with cupy.cuda.Device(device_index) as device:
                arch = build.arch_number(device.compute_capability)
                if device_index not in self._modules:
                    path, self.built_with[device_index] = binary(self.name, arch)
                    self._modules[device_index] = cupy.RawModule(path=str(path))
                try:  # CuPy loads the binary into the device's context here, at the first lookup
                    self._functions[key] = self._modules[device_index].get_function(kernel)
                except cupy.cuda.driver.CUDADriverError as error:
                    raise CudaError(f"kernels/{self.name}.cu built by {self.built_with[device_index]} for sm_{arch} "
                                    f"does not load ({error}); the driver supports CUDA "
                                    f"{cupy.cuda.runtime.driverGetVersion()}. A toolkit newer than the driver is "
                                    f"the usual cause: set DS_LAB_CUDA_COMPILER to the other compiler (nvcc, "
                                    f"nvrtc) or match the versions") from None
        return self._functions[key]

    def launch(self, kernel: str, grid, block, args):
        """Run `kernel<<<grid, block, 0, torch's current stream>>>(*args)`: tensors by address,
        numbers by value, every part checked first; with DS_LAB_CUDA_SYNC=1, synced after."""
        if kernel not in self.kernels:
            raise CudaError(f"no kernel {kernel!r} in kernels/{self.name}.cu; there are {sorted(self.kernels)}")
        values, device = marshal(kernel, self.kernels[kernel], args)
        index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
        function = self.function(kernel, index)
        grid, block = check_shape(kernel, grid, block, getattr(function, "max_threads_per_block", 1024))
        cupy = _cupy()
        with cupy.cuda.Device(index):
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream)
            try:
                function(grid, block, tuple(values), stream=stream)
                if debug_sync():
                    stream.synchronize()
            except (cupy.cuda.driver.CUDADriverError, cupy.cuda.runtime.CUDARuntimeError) as error:
                hint = "" if debug_sync() else (" (a fault of an earlier launch can surface here: run with "
                                                "DS_LAB_CUDA_SYNC=1 to sync after each launch)")
                raise CudaError(f"{kernel}<<<{grid}, {block}>>> of kernels/{self.name}.cu failed: {error}{hint}") \
                    from None


_loaded: dict = {}


def load(module: str) -> Module:
    """kernels/<module>.cu for the GPU, once per process."""
    if module not in _loaded:
        _loaded[module] = Module(module)
    return _loaded[module]
