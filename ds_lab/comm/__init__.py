"""The only door to torch.distributed: every collective goes through here and is recorded.

Each call appends one `CommRecord` to this process's log: the operation, the size of the group
it ran in, the message size in bytes, the seconds it took, and the two bandwidths that
nccl-tests defines (https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md):

    algbw = message bytes / seconds
    busbw = algbw x factor(op, n)     with n = the size of the group the op ran in
        all_reduce                   2(n-1)/n   (a ring sends every byte twice, less 1/n)
        all_gather, reduce_scatter,
        all_to_all                   (n-1)/n
        broadcast, send, recv           1

"Message bytes" is the nccl-tests size: the tensor of all_reduce/broadcast, the *full* output of
all_gather, the *full* input of reduce_scatter. `wire_bytes` = message bytes x factor is what one
rank sends under the ring algorithm; it is what the ZeRO paper calls 2Ψ (all-reduce) and Ψ
(reduce-scatter or all-gather) when the message is Ψ.

An async op (`async_op=True`) is recorded when it is issued (its bytes are known then); its time
is filled in when it completes (a callback on the backend's future) or, for ops without a
future, when somebody waits on the returned handle. Recording never forces a sync.

Run: `python -m ds_lab.comm` prints the nccl-tests factors for n = 2..8.
"""
from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp

DEFAULT_TIMEOUT_S = float(os.environ.get("DS_LAB_COMM_TIMEOUT", 300))


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete in time: names the rank, the op and the group size."""


@dataclass
class CommRecord:
    op: str
    group_size: int
    bytes: int
    seconds: Optional[float] = None  # None until an async op is waited on
    start: float = field(default_factory=time.time)  # wall clock (common across ranks)
    tag: str = ""

    @property
    def factor(self) -> float:
        return bus_factor(self.op, self.group_size)

    @property
    def wire_bytes(self) -> float:
        return self.bytes * self.factor

    @property
    def algbw(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0

    @property
    def busbw(self) -> float:
        return self.algbw * self.factor


def bus_factor(op: str, n: int) -> float:
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


_log: list[CommRecord] = []
_tag: str = ""
_listeners: list = []  # callables(record) told about each record as it completes


def get_log() -> list[CommRecord]:
    return _log


def reset_log() -> None:
    _log.clear()


def add_listener(fn) -> None:
    _listeners.append(fn)


def remove_listener(fn) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


class tag:
    """Context manager that labels the records made inside it (e.g. "grad_allreduce")."""

    def __init__(self, name: str):
        self.name, self.prev = name, ""

    def __enter__(self):
        global _tag
        self.prev, _tag = _tag, self.name
        return self

    def __exit__(self, *exc):
        global _tag
        _tag = self.prev


_finish_lock = threading.Lock()


def _finish(rec: CommRecord, t0: float) -> None:
    with _finish_lock:  # an async op may finish in the backend's thread and in wait() at once
        if rec.seconds is not None:
            return
        rec.seconds = time.perf_counter() - t0
    for fn in list(_listeners):
        fn(rec)


class Handle:
    """Wraps an async work handle: waiting records the op's time; errors name the op."""

    def __init__(self, work, rec: CommRecord, t0: float):
        self.work, self.rec, self.t0 = work, rec, t0

    def wait(self):
        _call(self.rec, lambda: self.work.wait())
        _finish(self.rec, self.t0)
        return True

    def is_completed(self) -> bool:
        return self.work.is_completed()


def _call(rec: CommRecord, thunk):
    try:
        return thunk()
    except RuntimeError as err:  # gloo/NCCL say "timed out" / "Timeout" in various forms
        if "imed out" in str(err) or "imeout" in str(err):
            raise CollectiveTimeoutError(
                f"rank {get_rank()}: {rec.op} ({rec.bytes} bytes, group of {rec.group_size}) did not "
                f"complete within the timeout; another rank probably never called it or died.\n{err}"
            ) from err
        raise


def _run(op: str, nbytes: int, group, async_op: bool, thunk):
    rec = CommRecord(op, get_world_size(group), int(nbytes), tag=_tag)
    _log.append(rec)
    t0 = time.perf_counter()
    work = _call(rec, thunk)
    if async_op:
        try:  # time the op when it completes, in the backend's thread: no sync forced here
            work.get_future().add_done_callback(lambda _: _finish(rec, t0))
        except (RuntimeError, AttributeError):
            pass  # no future for this op (e.g. gloo send/recv): timed when waited on
        return Handle(work, rec, t0)
    _finish(rec, t0)
    return None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- the collectives -------------------------------------------------------------------------

def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False):
    return _run("all_reduce", _nbytes(tensor), group, async_op,
                lambda: dist.all_reduce(tensor, op=op, group=group, async_op=async_op))


def broadcast(tensor, src, group=None, async_op=False):
    return _run("broadcast", _nbytes(tensor), group, async_op,
                lambda: dist.broadcast(tensor, src=src, group=group, async_op=async_op))


