"""Four panels that explain a distributed run at a glance, drawn from an `EventStore`.

    memory    what each rank holds, by category (its latest snapshot), beside the theory's bytes
    comm      bytes each rank sent, per collective, summed over the run, beside theory x steps
    loss      loss per rank per step
    timeline  per-rank Gantt chart of the last few steps: compute on one lane, communication on
              the lane under it, so a collective that overlaps backward is visible as overlap

Each `plot_*` function draws onto the matplotlib Axes it is given and returns it, so a chapter can
show one panel on its own; `figure` puts all four in a 2x2 Figure. Nothing here uses pyplot:
figures are plain `matplotlib.figure.Figure`s on the Agg canvas, so they work headless and are
freed when dropped (pyplot would keep every figure alive until it is closed).

`theory` is the dict rank 0 publishes as a "theory" event (and `Dashboard(theory=...)` takes):
{"memory": {category: bytes per rank}, "comm": {"per_step_bytes": float, "label": str}}. When it
is None the store's own theory is used. Theory is drawn beside the measurement, never mixed in.

Bytes use decimal units (1 KB = 1000 B), as the ZeRO paper and `ds_lab.units` count them.
"""
from __future__ import annotations

import zlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ds_lab import units

MEMORY_CATEGORIES = ("params", "grads", "master_params", "optimizer_states", "buffers", "activations")
MEMORY_COLORS = {"params": "#4C72B0", "grads": "#DD8452", "master_params": "#8172B3",
                 "optimizer_states": "#55A868", "buffers": "#937860", "activations": "#DA8BC3"}
# One colour per span name / collective, shared by the comm and timeline panels.
SPAN_COLORS = {"forward": "#4C72B0", "backward": "#DD8452", "step": "#55A868",
               "all_reduce": "#C44E52", "all_gather": "#8172B3", "reduce_scatter": "#CCB974",
               "broadcast": "#64B5CD", "reduce": "#E377C2", "send": "#7F7F7F", "recv": "#BCBD22"}
_SPARE_COLORS = ("#17BECF", "#9467BD", "#8C564B", "#2CA02C", "#FF7F0E", "#1F77B4", "#D62728")


def color_for(name: str, table: dict = SPAN_COLORS) -> str:
    """A fixed colour per name: names not in `table` get one picked by a stable hash, so a colour
    never changes between redraws."""
    return table.get(name) or _SPARE_COLORS[zlib.crc32(name.encode()) % len(_SPARE_COLORS)]


def byte_unit(nbytes: float) -> tuple[int, str]:
    """The largest decimal unit not above `nbytes`, for scaling an axis: 3e6 -> (10**6, "MB")."""
    return units.byte_unit(nbytes)


def human_bytes(nbytes: float) -> str:
    """3 significant figures, never scientific notation: 512 B, 1.50 KB, 12.3 MB, 123 MB."""
    return units.format_bytes(nbytes, significant=3)


def _theory(store, theory) -> dict:
    return (store.theory if theory is None else theory) or {}


