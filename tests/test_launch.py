"""launch(): results in rank order, failures surfaced with tracebacks, hangs end, nothing leaks."""
import os
import subprocess
import sys
import textwrap
import time

import nbformat
import pytest
from nbclient import NotebookClient

import ds_lab
from ds_lab import RankError
from tests import workers


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _pids(folder):
    return [int(open(os.path.join(folder, f)).read()) for f in os.listdir(folder) if f.endswith(".pid")]


def test_launch_returns_results_in_rank_order(tmp_path):
    assert ds_lab.launch(workers.pid_file_worker, 3, str(tmp_path)) == [0, 1, 2]
    assert all(_dead(pid) for pid in _pids(tmp_path))


def test_a_rank_that_raises_surfaces_its_traceback_and_stops_the_others(tmp_path):
    with pytest.raises(RankError) as info:
        ds_lab.launch(workers.pid_file_worker, 3, str(tmp_path), fail_rank=1, hang_rank=2, timeout=60)
    err = info.value
    assert err.rank == 1
    assert "ValueError: boom from rank 1" in str(err)
    assert "pid_file_worker" in err.remote_traceback  # the real traceback, not just the message
    assert _pids(tmp_path) and all(_dead(pid) for pid in _pids(tmp_path))


def test_a_hung_collective_ends_with_a_timeout_naming_rank_and_op(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        ds_lab.launch(workers.pid_file_worker, 2, str(tmp_path), hang_rank=1, timeout=3)
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert info.value.rank == 0
    assert "CollectiveTimeoutError" in msg and "rank 0: all_reduce" in msg
    assert all(_dead(pid) for pid in _pids(tmp_path))


def test_prints_of_ranks_reach_the_caller(capfd):
    ds_lab.launch(workers.collectives_worker, 2)
    out = capfd.readouterr().out
    assert "rank 0 done" in out and "rank 1 done" in out


def test_a_function_defined_in_a_notebook_cell_runs_on_ranks(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent("""
        import torch, ds_lab
        from ds_lab import comm
        torch.randn(256, 256) @ torch.randn(256, 256)   # the parent has run multi-threaded ops
        def square_and_sum(x):
            t = torch.tensor([float(comm.get_rank() + x) ** 2])
            comm.all_reduce(t)
            return t.item()
        print("RESULT", ds_lab.launch(square_and_sum, 3, 1))
    """))]
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": os.getcwd()}}).execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert "RESULT [14.0, 14.0, 14.0]" in text  # 1 + 4 + 9


def test_under_torchrun_launch_runs_in_place(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import os, ds_lab, torch
        from ds_lab import comm
        def f():
            t = torch.ones(1)
            comm.all_reduce(t)
            return (comm.get_rank(), t.item())
        result = ds_lab.launch(f, 2)
        with open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"]), "w") as out:
            out.write(repr(result))  # one file per rank: their stdout lines may interleave
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)],
                          capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rank0").read_text() == "[(0, 2.0)]"
    assert (tmp_path / "rank1").read_text() == "[(1, 2.0)]"


def test_world_size_must_be_positive():
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        ds_lab.launch(workers.collectives_worker, 0)
