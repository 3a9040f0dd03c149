"""The live view of a run: every rank's events, collected in the notebook and drawn as four panels.

    dash = Dashboard("ZeRO-2 on 4 ranks")
    ds_lab.launch(train, world_size=4, dashboard=dash)  # redraws while it runs, finish() at the end
    dash.save_png("zero2.png")

By hand, the same is `launch(..., on_event=dash)` followed by `dash.finish()`.

While `launch` runs, each rank publishes events that reach the parent as (rank, kind, payload):

    memory  {"step", "phase", "time", "bytes": {category: int}, "peak"}  what the rank holds now; peak: the
                                                                         last step's largest bytes by category + total
    comm    {"op", "bytes", "wire_bytes", "group_size", "start", "seconds", "tag"}   one collective
    loss    {"step", "loss"}
    span    {"name", "category": "compute"|"comm", "start", "end", "step"}  for the timeline
    theory  {"memory": {category: bytes per rank}, "comm": {"per_step_bytes", "label"}}  from rank 0
    dropped {"count"}   events a rank dropped before sending them (its own buffer overflowed)

Times are `time.time()` seconds, a clock all ranks share. `EventStore` keeps them per rank and
bounded (the newest `max_records` of each kind per rank, counting what it drops; the comm totals
count every collective, dropped or not). `Dashboard` draws with `ds_lab.monitor.plots`.

Where it draws: in a Jupyter kernel, one image that is replaced in place (a display handle). When
a notebook is executed unattended (under pytest/nbval, or with DS_LAB_DASHBOARD=static in the
environment, e.g. for a book build) it only collects, and `finish()` shows the final picture once. Outside a kernel it
displays nothing; `finish()`, `figure()` and `save_png()` still draw. A bad event or a failed
redraw becomes a warning, never an exception: the dashboard must not stop a training run.
"""
from __future__ import annotations

import io
import math
import os
import threading
import time
import warnings
from collections import Counter, deque

PROTOCOL = {
    "memory": '{"step": int, "phase": str, "time": float, "bytes": {category: int}}',
    "comm": '{"op": str, "bytes": int, "wire_bytes": float, "group_size": int, "start": float, '
            '"seconds": float, "tag": str}',
    "loss": '{"step": int, "loss": float}',
    "span": '{"name": str, "category": "compute"|"comm", "start": float, "end": float, "step": int}',
    "theory": '{"memory": {category: bytes per rank}, "comm": {"per_step_bytes": float, "label": str}}',
    "dropped": '{"count": int}',
}