def all_gather(output, input, group=None, async_op=False):
    """Tensor form: `output` is the concatenation of every rank's `input` (rank order)."""
    return _run("all_gather", _nbytes(output), group, async_op,
                lambda: dist.all_gather_single(output, input, group=group, async_op=async_op))


def reduce_scatter(output, input, op=ReduceOp.SUM, group=None, async_op=False):
    """Tensor form: rank r receives the reduction of every rank's r-th chunk of `input`."""
    return _run("reduce_scatter", _nbytes(input), group, async_op,
                lambda: dist.reduce_scatter_single(output, input, op=op, group=group, async_op=async_op))


def all_to_all(output, input, group=None, async_op=False):
    return _run("all_to_all", _nbytes(input), group, async_op,
                lambda: dist.all_to_all_single(output, input, group=group, async_op=async_op))


def send(tensor, dst, group=None):
    return _run("send", _nbytes(tensor), group, False, lambda: dist.send(tensor, dst=dst, group=group))


def recv(tensor, src, group=None):
    return _run("recv", _nbytes(tensor), group, False, lambda: dist.recv(tensor, src=src, group=group))


def isend(tensor, dst, group=None):
    return _run("send", _nbytes(tensor), group, True, lambda: dist.isend(tensor, dst=dst, group=group))


def irecv(tensor, src, group=None):
    return _run("recv", _nbytes(tensor), group, True, lambda: dist.irecv(tensor, src=src, group=group))


def barrier(group=None):
    return _run("barrier", 0, group, False, lambda: dist.barrier(group=group))


# ---- process groups --------------------------------------------------------------------------

def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def get_backend(group=None) -> str:
    return dist.get_backend(group)


def get_global_rank(group, group_rank: int) -> int:
    """The global rank of `group`'s member number `group_rank` (group None: the world)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def new_group(ranks):
    return dist.new_group(ranks=list(ranks))


def default_backend() -> str:
    """NCCL when this process has a GPU of its own, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(dist_backend: Optional[str] = None, timeout: Optional[float] = None,
                     rank: Optional[int] = None, world_size: Optional[int] = None, store=None) -> None:
    """Initialise the default process group (DeepSpeed's `init_distributed`).

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment (torchrun sets them).
    With none set, this is a lone process: a world of size 1 on an in-memory store.
    """
    if is_initialized():
        return
    backend = dist_backend or default_backend()
    delta = datetime.timedelta(seconds=timeout or DEFAULT_TIMEOUT_S)
    if store is None and rank is None and "RANK" not in os.environ:
        store, rank, world_size = dist.HashStore(), 0, 1
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=delta)
    else:
        dist.init_process_group(backend, init_method="env://", timeout=delta)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", get_rank() % torch.cuda.device_count())))


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """The device this rank computes on: its own GPU under NCCL, else the CPU."""
    if is_initialized() and get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- the summary table -----------------------------------------------------------------------

def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summarize(records=None) -> list[dict]:
    """Aggregate records by (op, message size), as DeepSpeed's comms logger does."""
    rows: dict = {}
    for r in (records if records is not None else _log):
        if r.seconds is None:
            continue
        row = rows.setdefault((r.op, r.bytes), dict(op=r.op, bytes=r.bytes, count=0, seconds=0.0,
                                                     algbw=0.0, busbw=0.0))
        row["count"] += 1
        row["seconds"] += r.seconds
        row["algbw"] += r.algbw
        row["busbw"] += r.busbw
    out = []
    for row in rows.values():
        row["avg_seconds"] = row["seconds"] / row["count"]
        row["algbw"] /= row["count"]
        row["busbw"] /= row["count"]
        out.append(row)
    return sorted(out, key=lambda r: (r["op"], r["bytes"]))


def format_summary(rows=None) -> str:
    """The table of DeepSpeed's comms logger, from `summarize()` rows (default: this log's)."""
    header = f"{'Comm. Op':<16}{'Message Size':>14}{'Count':>8}{'Total Latency(ms)':>19}" \
             f"{'Avg Latency(ms)':>17}{'tput_avg (Gbps)':>17}{'busbw_avg (Gbps)':>18}"
    lines = [header]
    for row in (summarize() if rows is None else rows):
        lines.append(f"{row['op']:<16}{_human(row['bytes']):>14}{row['count']:>8}"
                     f"{row['seconds'] * 1e3:>19.2f}{row['avg_seconds'] * 1e3:>17.3f}"
                     f"{row['algbw'] * 8 / 1e9:>17.3f}{row['busbw'] * 8 / 1e9:>18.3f}")
    return "\n".join(lines)


def log_summary(records=None) -> None:
    """Print op, message size, count, total/avg latency, algbw and busbw, like DeepSpeed's.
    `records`: CommRecords (default: this process's log) or rows already `summarize()`d."""
    if records and isinstance(records[0], dict):
        print(format_summary(records))
    else:
        print(format_summary(summarize(records)))


if __name__ == "__main__":
    for n in range(2, 9):
        print(n, {op: round(bus_factor(op, n), 3) for op in ("all_reduce", "all_gather", "broadcast")})
