"""Rank -> parent event stream: what the dashboard draws while training runs.

Inside a rank started by `ds_lab.launch(..., on_event=...)` (or `dashboard=...`), the engine and
`ds_lab.comm` publish small events; the parent receives each as `on_event(rank, kind, payload)`.
Kinds and payloads (plain numbers and strings; times are `time.time()`, a clock all ranks share):

    memory  {"step", "phase": forward|backward|step, "time", "bytes": {category: bytes}}
    comm    {"op", "bytes", "wire_bytes", "group_size", "start", "seconds", "tag"}
    loss    {"step", "loss"}
    span    {"name", "category": compute|comm, "start", "end", "step"}
    dropped {"count"}                    (sent once at the end if the buffer ever overflowed)

Publishing never blocks training: events go into a bounded buffer that a background thread
drains into the pipe. If the parent reads too slowly and the buffer fills, the oldest events are
dropped and counted. `publish_seconds` accumulates the time spent inside `publish`, so the cost
of watching can itself be measured (tests hold it under 5% of step time).
"""
from __future__ import annotations

import collections
import threading
import time

MAX_PENDING = 10_000

_sender = None
publish_seconds = 0.0
current_step = 0  # the engine's optimizer step, stamped on comm spans


class _Sender:
    def __init__(self, channel, max_pending: int = MAX_PENDING):
        self.channel = channel
        self.pending = collections.deque()
        self.max_pending, self.dropped = max_pending, 0
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._drain, name="ds_lab-events", daemon=True)
        self.thread.start()

    def put(self, kind, payload) -> None:
        with self.cond:
            if len(self.pending) >= self.max_pending:
                self.pending.popleft()
                self.dropped += 1
            self.pending.append((kind, payload))
            self.cond.notify()

    def _drain(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if not self.pending and self.closed:
                    return
                batch = list(self.pending)
                self.pending.clear()
            self.channel.send("events", batch)  # may block while the parent is busy: only this thread waits

    def close(self) -> None:
        with self.cond:
            if self.dropped:
                self.pending.append(("dropped", {"count": self.dropped}))
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)


def start(channel) -> None:
    """Called by `launch` in each rank when the parent asked for events."""
    global _sender
    _sender = _Sender(channel)


def stop() -> None:
    """Flush what is pending (before the rank's result is sent)."""
    global _sender
    if _sender is not None:
        _sender.close()
        _sender = None


def set_step(step: int) -> None:
    """Stamp the collectives that follow with this step (the engine does it; hand-written loops may)."""
    global current_step
    current_step = step


def enabled() -> bool:
    return _sender is not None


def publish(kind: str, payload: dict) -> None:
    global publish_seconds
    if _sender is None:
        return
    t0 = time.perf_counter()
    _sender.put(kind, payload)
    publish_seconds += time.perf_counter() - t0


def span(name: str, category: str, start: float, end: float, step: int) -> None:
    if _sender is not None:
        publish("span", dict(name=name, category=category, start=start, end=end, step=step))


def comm_record(rec) -> None:
    """Listener for `ds_lab.comm`: one comm event and one comm span per completed collective."""
    if _sender is None:
        return
    end = rec.start + rec.seconds
    publish("comm", dict(op=rec.op, bytes=rec.bytes, wire_bytes=rec.wire_bytes, group_size=rec.group_size,
                         start=rec.start, seconds=rec.seconds, tag=rec.tag))
    publish("span", dict(name=rec.op, category="comm", start=rec.start, end=end, step=current_step))