class EventStore:
    """Everything the ranks published, per rank. Callable, so it can be `on_event` by itself.

    memory[rank], comm[rank], spans[rank]: deques of payloads; loss[rank]: deque of (step, loss);
    comm_totals[rank][op]: {"calls", "bytes", "wire_bytes", "seconds"} over the whole run;
    theory: the merged "theory" payloads; t0: the earliest time seen; dropped / ignored: Counters
    by kind of records pushed out of a full deque / events of a kind this store does not know;
    lost[rank]: events the rank itself dropped before sending (its "dropped" event).
    """

    def __init__(self, max_records: int = 5000):
        if max_records < 1:
            raise ValueError(f"max_records={max_records}: keep at least 1 record per rank and kind")
        self.max_records = max_records
        self.memory, self.comm, self.loss, self.spans = {}, {}, {}, {}
        self.comm_totals: dict = {}
        self.theory: dict = {}
        self.t0: float | None = None
        self.events = 0
        self.dropped: Counter = Counter()
        self.ignored: Counter = Counter()
        self.lost: Counter = Counter()
        self._steps: dict = {}

    def __call__(self, rank, kind, payload) -> None:
        self.add(rank, kind, payload)

    def add(self, rank, kind, payload) -> None:
        """Record one event; a payload that breaks the protocol raises ValueError, recording nothing."""
        handler = getattr(self, f"_add_{kind}", None)
        if handler is None:
            self.ignored[kind] += 1
            return
        try:
            handler(int(rank), payload)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"malformed {kind!r} event from rank {rank}: {err!r} in {payload!r}; "
                             f"expected {PROTOCOL[kind]}") from err
        self.events += 1

    @property
    def ranks(self) -> list:
        return sorted(set(self.memory) | set(self.comm) | set(self.loss) | set(self.spans))

    def steps_done(self, rank) -> int:
        """How many distinct steps this rank has reported (in memory, loss or span events)."""
        return len(self._steps.get(rank, ()))

    # One method per kind: read every field first, then store, so a bad payload changes nothing.
    def _add_memory(self, rank, p):
        record = {"step": int(p["step"]), "phase": str(p["phase"]), "time": float(p["time"]),
                  "bytes": {str(c): int(b) for c, b in p["bytes"].items()},
                  "peak": {str(c): int(b) for c, b in (p.get("peak") or {}).items()}}
        self._append(self.memory, rank, record, "memory", record["step"], record["time"])

    def _add_comm(self, rank, p):
        record = {"op": str(p["op"]), "bytes": int(p["bytes"]), "wire_bytes": float(p["wire_bytes"]),
                  "group_size": int(p["group_size"]), "start": float(p["start"]),
                  "seconds": float(p["seconds"]), "tag": str(p.get("tag", ""))}
        self._append(self.comm, rank, record, "comm", None, record["start"])
        totals = self.comm_totals.setdefault(rank, {}).setdefault(
            record["op"], {"calls": 0, "bytes": 0, "wire_bytes": 0.0, "seconds": 0.0})
        totals["calls"] += 1
        for key in ("bytes", "wire_bytes", "seconds"):
            totals[key] += record[key]

    def _add_loss(self, rank, p):
        step, loss = int(p["step"]), float(p["loss"])
        self._append(self.loss, rank, (step, loss), "loss", step, None)

    def _add_span(self, rank, p):
        record = {"name": str(p["name"]), "category": str(p["category"]), "start": float(p["start"]),
                  "end": float(p["end"]), "step": int(p["step"])}
        if record["category"] not in ("compute", "comm"):
            raise ValueError(f"category {record['category']!r} is neither 'compute' nor 'comm'")
        self._append(self.spans, rank, record, "span", record["step"], record["start"])

    def _add_theory(self, rank, p):
        self.theory.update({key: dict(value) for key, value in p.items()})

    def _add_dropped(self, rank, p):
        self.lost[rank] += int(p["count"])

    def _append(self, table, rank, record, kind, step, when):
        records = table.setdefault(rank, deque(maxlen=self.max_records))
        if len(records) == records.maxlen:
            self.dropped[kind] += 1
        records.append(record)
        if step is not None:
            self._steps.setdefault(rank, set()).add(step)
        if when is not None:
            self.t0 = when if self.t0 is None else min(self.t0, when)


def _where() -> str:
    """'live' in an interactive Jupyter kernel, 'static' in a kernel run unattended, else 'headless'."""
    try:
        from IPython import get_ipython
    except ImportError:
        return "headless"
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return "headless"
    # nbclient gives a kernel no sign that nobody watches; pytest's variable reaches nbval's kernel.
    if os.environ.get("DS_LAB_DASHBOARD") == "static" or "PYTEST_CURRENT_TEST" in os.environ:
        return "static"
    return "live"


