"""Build kernels/*.cu for a GPU with nvcc, and read what ptxas says each kernel costs.

    report = compile_report("block_sum", 90)     # {"block_sum": KernelResources(registers=24, ...)}
    text = ptx("block_sum", "sm_80")             # the PTX, for the chapter
    path = cubin("block_sum", 90)                # the binary ds_lab/ops/cuda.py loads

`cubin` runs `nvcc -arch=sm_XX -cubin -Xptxas -v` once per (source, arch, nvcc version) and keeps
the binary and ptxas's log in the cache (`DS_LAB_CACHE`, default ~/.cache/ds_lab, then cuda/),
named by a hash of the .cu, the headers beside it, the flags and `nvcc --version`. No GPU is needed:
ptxas assembles for any architecture, so CI checks every kernel for Ampere (sm_80) and Hopper (sm_90).

What ptxas reports, per kernel (`KernelResources`):
    registers       per thread; registers x threads per block <= 64 K, so fewer registers = more blocks
    spill_stores/   bytes per thread written to / read back from local memory because the registers
    spill_loads     ran out: local memory is DRAM behind the caches, so a spill in a bandwidth-bound
                    kernel costs real traffic (the tests demand zero)
    stack_frame     bytes of per-thread local memory (arrays indexed at run time, spills, printf)
    shared_memory   static __shared__ bytes per block
nvcc is found on PATH, else in $CUDA_HOME/bin (or $CUDA_PATH/bin).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

from ds_lab.ops.emulate import KERNELS

FLAGS = ("-std=c++17", "-O3")  # -O3 is ptxas's default too; said here so the hash covers it


class CompileError(RuntimeError):
    """nvcc is missing or rejected a kernel (its message is included)."""


@dataclasses.dataclass
class KernelResources:
    """What ptxas says one function costs (entry = a __global__ kernel, else a non-inlined call)."""

    name: str
    entry: bool = False
    registers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    shared_memory: int = 0
    barriers: int = 0


def nvcc() -> str | None:
    """The nvcc to use: on PATH, else under $CUDA_HOME or $CUDA_PATH; None when there is none."""
    found = shutil.which("nvcc")
    if found:
        return found
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and (pathlib.Path(home) / "bin" / "nvcc").is_file():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return None


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    """The last line of `nvcc --version` (e.g. 'Build cuda_13.0.r13.0/compiler.36424714_0')."""
    done = subprocess.run([_nvcc_or_raise(), "--version"], capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "unknown"


def _nvcc_or_raise() -> str:
    found = nvcc()
    if found is None:
        raise CompileError("nvcc not found: put the CUDA toolkit's bin folder on PATH or set CUDA_HOME")
    return found


def arch_number(arch) -> int:
    """80 from 80, "80", "sm_80", "compute_80" or (8, 0)."""
    if isinstance(arch, tuple):
        return arch[0] * 10 + arch[1]
    match = re.fullmatch(r"(?:sm_|compute_)?(\d+)", str(arch))
    if not match:
        raise CompileError(f"arch={arch!r}: write it as 80, 'sm_80' or (8, 0)")
    return int(match.group(1))


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DS_LAB_CACHE", pathlib.Path.home() / ".cache" / "ds_lab")) / "cuda"


def source_of(module: str) -> pathlib.Path:
    cu = KERNELS / f"{module}.cu"
    if not cu.is_file():
        raise CompileError(f"no kernels/{module}.cu; there are {sorted(p.stem for p in KERNELS.glob('*.cu'))}")
    return cu


def source_digest(cu: pathlib.Path, *extra: str) -> str:
    """A hash of the .cu, every header beside it (a kernel may include one), and `extra`."""
    headers = sorted(p for pattern in ("*.cuh", "*.h") for p in cu.parent.glob(pattern))
    parts = [cu.read_text(), *(p.name + p.read_text() for p in headers), *extra]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _build(module: str, arch, kind: str) -> tuple:
    """(output path, ptxas log) of `nvcc -<kind>` for sm_<arch>, from the cache when there."""
    cu, number = source_of(module), arch_number(arch)
    command = [_nvcc_or_raise(), f"-arch=sm_{number}", f"-{kind}", *FLAGS, f"-I{cu.parent}"]
    if kind == "cubin":
        command += ["-Xptxas", "-v"]
    digest = source_digest(cu, nvcc_version(), *command[1:])
    target = cache_dir() / f"{cu.stem}-sm_{number}-{digest}.{kind}"
    log = target.with_suffix(target.suffix + ".log")
    if not (target.exists() and log.exists()):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            built = pathlib.Path(tmp) / target.name
            done = subprocess.run(command + [str(cu), "-o", str(built)], capture_output=True, text=True)
            if done.returncode != 0:
                raise CompileError(f"nvcc could not build kernels/{cu.name} for sm_{number}:\n"
                                   f"{' '.join(command)} {cu.name}\n{done.stderr}{done.stdout}")
            log_built = pathlib.Path(tmp) / log.name
            log_built.write_text(done.stderr + done.stdout)
            os.replace(log_built, log)
            os.replace(built, target)  # atomic: a concurrent build never loads half a binary
    return target, log.read_text()


def cubin(module: str, arch) -> pathlib.Path:
    """kernels/<module>.cu compiled to machine code for sm_<arch> (cached on disk)."""
    return _build(module, arch, "cubin")[0]


def ptx(module: str, arch) -> str:
    """The PTX nvcc makes of kernels/<module>.cu for compute_<arch> (the virtual ISA ptxas reads)."""
    return _build(module, arch, "ptx")[0].read_text()


def ptxas_log(module: str, arch) -> str:
    """ptxas's -v output for kernels/<module>.cu at sm_<arch>."""
    return _build(module, arch, "cubin")[1]


def compile_report(module: str, arch) -> dict:
    """{function name: KernelResources} as ptxas reports them when building for sm_<arch>; entry
    functions (the kernels) have `entry=True`, non-inlined __device__ functions appear too."""
    return parse_ptxas(ptxas_log(module, arch))


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_ptxas(log: str) -> dict:
    """Read `ptxas -v` output: per function, registers, spills, stack frame, static shared memory."""
    found, current = {}, None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            current = found.setdefault(match.group(1), KernelResources(match.group(1)))
            current.entry = True
        elif match := _PROPERTIES.search(line):
            current = found.setdefault(match.group(1), KernelResources(match.group(1)))
        elif current is not None and (match := _FRAME.search(line)):
            current.stack_frame, current.spill_stores, current.spill_loads = (int(g) for g in match.groups())
        elif current is not None and (match := _USED.search(line)):
            current.registers = int(match.group(1))
            current.shared_memory = int(m.group(1)) if (m := _SMEM.search(line)) else 0
            current.barriers = int(m.group(1)) if (m := _BARRIERS.search(line)) else 0
    return found


def report_table(reports: dict) -> str:
    """A markdown table of {(module, arch): compile_report(...)}: one row per kernel and arch."""
    rows = ["| module | kernel | arch | registers | spill stores | spill loads | stack frame | smem |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for (module, arch), report in sorted(reports.items()):
        for r in report.values():
            rows.append(f"| {module} | {r.name}{'' if r.entry else ' (device fn)'} | sm_{arch_number(arch)} | "
                        f"{r.registers if r.registers is not None else '-'} | {r.spill_stores} | {r.spill_loads} | "
                        f"{r.stack_frame} | {r.shared_memory} |")
    return "\n".join(rows)
