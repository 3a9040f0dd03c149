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


def _fake_collectives(count, nbytes=64, op="all_reduce"):
    """The bookkeeping of `count` collectives, without a process group: what grows with a run.
    (It stands where comm.all_reduce stands: it calls comm._run with a collective that does nothing.)"""
    for _ in range(count):
        comm._run(op, nbytes, None, False, lambda: None)


def test_the_log_stays_bounded_over_100k_collectives_and_the_totals_count_them_all():
    import tracemalloc

    comm.reset_log()
    tracemalloc.start()
    _fake_collectives(comm.RECENT_RECORDS + 1000)  # fill the window (with records traced from birth)
    before = tracemalloc.get_traced_memory()[0]
    _fake_collectives(100_000)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 100_000, f"100k collectives grew the log by {grown} bytes"  # a list of them: > 10 MB
    assert len(comm.get_log()) == comm.RECENT_RECORDS
    (row,) = comm.summarize()
    assert row["count"] == comm.RECENT_RECORDS + 101_000 and row["op"] == "all_reduce" and row["bytes"] == 64
    assert comm.record_count() == comm.RECENT_RECORDS + 101_000
    comm.reset_log()
    assert comm.get_log() == [] and comm.summarize() == [] and comm.record_count() == 0


def test_get_log_since_a_mark_returns_only_the_later_records():
    comm.reset_log()
    _fake_collectives(3)
    mark = comm.record_count()
    _fake_collectives(2, nbytes=8, op="broadcast")
    assert [(r.op, r.bytes) for r in comm.get_log(since=mark)] == [("broadcast", 8)] * 2
    comm.reset_log()


def test_summarize_filters_by_tag_and_counts_wire_bytes():
    comm.reset_log()
    with comm.tag("grad_allreduce"):
        _fake_collectives(2, nbytes=100)
    _fake_collectives(1, nbytes=100)
    (tagged,) = comm.summarize(tags={"grad_allreduce"})
    assert tagged["count"] == 2 and tagged["wire_bytes"] == 0.0  # a world of one sends nothing
    (everything,) = comm.summarize()
    assert everything["count"] == 3
    comm.reset_log()


def _caller_of_the_collective():
    _fake_collectives(1)


def test_comms_logger_debug_names_the_calling_function_like_deepspeed(capsys):
    comm.reset_log()
    comm.configure_logger(enabled=True, verbose=True, debug=True)
    try:
        _caller_of_the_collective()
    finally:
        comm.configure_logger()  # back to the defaults: logger off
    (record,) = comm.get_log()
    # _fake_collectives plays comm.all_reduce; the function that called it is the caller
    assert record.caller == "_caller_of_the_collective"
    assert comm.summarize()[0]["op"] == "all_reduce | [Caller Func: _caller_of_the_collective]"
    assert "[ds_lab] comm op: all_reduce | [Caller Func: _caller_of_the_collective] | time (ms):" in \
        capsys.readouterr().out
    _fake_collectives(1)
    assert comm.get_log()[-1].caller == ""  # debug off: no caller looked up
    comm.reset_log()


def test_verbose_prints_only_the_profiled_ops(capsys):
    comm.reset_log()
    comm.configure_logger(enabled=True, verbose=True, prof_all=False, prof_ops=["broadcast"])
    try:
        _fake_collectives(1, op="all_reduce")
        _fake_collectives(1, op="broadcast")
    finally:
        comm.configure_logger()
    out = capsys.readouterr().out
    assert "comm op: broadcast" in out and "comm op: all_reduce" not in out
    comm.reset_log()
