"""Run a function on N real processes, from a notebook cell, a script or a test.

    results = ds_lab.launch(train, 4, steps=10)     # -> [rank0_result, ..., rank3_result]

How it works
- The parent starts `world_size` child processes, each with its own pipe. Rank 0 hosts the
  rendezvous store on a port the OS picks as it binds, and sends it up its pipe; the parent
  forwards it to the others (no port is chosen and released first, for another program to take).
  Each child joins the process group (gloo on CPU; NCCL when every rank can have its own GPU),
  runs `fn(*args, **kwargs)`, and sends back its result, prints, events or traceback.
- Children are *forked* on CPU, so a function defined in a notebook cell just works (nothing has
  to be pickled). GNU OpenMP is not fork-safe: a child that inherits a parent which already ran
  multi-threaded torch ops and then starts a parallel region hangs. So each forked child runs
  `torch.set_num_threads(1)` first, which is also the right setting when ranks share a few
  cores. With NCCL the children are spawned (CUDA cannot be forked), and `fn` is pickled with
  cloudpickle when it is installed.
- A rank that raises makes `launch` raise `RankError` here, with that rank's traceback; the other
  ranks are stopped at once. A rank that dies without a word (a crash, a kill, NCCL's watchdog's
  SIGABRT) is a `RankError` naming the signal, with the rank's last output, C++'s fd 2 included.
  A collective that waits longer than `timeout` seconds raises in its rank, naming the rank, the
  op and the timeout (see `ds_lab.comm.CollectiveTimeoutError`).
- Nothing is left running: every exit path terminates, joins and closes, and the children die
  with the parent even when it is killed outright (a notebook kernel killed or restarted): see
  `runner.die_with_parent`. The parent never initialises CUDA (a parent that has touched CUDA
  cannot fork children that use it): `runner.gpu_count` asks NVML, or a throw-away subprocess.
- When the parent watches (`on_event`/`dashboard`), the ranks run at nice +5: on a laptop whose
  cores the ranks share with the notebook, the live dashboard gets the CPU first and keeps
  redrawing (set DS_LAB_NICE_RANKS=0 to keep equal priority).
- Simulated nodes: `launch(fn, 4, ranks_per_node=2)` tells each rank what torchrun would on
  two nodes of two: LOCAL_RANK = rank % 2, LOCAL_WORLD_SIZE = 2, GROUP_RANK = NODE_RANK = rank // 2.
  Every rank still runs on this machine; `ds_lab.comm` reads the node layout from these variables
  (`comm/nodes.py`), so records carry intra/inter-node links and the hierarchical all-reduce has
  nodes to be hierarchical over. Default: one node of `world_size` ranks.
- Under torchrun (RANK and WORLD_SIZE set), this process already is one rank: `fn` runs in
  place and the list holds this rank's result only; torchrun's LOCAL_* variables stand as they are.
"""
from __future__ import annotations

import collections
import importlib
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Optional

import torch

from ds_lab import comm
from ds_lab.monitor import events
from ds_lab.runner import die_with_parent, gpu_count

__all__ = ["launch", "RankError", "current_channel", "die_with_parent"]


class RankError(RuntimeError):
    """A rank of a launched job failed. `.rank` is which one; `.remote_traceback` its traceback."""

    def __init__(self, rank: int, remote_traceback: str, others: Optional[dict] = None):
        self.rank, self.remote_traceback, self.others = rank, remote_traceback, others or {}
        msg = f"rank {rank} failed:\n\n{remote_traceback.rstrip()}"
        for r, tb in sorted(self.others.items()):
            msg += f"\n\n(rank {r} also failed: {tb.strip().splitlines()[-1]})"
        super().__init__(msg)


# ---- the child side -------------------------------------------------------------------------

class _Channel:
    """The child's end of its pipe. Messages are (kind, rank, payload), pickled with plain pickle
    so tensors travel by value (torch's ForkingPickler would hand over shared-memory handles that
    die with the child)."""

    def __init__(self, conn, rank: int):
        self.conn, self.rank, self.lock = conn, rank, threading.Lock()

    def send(self, kind: str, payload) -> None:
        data = pickle.dumps((kind, self.rank, payload), protocol=pickle.HIGHEST_PROTOCOL)
        with self.lock:
            self.conn.send_bytes(data)


