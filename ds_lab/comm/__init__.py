"""The only door to torch.distributed: every collective goes through here and is recorded.

    from ds_lab import comm
    comm.init_distributed()                      # RANK/WORLD_SIZE from torchrun, or a world of one
    comm.all_reduce(grads, group=dp_group)       # runs, and leaves a record (comm/trace.py)
    comm.log_summary()                           # DeepSpeed's comms-logger table

Nothing else in ds_lab imports torch.distributed: process groups, stores, collectives and their
timeouts all pass here, so the record of what crossed the wire is complete, and a collective can
be swapped for a teaching version (a ring built from send/recv) in one place. What each record
holds (bytes, seconds, algbw and busbw as nccl-tests defines them), and how the log stays bounded
however long the run, is in `trace.py`.

An async op (`async_op=True`) is recorded when it is issued (its bytes are known then); its time
is filled in when it completes (a callback on the backend's future) or, for ops without a
future, when somebody waits on the returned handle. Recording never forces a sync.

Nodes: `new_group` remembers each group's global ranks (`group_ranks`), so every record names the
link it ran over, intra- or inter-node (`nodes.py`: nodes are torchrun's contiguous blocks of
LOCAL_WORLD_SIZE ranks). `comm.hierarchical.HierarchicalAllReduce` reduces within nodes first, with
the collectives here (so its bytes are in the log, link by link); `comm.links` prices records
with an alpha-beta model of both links. (They import this module, so it does not import them.)

Run: `python -m ds_lab.comm` prints the nccl-tests factors for n = 2..8.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
import time
import weakref
from typing import Callable, Optional

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: this torch module writes `group=WORLD` as its
# functions' defaults, so importing it later (torch's optimizers and compiler import it lazily) pins
# the world group of that moment -- and its backend threads -- in those defaults forever.
import torch.distributed.nn.functional  # noqa: F401

from ds_lab.comm import nodes
from ds_lab.comm.trace import (RECENT_RECORDS, CommRecord, add_listener, bus_factor, configure_logger,
                               finish_record, format_summary, get_log, log_summary, record_count,
                               remove_listener, reset_log, start_record, summarize, tag)

__all__ = ["CommRecord", "CollectiveTimeoutError", "ReduceOp", "RECENT_RECORDS", "add_listener", "all_gather",
           "all_reduce", "all_to_all", "barrier", "broadcast", "bus_factor", "configure_logger", "default_backend",
           "default_timeout", "destroy", "device", "format_summary", "get_backend", "get_global_rank", "get_log", "get_rank", "group_ranks",
           "forget_inherited", "get_world_size", "at_destroy", "init_distributed", "irecv", "is_initialized", "isend", "log_summary", "new_group",
           "record_count", "recv", "remove_listener", "reset_log", "send", "summarize", "tag", "tcp_store"]

ReduceOp = dist.ReduceOp

DEFAULT_TIMEOUT_S = 300.0  # a collective's deadline when nobody says: DS_LAB_COLLECTIVE_TIMEOUT overrides it
_timeout_s: Optional[float] = None  # the deadline of the current process group (named in timeout errors)


def default_timeout() -> float:
    """Seconds a collective may wait: DS_LAB_COLLECTIVE_TIMEOUT (or the older DS_LAB_COMM_TIMEOUT), else 300."""
    for name in ("DS_LAB_COLLECTIVE_TIMEOUT", "DS_LAB_COMM_TIMEOUT"):
        if os.environ.get(name):
            try:
                return float(os.environ[name])
            except ValueError:
                raise ValueError(f"{name}={os.environ[name]!r} is not a number of seconds (e.g. {name}=600)")
    return DEFAULT_TIMEOUT_S


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete in time: names the rank, the op and the group size."""


class Handle:
    """Wraps an async work handle: waiting records the op's time; errors name the op."""

    def __init__(self, work, rec: CommRecord, t0: float):
        self.work, self.rec, self.t0 = work, rec, t0

    def wait(self):
        _call(self.rec, lambda: self.work.wait())
        finish_record(self.rec, self.t0)
        # The backend's thread may still owe this op's done-callback (it needs the GIL, which we hold):
        # give it the GIL for a moment, so it lets go of the op's buffers now, not at some later time.
        deadline = time.perf_counter() + 0.05
        while getattr(self.rec, "callback_pending", False) and time.perf_counter() < deadline:
            time.sleep(0.0002)
        return True

    def is_completed(self) -> bool:
        return self.work.is_completed()