class Dashboard:
    """Pass as `on_event=` (it is called as dash(rank, kind, payload)); call `finish()` at the end.

    live: redraw while events arrive, at most `refresh_hz` times a second and at most 87% of the
    time (a redraw renders a PNG: about 0.1-0.5 s); None decides by where it runs (see the module
    docstring). `redraws` counts the figures drawn so far, `bad_events` the events dropped for
    breaking the protocol (the first of each kind is also a warning).
    """

    def __init__(self, title: str = "", refresh_hz: float = 3.0, theory: dict | None = None, *,
                 live: bool | None = None, last_steps: int = 3, max_records: int = 5000, dpi: int = 80):
        if not refresh_hz > 0:
            raise ValueError(f"refresh_hz={refresh_hz}: give a positive rate, e.g. 2.0 redraws a second")
        self.title, self.refresh_hz, self.theory = title, refresh_hz, theory
        self.last_steps, self.dpi = last_steps, dpi
        self.store = EventStore(max_records)
        where = _where()
        self.live = where == "live" if live is None else bool(live)
        self._in_kernel = where != "headless"
        self.redraws = 0
        self.bad_events = 0
        self._fig = None
        self._handle = None
        self._last_draw = -math.inf
        self._draw_seconds = 0.0
        self._drawn_events = -1
        self._lock = threading.RLock()
        self._warned: set = set()

    def __call__(self, rank, kind, payload) -> None:
        with self._lock:
            try:
                self.store.add(rank, kind, payload)
            except ValueError as err:
                self.bad_events += 1
                self._warn(err, key=f"bad {kind}")
                return
            # At most refresh_hz redraws a second (counted start to start), and never drawing more than
            # 87% of the time:
            # the parent also relays the ranks' events, and a rank blocks when its pipe is full.
            interval = max(1.0 / self.refresh_hz, 1.15 * self._draw_seconds)
            if self.live and time.monotonic() - self._last_draw >= interval:
                self._safely(self._draw, show=self._in_kernel, live=self.redraws > 0)

    def finish(self) -> None:
        """Draw the final state once (and show it, in a notebook)."""
        with self._lock:
            self._safely(self._draw, show=self._in_kernel)

    def figure(self):
        """The 2x2 matplotlib Figure of the current state (redrawn if events arrived since)."""
        with self._lock:
            if self._fig is None or self._drawn_events != self.store.events:
                self._draw(show=False)
            return self._fig

    def save_png(self, path, dpi: int = 100):
        """Write the four panels as a PNG; returns `path`."""
        self.figure().savefig(path, format="png", dpi=dpi)
        return path

    def _merged_theory(self) -> dict:
        return {**self.store.theory, **(self.theory or {})}  # an explicit theory= wins

    def _draw(self, show: bool, live: bool = False) -> None:
        from ds_lab.monitor import plots  # here, not at import: collecting needs no matplotlib

        started = time.monotonic()
        if self._fig is not None:
            # a live redraw keeps the panel positions of the previous draw (the layout solver is a
            # third of a redraw's cost); the final draw lays the figure out again
            self._fig.set_layout_engine("none" if live else "constrained")
        self._fig = plots.figure(self.store, self._merged_theory(), title=self.title,
                                 last_steps=self.last_steps, fig=self._fig)
        self.redraws += 1
        self._drawn_events = self.store.events
        if show:
            self._show()
        self._last_draw = started
        self._draw_seconds = time.monotonic() - started

    def _show(self) -> None:
        # A PNG in one display handle, updated in place: works in Jupyter, VS Code and under
        # nbclient (which keeps only the last update), independent of the matplotlib backend.
        from IPython.display import Image, display

        buffer = io.BytesIO()
        self._fig.savefig(buffer, format="png", dpi=self.dpi)
        image = Image(data=buffer.getvalue(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)

    def _safely(self, draw, **kwargs) -> None:
        try:
            draw(**kwargs)
        except ImportError as err:
            self._last_draw = math.inf  # nothing to draw with: stop trying, keep collecting
            self._warn(f"{err}; the dashboard draws with matplotlib: pip install matplotlib", key="import")
        except Exception as err:  # a drawing bug must not stop the run
            self._last_draw = time.monotonic()
            self._warn(f"redraw failed: {err!r}", key=f"draw {type(err).__name__}")

    def _warn(self, message, key: str) -> None:
        if key not in self._warned:  # once per kind of problem, not once per event
            self._warned.add(key)
            warnings.warn(f"Dashboard: {message} (events are still collected; later ones like it "
                          f"are counted, not shown)", RuntimeWarning, stacklevel=3)
