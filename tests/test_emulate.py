"""The CPU emulation of CUDA (kernels/emu/cuda_emu.h, ds_lab/ops/emulate.py) does what a GPU does, on
the pieces the kernels rely on: blocks, threads, __syncthreads (also when threads returned early),
__shared__, every shuffle and its width, ballots, atomics, bf16 rounding, printf."""
import pathlib

import pytest
import torch

from ds_lab.ops import emulate
from ds_lab.ops.backend import BackendError, empty, poison_outputs, resolve

PROBE = pathlib.Path(__file__).parent / "kernels" / "emu_probe.cu"

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no C++ compiler for the emulation")


@pytest.fixture(scope="module")
def probe():
    return emulate.Library(PROBE)


def test_the_launcher_knows_each_kernels_parameters(probe):
    assert probe.kernels["atomics"] == [("float*", "total"), ("int*", "hits"), ("int*", "largest"),
                                        ("const float*", "x"), ("int", "n")]
    with pytest.raises(emulate.EmulationError, match="takes 5 arguments"):
        probe.launch("atomics", 1, 32, (torch.zeros(1),))
    with pytest.raises(emulate.EmulationError, match="no kernel"):
        probe.launch("nope", 1, 32, ())
    with pytest.raises(emulate.EmulationError, match="1024"):
        probe.launch("early_exit", 1, 2048, (torch.zeros(2048), 1))


@pytest.mark.parametrize("width,delta", [(32, 1), (32, 5), (16, 3), (8, 7), (4, 2)])
def test_shuffles_follow_cudas_rules_for_every_width(probe, width, delta):
    threads = 70  # two full warps and a partial one of 6 lanes
    out = torch.full((threads * 4,), -1, dtype=torch.int32)
    probe.launch("shuffles", 1, threads, (out, width, delta))
    out = out.view(threads, 4).tolist()
    for t in range(threads):
        lane, warp_lanes = t % 32, min(32, threads - t // 32 * 32)
        segment = lane // width * width

        def value(source, own):  # a lane outside the segment or the warp reads its own value
            ok = segment <= source < segment + width and source < warp_lanes
            return source if ok else own
        assert out[t][0] == (value(lane ^ delta, lane) * 10), (t, "xor")
        assert out[t][1] == value(lane + delta, lane), (t, "down")
        assert out[t][2] == value(lane - delta, lane), (t, "up")
        assert out[t][3] == value(segment + delta % width, lane), (t, "sync")


def test_ballot_gathers_a_warps_predicates(probe):
    predicate = (torch.arange(64) % 3 == 0).int()
    out = torch.zeros(64, dtype=torch.int64).to(torch.int32)
    probe.launch("ballot", 1, 64, (out, predicate))
    for warp in range(2):
        bits = sum(1 << lane for lane in range(32) if predicate[warp * 32 + lane])
        assert all(v & 0xFFFFFFFF == bits for v in out[warp * 32:(warp + 1) * 32].tolist())


def test_atomics_from_every_thread_of_every_block(probe):
    x = torch.ones(5000)
    total, hits, largest = torch.zeros(1), torch.zeros(1, dtype=torch.int32), torch.full((1,), -1, dtype=torch.int32)
    probe.launch("atomics", 3, 64, (total, hits, largest, x, x.numel()))
    assert total.item() == 5000 and hits.item() == 5000 and largest.item() == 4999


@pytest.mark.parametrize("live", [1, 31, 33, 100])
def test_syncthreads_with_threads_that_returned(probe, live):
    out = torch.full((2 * 128,), -1.0)
    probe.launch("early_exit", 2, 128, (out, live))
    out = out.view(2, 128)
    for block in range(2):
        assert out[block, :live].tolist() == [float(live - 1 - t) for t in range(live)]
        assert (out[block, live:] == -1).all()


def test_bf16_rounds_to_nearest_even_as_torch_does(probe):
    x = torch.cat([torch.randn(1000) * 100, torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, float("inf"),
                                                         -float("inf"), float("nan"), 0.0, -0.0, 1e-40])])
    bits, back = torch.zeros(x.numel(), dtype=torch.int16), torch.zeros(x.numel())
    probe.launch("to_bf16", 2, 32, (bits, back, x, x.numel()))
    expected = x.to(torch.bfloat16).view(torch.int16)
    keep = ~torch.isnan(x)  # NaN: any quiet NaN will do
    assert torch.equal(bits[keep], expected[keep]) and torch.isnan(back[~keep]).all()
    assert torch.equal(back[keep], x[keep].to(torch.bfloat16).float())


def test_block_sum_reduces_and_prints_from_threads():
    lib = emulate.load("block_sum")
    for n in (1, 31, 1000, 10001):
        x = torch.randn(n, dtype=torch.float64).float()
        with poison_outputs():
            out = empty((3,), torch.float32, torch.device("cpu"))
        text = lib.launch("block_sum", 3, 96, (out, x, n, 1), capture=True)
        torch.testing.assert_close(out.sum(), x.sum(), rtol=1e-5, atol=1e-5)
        lines = sorted(text.strip().splitlines())
        assert len(lines) == 4 and lines[0].startswith("block 0 thread 0: my grid-stride partial sum is")


def test_backends_are_checked():
    x = torch.zeros(3)
    assert resolve(None, x) == "torch" and resolve("emulate", x) == "emulate"
    with pytest.raises(BackendError, match="CUDA device"):
        resolve("cuda", x)
    with pytest.raises(BackendError, match="choose one of"):
        resolve("triton", x)