def _call(rec: CommRecord, thunk):
    try:
        return thunk()
    except RuntimeError as err:  # gloo/NCCL say "timed out" / "Timeout" in various forms
        if "imed out" in str(err) or "imeout" in str(err):
            raise CollectiveTimeoutError(
                f"rank {get_rank()}: {rec.op} ({rec.bytes} bytes, group of {rec.group_size}) did not complete "
                f"within the {_timeout_s or default_timeout():g} s timeout (init_distributed(timeout=...) or "
                f"DS_LAB_COLLECTIVE_TIMEOUT sets it); another rank probably never called it or died.\n{err}"
            ) from err
        raise


# The done-callbacks the backend's threads still hold. A callback runs Python in a gloo thread, and
# that thread takes the GIL once more to let go of it. A C++ thread that asks for the GIL after the
# interpreter began to finalize is ended by pthread_exit, which gloo's thread turns into an abort:
# "terminate called without an active exception". So each callback is watched by a weak reference
# whose own callback (`set.discard`, a builtin: no bytecode runs there, so the GIL cannot change hands)
# takes it off this set once the backend has let go of it; at exit we wait for the set to empty.
_live_callbacks: set = set()


def _run(op: str, nbytes: int, group, async_op: bool, thunk, peer: Optional[int] = None):
    rec = start_record(op, get_world_size(group), nbytes, link=_link(group, peer))
    t0 = time.perf_counter()
    work = _call(rec, thunk)
    if async_op:
        if op not in ("send", "recv"):  # gloo's point-to-point ops have no future: timed when waited on
            def done(_future, rec=rec, t0=t0):
                try:
                    finish_record(rec, t0)
                finally:
                    rec.callback_pending = False
            _live_callbacks.add(weakref.ref(done, _live_callbacks.discard))
            try:  # time the op when it completes, in the backend's thread: no sync forced here
                rec.callback_pending = True
                work.get_future().add_done_callback(done)
            except (RuntimeError, AttributeError):
                rec.callback_pending = False  # no future for this op on this backend: timed when waited on
        return Handle(work, rec, t0)
    finish_record(rec, t0)
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


# point-to-point: `tag` keeps independent streams between the same two ranks apart (a receive
# matches the oldest send from `src` with the same tag), e.g. activations and gradients of a pipeline
def send(tensor, dst, group=None, tag=0):
    return _run("send", _nbytes(tensor), group, False, lambda: dist.send(tensor, dst=dst, group=group, tag=tag), dst)


def recv(tensor, src, group=None, tag=0):
    return _run("recv", _nbytes(tensor), group, False, lambda: dist.recv(tensor, src=src, group=group, tag=tag), src)


def isend(tensor, dst, group=None, tag=0):
    return _run("send", _nbytes(tensor), group, True, lambda: dist.isend(tensor, dst=dst, group=group, tag=tag), dst)


def irecv(tensor, src, group=None, tag=0):
    return _run("recv", _nbytes(tensor), group, True, lambda: dist.irecv(tensor, src=src, group=group, tag=tag), src)


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


_group_ranks: dict = {}  # process group -> its members' global ranks, sorted (as torch numbers them)
_links: dict = {}  # process group (None: the world) -> "intra" / "inter" / "" (nodes.link_of)


def new_group(ranks):
    """A process group of these global ranks. Collective: every rank of the world calls it, for
    every group, in the same order (members or not)."""
    ranks = sorted(int(r) for r in ranks)
    group = dist.new_group(ranks=ranks)
    _group_ranks[group] = ranks
    return group


def group_ranks(group=None) -> list:
    """The global ranks of `group`'s members in group-rank order (None: the world)."""
    if group is None:
        return list(range(get_world_size()))
    if group not in _group_ranks:  # a group made outside new_group (torch's own, an mpu's)
        _group_ranks[group] = list(dist.get_process_group_ranks(group))
    return _group_ranks[group]


def _link(group, peer: Optional[int]) -> str:
    """The link a record ran over (nodes.link_of); a point-to-point op: between this rank and `peer`."""
    if not is_initialized():
        return ""
    if peer is not None:
        return nodes.link_of((get_rank(), peer), get_world_size())
    if group not in _links:
        _links[group] = nodes.link_of(group_ranks(group), get_world_size())
    return _links[group]


