"""The hardened launcher: ranks die with their parent, collectives have a deadline named in the error
(under launch and in a plain torchrun-style job), an abort is reported with the rank's last words,
the rendezvous port cannot be stolen, and the parent never initialises CUDA."""
import importlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ds_lab
from ds_lab import RankError, comm
from ds_lab import runner
from tests import runner_workers, workers

launch_module = importlib.import_module("ds_lab.launch")  # the module (ds_lab.launch is the function)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gone(pid: int) -> bool:
    """Dead, or a zombie nobody has reaped yet (it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


@pytest.mark.parametrize("how", ["pdeathsig", "watchdog"])
def test_ranks_die_when_the_parent_is_killed(tmp_path, how):
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import ds_lab, ds_lab.runner
        from tests import runner_workers
        if {how!r} == "watchdog":   # the fallback for systems without prctl: a thread polls getppid()
            ds_lab.runner._set_pdeathsig = lambda: False
        ds_lab.launch(runner_workers.sleep_forever, 2, {str(tmp_path)!r})
    """)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        t_end = time.monotonic() + 60
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < t_end:
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
    finally:
        parent.kill()  # SIGKILL: the parent gets no chance to stop its ranks
        parent.wait()
    t_end = time.monotonic() + 5
    while not all(_gone(pid) for pid in pids) and time.monotonic() < t_end:
        time.sleep(0.1)
    alive = [pid for pid in pids if not _gone(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived their parent"


def test_collectives_have_a_default_deadline_outside_launch(tmp_path):
    """Two processes of a torchrun-style job (RANK, WORLD_SIZE, MASTER_* set, no launch): rank 1 never
    joins the all_reduce; rank 0's ends within DS_LAB_COLLECTIVE_TIMEOUT, naming op and deadline."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time, torch
        from ds_lab import comm
        comm.init_distributed("gloo")      # no timeout given: the default applies
        if comm.get_rank() == 1:
            time.sleep(40)
            sys.exit(0)
        try:
            comm.all_reduce(torch.ones(1))
        except comm.CollectiveTimeoutError as err:
            print("TIMEOUT", str(err).splitlines()[0], flush=True)
            os._exit(0)
        os._exit(1)
    """))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    t0 = time.monotonic()
    try:
        for rank in (0, 1):
            env = dict(os.environ, PYTHONPATH=ROOT, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), DS_LAB_COLLECTIVE_TIMEOUT="4")
            procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True))
        out, _ = procs[0].communicate(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert "TIMEOUT rank 0: all_reduce (4 bytes, group of 2) did not complete within the 4 s timeout" in out, out
    assert "DS_LAB_COLLECTIVE_TIMEOUT" in out
    assert elapsed < 40  # well before rank 1 would have woken up


def test_default_timeout_reads_the_environment(monkeypatch):
    monkeypatch.delenv("DS_LAB_COLLECTIVE_TIMEOUT", raising=False)
    monkeypatch.delenv("DS_LAB_COMM_TIMEOUT", raising=False)
    assert comm.default_timeout() == 300
    monkeypatch.setenv("DS_LAB_COLLECTIVE_TIMEOUT", "12.5")
    assert comm.default_timeout() == 12.5
    monkeypatch.setenv("DS_LAB_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="DS_LAB_COLLECTIVE_TIMEOUT='soon' is not a number"):
        comm.default_timeout()


def test_launch_timeout_is_named_in_the_error():
    with pytest.raises(RankError) as info:
        ds_lab.launch(runner_workers.hang_in_all_reduce, 2, 3, timeout=3)
    assert info.value.rank == 0
    assert "all_reduce (4 bytes, group of 2) did not complete within the 3 s timeout" in str(info.value)


def test_an_aborted_rank_is_a_rank_error_with_its_last_words():
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        ds_lab.launch(runner_workers.abort_with_a_message, 2, 1, timeout=30)
    assert time.monotonic() - t0 < 30  # rank 0, asleep, is stopped at once
    err = info.value
    assert err.rank == 1
    msg = str(err)
    assert "killed by SIGABRT (exit code -6)" in msg and "NCCL aborts a rank this way" in msg
    assert "rank about to be aborted" in msg  # its last Python output
    assert "Watchdog caught collective operation timeout" in msg  # what C++ wrote to its fd 2


def test_a_taken_port_cannot_fail_the_run(monkeypatch):
    """Rank 0's store binds a port the OS picks at bind time: a port chosen by the parent earlier (and
    taken by somebody else since) is never used, so the run succeeds whatever listens there."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    monkeypatch.setattr(launch_module, "_free_port", lambda: taken, raising=False)
    try:
        ports = ds_lab.launch(runner_workers.master_port, 3)
    finally:
        squatter.close()
    assert len(set(ports)) == 1 and int(ports[0]) != taken and int(ports[0]) > 0


def test_the_parent_never_initialises_cuda(monkeypatch):
    parent = os.getpid()

    def forbidden(name):
        real = getattr(torch.cuda, name)

        def call(*args, **kwargs):
            if os.getpid() == parent:
                raise AssertionError(f"the parent called torch.cuda.{name}()")
            return real(*args, **kwargs)
        return call
    for name in ("init", "_lazy_init", "is_available", "device_count", "current_device"):
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    assert ds_lab.launch(workers.collectives_worker, 2) is not None
    assert not torch.cuda.is_initialized()
    # a CUDA build: GPUs are counted with NVML, or in a throw-away subprocess when NVML cannot say
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 4, raising=False)
    assert runner.gpu_count() == 4 and launch_module._default_backend(4) == "nccl"
    assert launch_module._default_backend(8) == "gloo"
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: -1, raising=False)
    monkeypatch.setattr(runner, "_gpu_count_in_subprocess", lambda: 2)
    assert runner.gpu_count() == 2
    assert not torch.cuda.is_initialized()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc (Linux)")
@pytest.mark.parametrize("variant", ["dropped", "held", "hierarchical", "late_import"])
def test_destroy_ends_the_backend_threads(variant):
    """comm.destroy() lets go of every process group ds_lab holds (the grid, the checkpointing mpu, the
    hierarchical all-reduce, torch.distributed.nn's defaults), so gloo joins its threads there and then,
    not while the interpreter finalizes: a backend thread that asks for the GIL then aborts the rank
    ("terminate called without an active exception")."""
    for before, after in ds_lab.launch(runner_workers.gloo_threads_after_destroy, 2, variant):
        assert "pt_gloo_runloop" in before and after == [], (before, after)


def test_the_backend_lets_go_of_every_done_callback():
    """Each async op's done-callback is watched until gloo's thread has let go of it (taking the GIL for
    the last time): the set empties, so the wait at exit (comm._destroy_at_exit) ends."""
    assert ds_lab.launch(runner_workers.done_callbacks_let_go, 2, 20) == [(20, 0), (20, 0)]
