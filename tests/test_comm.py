"""ds_lab.comm: the collectives compute the right thing and every byte is recorded."""
import pytest
import torch

import ds_lab
from ds_lab import comm
from tests import workers


@pytest.mark.parametrize("world_size", [2, 3])
def test_collectives_compute_and_record_bytes(world_size):
    results = ds_lab.launch(workers.collectives_worker, world_size)
    n = world_size
    for rank, r in enumerate(results):
        assert torch.equal(r["all_reduce"], torch.full((5,), float(n * (n + 1) / 2)))
        assert torch.equal(r["all_gather"], torch.arange(n).float().repeat_interleave(3))
        assert torch.equal(r["reduce_scatter"], n * torch.tensor([2.0 * rank, 2.0 * rank + 1]))
        assert torch.equal(r["broadcast"], torch.zeros(4))
        if rank == 0:  # its partner joined 0.5 s late
            assert r["issue_seconds"] < 0.2 and r["pending_seconds"] is None
            assert r["waited_seconds"] > 0.3
        ops = {(op, nbytes) for op, nbytes, size, timed in r["log"]}
        assert ("all_reduce", 5 * 4) in ops
        assert ("all_gather", 3 * n * 4) in ops       # nccl-tests size: the whole output
        assert ("reduce_scatter", 2 * n * 4) in ops   # nccl-tests size: the whole input
        assert ("all_reduce", 7 * 2) in ops           # bf16
        assert all(size == n and timed for op, nbytes, size, timed in r["log"] if op != "send" and op != "recv")


def test_bus_bandwidth_factors_follow_nccl_tests():
    assert comm.bus_factor("all_reduce", 4) == pytest.approx(2 * 3 / 4)
    assert comm.bus_factor("all_gather", 4) == pytest.approx(3 / 4)
    assert comm.bus_factor("reduce_scatter", 3) == pytest.approx(2 / 3)
    assert comm.bus_factor("broadcast", 8) == 1.0
    rec = comm.CommRecord("all_reduce", 4, bytes=1000, seconds=0.5)
    assert rec.algbw == 2000 and rec.busbw == pytest.approx(2000 * 1.5)
    assert rec.wire_bytes == pytest.approx(1500)


def test_log_summary_prints_deepspeed_columns(capsys):
    recs = [comm.CommRecord("all_reduce", 2, 4096, 0.001), comm.CommRecord("all_reduce", 2, 4096, 0.003)]
    comm.log_summary(recs)
    out = capsys.readouterr().out
    for col in ("Comm. Op", "Message Size", "Count", "Total Latency(ms)", "Avg Latency(ms)", "busbw"):
        assert col in out
    row = [line for line in out.splitlines() if line.startswith("all_reduce")][0]
    assert "4.0 KB" in row and " 2 " in row and "4.00" in row  # 2 calls, 4 ms in total
