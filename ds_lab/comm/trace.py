"""What every collective leaves behind: one `CommRecord`, a running total, and DeepSpeed's table.

Each call through `ds_lab.comm` makes one record: the operation, the size of the group it ran in,
the message size in bytes, the seconds it took, and the two bandwidths that nccl-tests defines
(https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md):

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

Each record also names the `link` it ran over (`comm/nodes.py`): "intra" when every member of
its group is on one node, "inter" when the members are on different nodes (a point-to-point op:
when the two ranks are), "" when the whole job is one node. For a ring over an inter-node group
this is a label, not a byte count: the record's wire bytes are what *this* rank sends, and on a
ring laid over contiguous nodes only the ranks at a node boundary send theirs across it
(`comm/links.py` works out which bytes cross; `summarize(links=("inter",))` keeps the inter rows).

Memory stays bounded however long the run: the records themselves are kept in a window of the
most recent `RECENT_RECORDS` (`get_log()`), while every finished record is also added into one
total per (op, tag, message size, group size, caller, link) (`summarize()`), which is what DeepSpeed's
comms logger prints. A run of a million steps keeps a few hundred totals, not a million records.

`configure_logger(...)` takes the config's `comms_logger` section: `verbose` prints one line per
collective as it completes, `prof_all`/`prof_ops` choose which ops, and `debug` names the function
that called each collective ("all_reduce | [Caller Func: step]"), as DeepSpeed's logger does.
"""
from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ds_lab.units import format_bytes

RECENT_RECORDS = int(os.environ.get("DS_LAB_COMM_RECENT", 10_000))


@dataclass
class CommRecord:
    op: str
    group_size: int
    bytes: int
    seconds: Optional[float] = None  # None until an async op is waited on
    start: float = field(default_factory=time.time)  # wall clock (common across ranks)
    tag: str = ""
    caller: str = ""  # the function that issued it, when comms_logger.debug is on
    index: int = -1  # this process's collective number since the last reset_log()
    link: str = ""  # "intra" / "inter" node, "" on a one-node job (comm/nodes.py)

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

    @property
    def name(self) -> str:
        """The op as DeepSpeed's logger names it; with debug on, the caller is part of the name."""
        return f"{self.op} | [Caller Func: {self.caller}]" if self.caller else self.op


def bus_factor(op: str, n: int) -> float:
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


# ---- the log: a bounded window of records, and unbounded-run totals -----------------------------

_recent: collections.deque = collections.deque(maxlen=RECENT_RECORDS)
_totals: dict = {}  # every finished record since reset_log(), counted in by _add
_counter = itertools.count()
_next_index = 0
_lock = threading.Lock()  # an async op may finish in the backend's thread and in wait() at once
_tag: str = ""
_listeners: list = []  # callables(record) told about each record as it completes


@dataclass
class LoggerSettings:
    """The config's `comms_logger` section, as this process's log applies it."""

    enabled: bool = False
    verbose: bool = False
    prof_all: bool = True
    debug: bool = False
    prof_ops: list = field(default_factory=list)


_logger = LoggerSettings()


def configure_logger(enabled: bool = False, verbose: bool = False, prof_all: bool = True, debug: bool = False,
                     prof_ops=()) -> None:
    """Apply a `comms_logger` section (`configure_logger(**dataclasses.asdict(config.comms_logger))`).
    Records are always kept; `enabled` turns on what the section adds: verbose lines, caller names."""
    global _logger
    _logger = LoggerSettings(enabled, verbose, prof_all, debug, list(prof_ops))


def get_log(since: Optional[int] = None) -> list[CommRecord]:
    """The most recent records (at most RECENT_RECORDS), oldest first; with `since` (a value of
    `record_count()` taken earlier), only those issued after it."""
    records = list(_recent)
    if since is not None:
        records = [r for r in records if r.index >= since]
    return records


def record_count() -> int:
    """How many collectives this process issued since the last `reset_log()` (a mark for `get_log(since=)`)."""
    return _next_index


def reset_log() -> None:
    global _counter, _next_index
    with _lock:
        _recent.clear()
        _totals.clear()
        _counter, _next_index = itertools.count(), 0


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