def _empty(ax, message: str):
    ax.text(0.5, 0.5, message, ha="center", va="center", color="gray", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def plot_memory(ax, store, theory=None):
    """Stacked bars of each rank's latest memory snapshot by category; beside each, a hatched bar
    with the theory's bytes for the same categories."""
    ax.set_title("Memory held per rank (latest snapshot; dashed: the step's peak)")
    ranks = sorted(store.memory)
    if not ranks:
        return _empty(ax, "no memory events yet")
    snapshots = {rank: store.memory[rank][-1] for rank in ranks}
    expected = _theory(store, theory).get("memory") or {}
    seen = {c for snap in snapshots.values() for c, b in snap["bytes"].items() if b} | {
        c for c, b in expected.items() if b}
    categories = [c for c in MEMORY_CATEGORIES if c in seen] + sorted(seen - set(MEMORY_CATEGORIES))
    totals = [sum(snapshots[r]["bytes"].get(c, 0) for c in categories) for r in ranks]
    expected_total = sum(expected.get(c, 0) for c in categories)
    divisor, unit = byte_unit(max(totals + [expected_total]))
    width, offset = (0.38, 0.2) if expected else (0.6, 0.0)
    for i, rank in enumerate(ranks):
        measured_bottom = theory_bottom = 0.0
        for c in categories:
            color = color_for(c, MEMORY_COLORS)
            value = snapshots[rank]["bytes"].get(c, 0) / divisor
            ax.bar(i - offset, value, width, bottom=measured_bottom, color=color)
            measured_bottom += value
            if expected:
                value = expected.get(c, 0) / divisor
                ax.bar(i + offset, value, width, bottom=theory_bottom, facecolor=color, alpha=0.35,
                       edgecolor=color, hatch="//")
                theory_bottom += value
        peak = (snapshots[rank].get("peak") or {}).get("total", 0) / divisor
        if peak > measured_bottom:  # the step's peak (buckets, fp32 gradient copies) as an outline
            ax.bar(i - offset, peak, width, fill=False, linestyle="--", edgecolor="black", linewidth=0.8)
            ax.text(i - offset, peak, "peak " + human_bytes(peak * divisor), ha="center", va="bottom", fontsize=8)
        ax.text(i - offset, measured_bottom, human_bytes(totals[i]), ha="center", va="bottom", fontsize=8)
        if expected:
            ax.text(i + offset, theory_bottom, "theory\n" + human_bytes(expected_total), ha="center",
                    va="bottom", fontsize=8, style="italic")
    phases = {"step": "optimizer step"}
    labels = [f"rank {r}\nstep {snap['step']}, {phases.get(snap['phase'], snap['phase'])}"
              for r, snap in snapshots.items()]
    ax.set_xticks(range(len(ranks)), labels, fontsize=8)
    ax.set_ylabel(f"bytes on this rank ({unit})")
    peaks = [(snapshots[r].get("peak") or {}).get("total", 0) for r in ranks]
    ax.set_ylim(0, max(totals + peaks + [expected_total]) / divisor * 1.45 or 1)
    handles = [Patch(color=color_for(c, MEMORY_COLORS), label=c) for c in categories]
    if expected:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="theory"))
    ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=3, frameon=False)
    return ax


def plot_comm(ax, store, theory=None):
    """Bytes each rank sent over the whole run (ring algorithm), stacked by collective; a dashed
    line marks the theory's bytes per step x the steps that rank has run."""
    ax.set_title("Bytes sent per rank, by collective (cumulative)")
    ranks = sorted(store.comm_totals)
    if not ranks:
        return _empty(ax, "no collectives yet")
    sent = {r: {op: totals["wire_bytes"] for op, totals in store.comm_totals[r].items() if op != "recv"}
            for r in ranks}  # a point-to-point message is counted once, at its sender
    ops = sorted({op for r in ranks for op in sent[r]}, key=lambda op: -sum(sent[r].get(op, 0) for r in ranks))
    expected = _theory(store, theory).get("comm") or {}
    per_step = expected.get("per_step_bytes")
    expected_sent = {r: per_step * store.steps_done(r) for r in ranks} if per_step else {}
    peak = max([sum(sent[r].values()) for r in ranks] + list(expected_sent.values()))
    divisor, unit = byte_unit(peak)
    for i, rank in enumerate(ranks):
        bottom = 0.0
        for op in ops:
            value = sent[rank].get(op, 0) / divisor
            ax.bar(i, value, 0.6, bottom=bottom, color=color_for(op))
            bottom += value
        ax.text(i, bottom, human_bytes(sum(sent[rank].values())), ha="center", va="bottom", fontsize=8)
        if rank in expected_sent:
            ax.hlines(expected_sent[rank] / divisor, i - 0.4, i + 0.4, colors="black", linestyles="--", lw=1.5)
    ax.set_xticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_ylabel(f"bytes sent by this rank ({unit})")
    ax.set_ylim(0, peak / divisor * 1.35 or 1)
    handles = [Patch(color=color_for(op), label=op) for op in ops]
    if per_step:
        steps = sorted({store.steps_done(r) for r in ranks})
        times = f"{steps[0]} steps" if len(steps) == 1 else "steps run"
        label = expected.get("label") or "theory"
        handles.append(Line2D([], [], color="black", linestyle="--",
                              label=f"theory: {label}, {human_bytes(per_step)}/step x {times}"))
    ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=2, frameon=False)
    return ax


