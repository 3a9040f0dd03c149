"""Every kernels/*.cu builds for the GPUs we target, without spills; the CUDA launcher's checks; the
engine's "fused_kernels" switch.

No GPU is needed: ptxas assembles for sm_80 (A100) and sm_90 (H100/H200) on any machine with nvcc,
and prints each kernel's registers, spills, stack frame and shared memory (printed here with -s;
recorded nowhere). The launcher's argument and shape checks run on CPU tensors; its plumbing (cubin
path, stream, numpy types) runs against a stand-in for CuPy. Without nvcc the build tests skip.
"""
import pathlib
import sys
import types

import numpy
import pytest
import torch

from ds_lab.config import ConfigError, DeepSpeedConfig
from ds_lab.ops import backend, compile as build, cuda

KERNELS = sorted(pathlib.Path(build.KERNELS).glob("*.cu"))
ARCHS = (80, 90)
needs_nvcc = pytest.mark.skipif(build.nvcc() is None, reason="nvcc not found on PATH or under CUDA_HOME")


@pytest.fixture(scope="module", params=[(cu.stem, arch) for cu in KERNELS for arch in ARCHS],
                ids=lambda p: f"{p[0]}-sm_{p[1]}")
def report(request, tmp_path_factory):
    """One nvcc run per file and arch, into a cache private to this test session."""
    if build.nvcc() is None:
        pytest.skip("nvcc not found on PATH or under CUDA_HOME")
    module, arch = request.param
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DS_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        found = build.compile_report(module, arch)
    print(f"\n{build.report_table({(module, arch): found})}")
    return module, arch, found


def test_every_kernel_file_builds_with_its_kernels_reported(report):
    module, arch, found = report
    kernels = cuda.kernels_of((build.KERNELS / f"{module}.cu").read_text())
    entries = {name for name, r in found.items() if r.entry}
    assert set(kernels) <= entries, f"ptxas reported {sorted(entries)}, the source declares {sorted(kernels)}"
    assert all(found[name].registers for name in kernels), f"no register count for some kernel of {module}"


def test_no_kernel_spills_registers(report):
    module, arch, found = report
    spilled = {name: (r.spill_stores, r.spill_loads) for name, r in found.items() if r.spill_stores or r.spill_loads}
    assert not spilled, (f"kernels/{module}.cu spills at sm_{arch} (bytes stored, loaded per thread): {spilled}; "
                         f"fewer live values per thread, or a smaller unroll, brings them back into registers")


@needs_nvcc
def test_ptx_is_text_for_the_asked_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_LAB_CACHE", str(tmp_path))
    text = build.ptx("block_sum", "sm_90")
    assert ".target sm_90" in text and ".entry block_sum" in text


def test_ptxas_output_is_read_per_function():
    log = """ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8 bytes cumulative stack size, 2048 bytes smem
ptxas info    : Function properties for _Z6helperf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"""
    found = build.parse_ptxas(log)
    assert found["k"] == build.KernelResources("k", entry=True, registers=40, spill_stores=4, spill_loads=12,
                                               stack_frame=8, shared_memory=2048, barriers=1)
    assert not found["_Z6helperf"].entry and found["_Z6helperf"].registers is None


def test_architectures_are_read_in_every_spelling():
    assert {build.arch_number(a) for a in (90, "90", "sm_90", "compute_90", (9, 0))} == {90}
    with pytest.raises(build.CompileError, match="sm_80"):
        build.arch_number("ampere")


# ---------------------------------------------------------------- the CUDA launcher, without a GPU

BLOCK_SUM = [("float*", "out"), ("const float*", "x"), ("int", "n"), ("int", "verbose")]


def test_cuda_module_imports_without_cupy():
    assert "cupy" not in sys.modules or isinstance(sys.modules["cupy"], types.ModuleType)
    assert cuda.load("block_sum").kernels == {"block_sum": BLOCK_SUM}


@pytest.mark.parametrize("module", [cu.stem for cu in KERNELS])
def test_every_kernel_parameter_type_is_known_to_the_cuda_launcher(module):
    cuda.Module(module)  # check_types raises, naming the kernel and parameter, for a type it cannot pass


def test_launch_arguments_become_addresses_and_typed_numbers():
    out, x = torch.zeros(2), torch.zeros(8)
    values, _ = cuda.marshal("block_sum", BLOCK_SUM, (out, x, 8, 0), device_type="cpu")
    assert values == [out.data_ptr(), x.data_ptr(), 8, 0]
    assert [type(v) for v in values] == [numpy.uint64, numpy.uint64, numpy.int32, numpy.int32]
    values, _ = cuda.marshal("k", [("float*", "y"), ("float", "eps"), ("size_t", "n")], (None, 1e-5, 2**40),
                             device_type="cpu")
    assert [type(v) for v in values] == [numpy.uint64, numpy.float32, numpy.uint64] and values[0] == 0


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(2, dtype=torch.float64), torch.zeros(8), 8, 0), "needs a tensor of torch.float32"),
    ((torch.zeros(2), torch.zeros(8), 8), "takes 4 arguments"),
    ((torch.zeros(2), torch.zeros(4, 2).t(), 8, 0), "contiguous"),
    ((torch.zeros(2), 1234, 8, 0), "pass a tensor"),
    ((torch.zeros(2), torch.zeros(8), 8.0, 0), "must be an integer"),
    ((torch.zeros(2), torch.zeros(8), 2**31, 0), "does not fit"),
    ((torch.zeros(2), torch.zeros(8), torch.tensor(8), 0), "got a tensor"),
])
def test_launch_arguments_are_checked_against_the_kernel_signature(args, message):
    with pytest.raises(cuda.CudaError, match=message):
        cuda.marshal("block_sum", BLOCK_SUM, args, device_type="cpu")