_channel: Optional[_Channel] = None


def current_channel() -> Optional[_Channel]:
    """The pipe to the parent, inside a launched rank; None elsewhere."""
    return _channel


class _Forward:
    """File-like object that forwards a child's prints to the parent (so they appear in the cell)."""

    def __init__(self, channel: _Channel, stream: str):
        self.channel, self.stream, self.pending = channel, stream, ""

    def write(self, text: str) -> int:
        # whole lines only, so prints of different ranks never interleave mid-line
        self.pending += text
        if "\n" in self.pending or "\r" in self.pending:
            cut = max(self.pending.rfind("\n"), self.pending.rfind("\r")) + 1
            self.channel.send(self.stream, self.pending[:cut])
            self.pending = self.pending[cut:]
        return len(text)

    def flush(self):
        if self.pending:
            self.channel.send(self.stream, self.pending)
            self.pending = ""

    def isatty(self):
        return False


def _await_port(conn, timeout: float) -> int:
    """A rank > 0 waits for rank 0's store port, forwarded by the parent down this pipe."""
    if not conn.poll(timeout):
        raise TimeoutError(f"no rendezvous port from rank 0 within {timeout:g} s (rank 0 failed to start?)")
    return pickle.loads(conn.recv_bytes())


def _child(rank, world_size, backend, timeout, conn, payload, threads, forked, want_events, per_node,
           parent_pid, fd2_path):
    global _channel
    die_with_parent(parent_pid)
    if fd2_path:  # C++ output (NCCL/gloo messages, an abort's last words) to a file the parent tails
        fd = os.open(fd2_path, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, 2)
        os.close(fd)
    _channel = _Channel(conn, rank)
    sys.stdout, sys.stderr = _Forward(_channel, "stdout"), _Forward(_channel, "stderr")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % per_node),
                      LOCAL_WORLD_SIZE=str(per_node), GROUP_RANK=str(rank // per_node),
                      NODE_RANK=str(rank // per_node), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(threads)
    if want_events and os.environ.get("DS_LAB_NICE_RANKS", "1") == "1":
        os.nice(5)  # a live dashboard in the parent gets the CPU first when ranks share its cores
    comm.reset_log()  # a forked child inherits the parent's log
    try:
        fn, args, kwargs = payload if forked else _loads_fn(payload)
        if comm.is_initialized():  # inherited across fork (e.g. the notebook ran initialize()):
            comm.forget_inherited()  # drop this process's copy (never shut down: the parent owns it)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        # rank 0 hosts the rendezvous store (the parent runs no store thread across the fork) on a
        # port the OS picks as it binds; the parent forwards it to the others
        if rank == 0:
            store = comm.tcp_store("127.0.0.1", 0, world_size, is_master=True, timeout=timeout)
            port = store.port
            _channel.send("port", port)
        else:
            port = _await_port(conn, timeout)
            store = comm.tcp_store("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        os.environ["MASTER_PORT"] = str(port)
        comm.init_distributed(backend, timeout=timeout, rank=rank, world_size=world_size, store=store)
        if want_events:
            events.start(_channel)
            comm.add_listener(events.comm_record)
        result = fn(*args, **kwargs)
        events.stop()
        sys.stdout.flush(), sys.stderr.flush()
        _channel.send("result", result)
    except BaseException:
        sys.stdout.flush(), sys.stderr.flush()
        _channel.send("error", traceback.format_exc())
        conn.close()
        os._exit(1)  # skip atexit hooks: a broken process group must not hang the exit
    finally:
        if _channel is not None and not conn.closed:
            try:
                comm.destroy()
            finally:
                conn.close()


def _dumps_fn(fn, args, kwargs) -> bytes:
    try:
        import cloudpickle
        return cloudpickle.dumps((fn, args, kwargs))
    except ImportError:
        return pickle.dumps((fn, args, kwargs))


def _loads_fn(payload: bytes):
    return pickle.loads(payload)


# ---- the parent side ------------------------------------------------------------------------

def _default_backend(world_size: int) -> str:
    return "nccl" if gpu_count() >= world_size else "gloo"


def _run_in_place(fn, world_size, args, kwargs, backend, timeout, ranks_per_node=None):
    env_world = int(os.environ["WORLD_SIZE"])
    if world_size is not None and world_size != env_world:
        raise ValueError(f"launch(world_size={world_size}) inside a job of WORLD_SIZE={env_world} "
                         f"(torchrun or a launched rank); pass world_size={env_world} or None")
    env_per_node = os.environ.get("LOCAL_WORLD_SIZE")
    if ranks_per_node is not None and env_per_node is not None and ranks_per_node != int(env_per_node):
        raise ValueError(f"launch(ranks_per_node={ranks_per_node}) inside a job of LOCAL_WORLD_SIZE="
                         f"{env_per_node} (torchrun's --nproc-per-node); pass {env_per_node} or None")
    owned = not comm.is_initialized()
    comm.init_distributed(backend, timeout=timeout)
    try:
        return [fn(*args, **kwargs)]
    finally:
        if owned:  # as in a launched rank: the group lives as long as fn (a gloo group left to the
            comm.destroy()  # interpreter's exit can abort the process)


def launch(fn: Callable, world_size: Optional[int], *args, backend: Optional[str] = None,
           timeout: Optional[float] = None, on_event: Optional[Callable] = None, dashboard=None,
           start_method: Optional[str] = None, deadline: Optional[float] = None,
           ranks_per_node: Optional[int] = None, **kwargs) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` ranks; return their results in rank order.

    backend: "gloo" or "nccl" (default: NCCL when there is a GPU per rank, else gloo).
    timeout: seconds a collective may wait before it fails (and names itself); default 120, or
        DS_LAB_COLLECTIVE_TIMEOUT when set.
    on_event: called as `on_event(rank, kind, payload)` for each event a rank publishes while it
        runs (see `ds_lab.monitor.events`).
    dashboard: a `ds_lab.monitor.Dashboard`, fed every event live; `dashboard.finish()` at the end.
    deadline: optional limit in seconds on the whole run; past it every rank is stopped.
    ranks_per_node: simulate nodes of this many ranks (LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK as
        torchrun sets them; must divide world_size). None: one node.
    """
    if timeout is None:
        timeout = comm.default_timeout() if os.environ.get("DS_LAB_COLLECTIVE_TIMEOUT") else 120.0
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _run_in_place(fn, world_size, args, kwargs, backend, timeout, ranks_per_node)
    if dashboard is not None:
        try:
            return launch(fn, world_size, *args, backend=backend, timeout=timeout,
                          on_event=_both(on_event, dashboard), start_method=start_method,
                          deadline=deadline, ranks_per_node=ranks_per_node, **kwargs)
        finally:
            dashboard.finish()
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    per_node = world_size if ranks_per_node is None else ranks_per_node
    if not isinstance(per_node, int) or per_node < 1 or world_size % per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node!r} must be a positive int that divides world_size="
                         f"{world_size} (nodes of equal size, as torchrun's --nproc-per-node makes them)")
    backend = backend or _default_backend(world_size)
    if start_method is None:
        cuda_used = backend == "nccl" or torch.cuda.is_initialized()
        start_method = "spawn" if cuda_used or "fork" not in mp.get_all_start_methods() else "fork"
    forked = start_method == "fork"
    if forked:
        # torch imports torch._dynamo lazily in the first Optimizer(); doing it once here saves every
        # forked rank seconds at each launch (children share the parent's loaded modules)
        importlib.import_module("torch._dynamo")
    ctx = mp.get_context(start_method)
    payload = (fn, args, kwargs) if forked else _dumps_fn(fn, args, kwargs)
    threads = 1 if forked else max(1, (os.cpu_count() or 1) // world_size)

    procs, conns = [], {}
    with tempfile.TemporaryDirectory(prefix="ds_lab-launch-") as folder:
        fd2 = [_Fd2(os.path.join(folder, f"rank{rank}.fd2")) for rank in range(world_size)]
        try:
            for rank in range(world_size):
                mine, theirs = ctx.Pipe(duplex=True)  # up: results, prints; down: the store's port
                p = ctx.Process(target=_child, name=f"ds_lab-rank{rank}", daemon=True,
                                args=(rank, world_size, backend, timeout, theirs, payload, threads, forked,
                                      on_event is not None, per_node, os.getpid(), fd2[rank].path))
                p.start()
                theirs.close()  # the parent keeps only its end: EOF means the child is gone
                procs.append(p)
                conns[mine] = rank
            return _collect(procs, conns, on_event, deadline, fd2)
        finally:
            _stop(procs)
            for c in conns:
                c.close()
            for f in fd2:
                f.pump()


class _Fd2:
    """A rank's file descriptor 2, as a file: copied to ours as it grows; its tail kept for errors."""

    def __init__(self, path: str):
        self.path, self.offset = path, 0
        self.tail = collections.deque(maxlen=10)
        open(path, "wb").close()

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        if data:
            self.offset += len(data)
            os.write(2, data)  # where the rank's fd 2 went before: our own fd 2
            self.tail.extend(data.decode(errors="replace").splitlines())


def _silent_death(rank, proc, last_lines, fd2) -> str:
    """What we know of a rank that exited without a result or a traceback: signal, last words."""
    code = proc.exitcode
    how = f"exit code {code}"
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            pass
    hint = (" NCCL aborts a rank this way when a collective times out or another rank failed"
            if code == -int(signal.SIGABRT) else "")
    text = f"rank {rank} exited ({how}) without a result or a traceback: it crashed or was killed.{hint}\n"
    if fd2 is not None:
        fd2.pump()
    lines = list(last_lines) + (list(fd2.tail) if fd2 is not None else [])
    if lines:
        text += "its last output:\n" + "\n".join("    " + line for line in lines) + "\n"
    return text


def _collect(procs, conns, on_event, deadline, fd2=None) -> list:
    world_size = len(procs)
    results, finished, errors = [None] * world_size, set(), {}
    last_lines = [collections.deque(maxlen=10) for _ in range(world_size)]
    open_conns = dict(conns)
    t_end = None if deadline is None else time.monotonic() + deadline
    while len(finished) < world_size and not errors:
        for conn in mp.connection.wait(list(open_conns), timeout=0.5):
            rank = open_conns[conn]
            try:
                kind, _, payload = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                del open_conns[conn]
                if rank not in finished and rank not in errors:
                    procs[rank].join(timeout=5)
                    errors[rank] = _silent_death(rank, procs[rank], last_lines[rank], fd2 and fd2[rank])
                continue
            if kind == "result":
                results[rank] = payload
                finished.add(rank)
            elif kind == "error":
                errors[rank] = payload
            elif kind == "port":  # rank 0's store is up: tell the others where
                for other, r in conns.items():
                    if r != rank:
                        try:
                            other.send_bytes(pickle.dumps(payload))
                        except OSError:
                            pass  # that rank is gone; its EOF reports it
            elif kind in ("stdout", "stderr"):
                stream = sys.stdout if kind == "stdout" else sys.stderr
                last_lines[rank].extend(payload.splitlines())
                stream.write(payload)
                if not payload.endswith("\n"):
                    stream.flush()  # a progress bar's "\r" line: show it now
            elif kind == "events" and on_event is not None:
                for event_kind, event in payload:
                    on_event(rank, event_kind, event)
        for f in fd2 or ():
            f.pump()
        if t_end is not None and time.monotonic() > t_end and not errors:
            errors[-1] = f"the job ran past its deadline of {deadline} s and was stopped\n"
    if errors:
        first = min(errors, key=lambda r: (r < 0, r))
        others = {r: tb for r, tb in errors.items() if r != first}
        if first < 0:
            raise TimeoutError(errors[first])
        raise RankError(first, errors[first], others)
    return results


def _both(first, second):
    if first is None:
        return second

    def call(rank, kind, payload):
        first(rank, kind, payload)
        second(rank, kind, payload)
    return call


def _stop(procs) -> None:
    """Terminate, then kill, then join every child still alive: nothing may be left running."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    t_end = time.monotonic() + 3
    for p in procs:
        p.join(timeout=max(0.0, t_end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