def plot_loss(ax, store):
    """Loss per rank per step: data-parallel ranks see different micro-batches, so their lines differ."""
    ax.set_title("Loss per rank")
    ranks = sorted(store.loss)
    if not ranks:
        return _empty(ax, "no loss events yet")
    for rank in ranks:
        steps, losses = zip(*store.loss[rank])
        ax.plot(steps, losses, marker="o", markersize=3, linewidth=1.2, label=f"rank {rank}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(ranks), 4), frameon=False)
    return ax


def plot_timeline(ax, store, last_steps: int = 3):
    """Gantt chart of the last `last_steps` steps: for each rank a compute lane (forward, backward,
    step) and, under it, a comm lane (one bar per collective). Time is counted from the run's
    first event."""
    spans = {r: list(s) for r, s in store.spans.items() if s}
    if not spans:
        ax.set_title("Timeline")
        return _empty(ax, "no spans yet")
    last = max(s["step"] for ranked in spans.values() for s in ranked)
    first = last - max(last_steps, 1) + 1
    spans = {r: [s for s in ranked if s["step"] >= first] for r, ranked in sorted(spans.items())}
    starts = [s["start"] for ranked in spans.values() for s in ranked]
    ends = [s["end"] for ranked in spans.values() for s in ranked]
    window = max(ends) - min(starts)
    scale, unit = (1.0, "s") if window >= 2.0 else (1e3, "ms")
    t0 = store.t0
    ax.set_title(f"Timeline, step {first}" + (f" to {last}" if last > first else ""))
    names, ticks, tick_labels = [], [], []
    for i, (rank, ranked) in enumerate(spans.items()):
        base = (len(spans) - 1 - i) * 2.6
        lanes = {"compute": base + 1.0, "comm": base}
        for category, y in lanes.items():
            by_name: dict = {}
            for s in ranked:
                if (s["category"] == "comm") == (category == "comm"):
                    by_name.setdefault(s["name"], []).append(
                        ((s["start"] - t0) * scale, max(s["end"] - s["start"], 0.0) * scale))
            for name, bars in by_name.items():
                ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=color_for(name), edgecolor="white",
                               linewidth=0.3)
                if name not in names:
                    names.append(name)
            ticks.append(y)
            tick_labels.append(f"rank {rank} {category}" if category == "compute" else "comm")
        if i:
            ax.axhline(base + 1.8, color="lightgray", linewidth=0.8)
    for step in range(first, last + 1):  # where each step begins, across all ranks
        step_starts = [s["start"] for ranked in spans.values() for s in ranked if s["step"] == step]
        if step_starts:
            x = (min(step_starts) - t0) * scale
            ax.axvline(x, color="gray", linestyle=":", linewidth=1)
            ax.text(x, 0.995, f" step {step}", transform=ax.get_xaxis_transform(), fontsize=8,
                    va="top", color="dimgray")
    ax.set_yticks(ticks, tick_labels, fontsize=8)
    ax.set_ylim(-0.7, (len(spans) - 1) * 2.6 + 2.0)  # headroom for the step labels
    ax.set_xlabel(f"time since the first event ({unit})")
    order = list(SPAN_COLORS)  # forward, backward, step, then the collectives
    names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
    ax.legend(handles=[Patch(color=color_for(n), label=n) for n in names], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return ax


def new_figure(figsize=(14, 9)) -> Figure:
    """An empty 2x2 Figure on the Agg canvas (no pyplot, no GUI)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots(2, 2)
    return fig


def figure(store, theory=None, *, title: str = "", last_steps: int = 3, fig: Figure | None = None) -> Figure:
    """The four panels in a 2x2 Figure. Pass the `fig` a previous call returned to redraw into it
    (cheaper than a new Figure, and nothing accumulates)."""
    fig = new_figure() if fig is None else fig
    memory_ax, comm_ax, loss_ax, timeline_ax = fig.axes[:4]
    for ax in (memory_ax, comm_ax, loss_ax, timeline_ax):
        ax.clear()
    plot_memory(memory_ax, store, theory)
    plot_comm(comm_ax, store, theory)
    plot_loss(loss_ax, store)
    plot_timeline(timeline_ax, store, last_steps)
    status = f"{len(store.ranks)} ranks, {store.events} events"
    if store.dropped:
        status += f", {sum(store.dropped.values())} oldest records not kept"
    if store.lost:
        status += f", {sum(store.lost.values())} events lost by the ranks (sent too fast)"
    fig.suptitle(f"{title}   [{status}]" if title else status, fontsize=11)
    return fig