def test_cpu_tensors_are_refused_by_the_cuda_launcher():
    with pytest.raises(cuda.CudaError, match="on the GPU"):
        cuda.load("block_sum").launch("block_sum", 1, 32, (torch.zeros(1), torch.zeros(8), 8, 0))


@pytest.mark.parametrize("grid, block, message", [
    (0, 32, "grid.x = 0"), (1, 2048, "block.x = 2048"), ((1, 70000), 32, "grid.y = 70000"),
    (1, (1, 1, 65), "block.z = 65"), (1, 512, "at most 256")])
def test_launch_shapes_are_checked_against_cuda_limits(grid, block, message):
    with pytest.raises(cuda.CudaError, match=message):
        cuda.check_shape("k", grid, block, max_threads=256)


@needs_nvcc
def test_launch_plumbing_with_a_stand_in_for_cupy(tmp_path, monkeypatch):
    """The cubin nvcc built for the device's capability is what CuPy loads; the call gets 3-D shapes,
    numpy-typed arguments and torch's current stream."""
    calls = {}

    class Function:
        max_threads_per_block = 1024

        def __call__(self, grid, block, args, stream=None):
            calls["launch"] = (grid, block, args, stream)

    class RawModule:
        def __init__(self, path):
            calls["path"] = path

        def get_function(self, name):
            calls["function"] = name
            return Function()

    class Device:
        compute_capability = "90"

        def __init__(self, index):
            calls["device"] = index

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class DriverError(Exception):
        pass

    fake = types.SimpleNamespace(RawModule=RawModule, cuda=types.SimpleNamespace(
        Device=Device, ExternalStream=lambda pointer: ("stream", pointer),
        driver=types.SimpleNamespace(CUDADriverError=DriverError),
        runtime=types.SimpleNamespace(CUDARuntimeError=DriverError)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setenv("DS_LAB_CACHE", str(tmp_path))
    monkeypatch.delenv("DS_LAB_CUDA_COMPILER", raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: types.SimpleNamespace(cuda_stream=77))
    on_cpu = cuda.marshal
    monkeypatch.setattr(cuda, "marshal", lambda *a: on_cpu(*a, device_type="cpu"))
    out, x = torch.zeros(2), torch.zeros(8)
    module = cuda.Module("block_sum")
    module.launch("block_sum", 2, 128, (out, x, 8, 0))
    assert pathlib.Path(calls["path"]).name.startswith("block_sum-sm_90-") and calls["path"].endswith(".cubin")
    assert calls["function"] == "block_sum" and calls["device"] == 0
    grid, block, args, stream = calls["launch"]
    assert (grid, block, stream) == ((2, 1, 1), (128, 1, 1), ("stream", 77))
    assert args == (out.data_ptr(), x.data_ptr(), 8, 0) and isinstance(args[2], numpy.int32)

    def fault(*args, **kwargs):
        raise DriverError("CUDA_ERROR_ILLEGAL_ADDRESS")

    monkeypatch.setattr(Function, "__call__", fault)
    with pytest.raises(cuda.CudaError, match=r"block_sum<<<\(2, 1, 1\), \(128, 1, 1\)>>>.*DS_LAB_CUDA_SYNC=1"):
        module.launch("block_sum", 2, 128, (out, x, 8, 0))


# ---------------------------------------------------------------- the engine switch

def test_fused_kernels_key_parses_and_defaults_to_null():
    assert DeepSpeedConfig.from_any({"train_batch_size": 4}).fused_kernels is None
    for value in (True, False, None):
        assert DeepSpeedConfig.from_any({"train_batch_size": 4, "fused_kernels": value}).fused_kernels is value


def test_fused_kernels_of_the_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="fused_kernels must be true, false or null"):
        DeepSpeedConfig.from_any({"train_batch_size": 4, "fused_kernels": "yes"})


@pytest.mark.parametrize("value, enabled", [(False, False), (True, True), (None, True)])
def test_engine_sets_the_fused_kernels_switch(value, enabled, monkeypatch):
    import ds_lab
    from ds_lab import comm
    monkeypatch.setattr(backend, "_fused", {"enabled": not enabled})
    model = torch.nn.Linear(4, 2)
    owned = not comm.is_initialized()  # initialize() makes a world of one here: leave none behind
    try:
        ds_lab.initialize(model=model, config={"train_batch_size": 2, "fused_kernels": value,
                                               "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}})
        assert backend.fused_kernels_enabled() is enabled
    finally:
        if owned:
            comm.destroy()