def current_tag() -> str:
    """The `comm.tag` in force now ("" outside any): an op that finishes later keeps its issuer's tag."""
    return _tag


def _add(totals: dict, rec: CommRecord) -> None:
    """Count a finished record into `totals`: (op, tag, bytes, group size, caller, link) -> [count,
    seconds, algbw sum, busbw sum]."""
    total = totals.setdefault((rec.op, rec.tag, rec.bytes, rec.group_size, rec.caller, rec.link),
                              [0, 0.0, 0.0, 0.0])
    total[0] += 1
    total[1] += rec.seconds
    total[2] += rec.algbw
    total[3] += rec.busbw


def start_record(op: str, group_size: int, nbytes: int, caller_depth: int = 3, link: str = "") -> CommRecord:
    """A record for a collective about to be issued. `caller_depth`: frames from here up to the
    code that called the public collective (read only when comms_logger.debug is on)."""
    global _next_index
    caller = sys._getframe(caller_depth).f_code.co_name if _logger.enabled and _logger.debug else ""
    with _lock:
        index = next(_counter)
        _next_index = index + 1
        rec = CommRecord(op, group_size, int(nbytes), tag=_tag, caller=caller, index=index, link=link)
        _recent.append(rec)
    return rec


def finish_record(rec: CommRecord, t0: float) -> None:
    """The collective completed: time it, add it to the totals, tell the listeners (once)."""
    with _lock:
        if rec.seconds is not None:
            return
        rec.seconds = time.perf_counter() - t0
        _add(_totals, rec)
    if _logger.enabled and _logger.verbose and (_logger.prof_all or rec.op in _logger.prof_ops):
        print(f"[ds_lab] comm op: {rec.name} | time (ms): {rec.seconds * 1e3:.2f} | msg size: "
              f"{format_bytes(rec.bytes, binary=True)} | algbw (Gbps): {rec.algbw * 8 / 1e9:.2f} | "
              f"busbw (Gbps): {rec.busbw * 8 / 1e9:.2f}")
    for fn in list(_listeners):
        fn(rec)


# ---- the summary table -----------------------------------------------------------------------



def summarize(records=None, tags=None, links=None) -> list[dict]:
    """Totals by (op name, message size), as DeepSpeed's comms logger prints them: count, seconds,
    avg_seconds, mean algbw and busbw, and wire_bytes. Default: every collective since reset_log();
    or the given CommRecords. `tags`: only records made under these `comm.tag`s. `links`: only
    records over these links ("intra", "inter", "" for a one-node job), e.g. `links=("inter",)`."""
    if records is None:
        with _lock:
            totals = {key: list(value) for key, value in _totals.items()}
    else:
        totals = {}
        for rec in records:
            if rec.seconds is not None:
                _add(totals, rec)
    rows: dict = {}
    for (op, tag_, nbytes, group_size, caller, link), (count, seconds, algbw, busbw) in totals.items():
        if (tags is not None and tag_ not in tags) or (links is not None and link not in links):
            continue
        name = CommRecord(op, group_size, nbytes, caller=caller).name
        row = rows.setdefault((name, nbytes), dict(op=name, bytes=nbytes, count=0, seconds=0.0, algbw=0.0,
                                                   busbw=0.0, wire_bytes=0.0))
        row["count"] += count
        row["seconds"] += seconds
        row["algbw"] += algbw
        row["busbw"] += busbw
        row["wire_bytes"] += count * nbytes * bus_factor(op, group_size)
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
        lines.append(f"{row['op']:<16}{format_bytes(row['bytes'], binary=True):>14}{row['count']:>8}"
                     f"{row['seconds'] * 1e3:>19.2f}{row['avg_seconds'] * 1e3:>17.3f}"
                     f"{row['algbw'] * 8 / 1e9:>17.3f}{row['busbw'] * 8 / 1e9:>18.3f}")
    return "\n".join(lines)


def log_summary(records=None) -> None:
    """Print op, message size, count, total/avg latency, algbw and busbw, like DeepSpeed's.
    `records`: CommRecords (default: every collective since reset_log()) or rows already `summarize()`d."""
    if records and isinstance(records[0], dict):
        print(format_summary(records))
    else:
        print(format_summary(summarize(records)))