def default_backend() -> str:
    """NCCL when this process has a GPU of its own, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(dist_backend: Optional[str] = None, timeout: Optional[float] = None,
                     rank: Optional[int] = None, world_size: Optional[int] = None, store=None) -> None:
    """Initialise the default process group (DeepSpeed's `init_distributed`).

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment (torchrun sets them).
    With none set, this is a lone process: a world of size 1 on an in-memory store.
    timeout: seconds a collective may wait before it fails naming itself (default `default_timeout()`:
    300 s, or DS_LAB_COLLECTIVE_TIMEOUT), under launch, torchrun or a plain script alike.
    """
    if is_initialized():
        return
    _links.clear()  # a new job: LOCAL_WORLD_SIZE may have changed
    global _timeout_s
    backend = dist_backend or default_backend()
    _timeout_s = float(timeout or default_timeout())  # never "wait forever": a hang ends, and says so
    delta = datetime.timedelta(seconds=_timeout_s)
    if store is None and rank is None and "RANK" not in os.environ:
        store, rank, world_size = dist.HashStore(), 0, 1
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=delta)
    else:
        dist.init_process_group(backend, init_method="env://", timeout=delta)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", get_rank() % torch.cuda.device_count())))
    atexit.unregister(_destroy_at_exit)  # once, however often a job re-initialises
    atexit.register(_destroy_at_exit)  # a script that ends without destroy() must not leave gloo's threads


def _destroy_at_exit() -> None:
    """At interpreter exit, let the backend's threads run and let go of the done-callbacks they still
    hold (see `_live_callbacks`), then shut the process groups down while their threads can still be
    joined. Waits at most 10 s for the callbacks."""
    deadline = time.monotonic() + 10.0
    while _live_callbacks and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        destroy()
    except Exception:  # the job is over; a peer that already left must not turn a clean exit into an error
        pass


def tcp_store(host: str, port: int, world_size: int, is_master: bool, timeout: float):
    """A rendezvous store on host:port (the master rank hosts it), for `init_distributed(store=)`."""
    return dist.TCPStore(host, port, world_size, is_master=is_master, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout))


_destroy_hooks: list = []


def at_destroy(hook: Callable[[], None]) -> None:
    """Have `destroy()` call `hook()` first: a module that keeps process groups (the grid, a
    checkpointing mpu) lets go of them there. Registered once per hook."""
    if hook not in _destroy_hooks:
        _destroy_hooks.append(hook)


def destroy() -> None:
    """Shut every process group down (DeepSpeed's `destroy_process_group`). What ds_lab itself holds
    on to is dropped first (`at_destroy` hooks), so that the groups really end here and the backend
    joins its threads now, not while the interpreter finalizes (see `_live_callbacks`); a group the
    caller still holds lives on (a torch.distributed rule) until the caller lets go of it."""
    _group_ranks.clear(), _links.clear()
    for hook in list(_destroy_hooks):
        hook()
    if is_initialized():
        dist.destroy_process_group()
    _forget_stale_defaults()


def _forget_stale_defaults() -> None:
    """torch.distributed.nn.functional, if imported while a group existed, holds that world group in
    its functions' defaults: put torch's own default (None: the world of the day) back."""
    module = sys.modules.get("torch.distributed.nn.functional")
    for fn in vars(module).values() if module else ():
        defaults = getattr(fn, "__defaults__", None)
        if defaults and any(isinstance(d, dist.ProcessGroup) for d in defaults):
            fn.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in defaults)


_inherited: list = []  # process groups a forked child copied from its parent: kept, never shut down


def forget_inherited() -> None:
    """In a forked child: take the parent's process groups off torch.distributed's books *without*
    shutting them down. Their worker threads exist only in the parent, so a shutdown or a destructor
    here can wait for them forever; the objects are kept alive until the child exits instead."""
    if not is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d
    world = c10d._world
    _group_ranks.clear(), _links.clear()
    try:
        _inherited.extend(world.pg_map)
        c10d._update_default_pg(None)
        for books in ("pg_map", "pg_names", "pg_group_ranks", "pg_backend_config", "pg_to_tag", "tags_to_pg",
                      "pg_coalesce_state"):
            getattr(world, books, {}).clear()
        world.group_count = 0
        getattr(c10d, "_unregister_all_process_groups", lambda: None)()
    except AttributeError:  # another torch layout: fall back to the public call
        destroy()


def device() -> torch.device:
    """The device this rank computes on: its own GPU under NCCL, else the CPU."""
    if is_initialized() and get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
