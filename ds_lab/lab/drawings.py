"""Pictures of model parallelism that need no training run: pipeline Gantt charts and the process grid.

    draw_gantt(ax, spans_per_stage, "1F1B, P=4, m=8")   # one row per stage, a box per forward/backward
    draw_topology(ProcessTopology(pipe=2, data=2, model=2))   # every rank's coordinates and groups

matplotlib is imported when a function draws (ds_lab.lab itself does not need it).

A Gantt row is a list of spans (kind, micro_batch, chunk, t0, t1), kind "forward"/"backward" (or
"F"/"B"), the format of the pipeline engine's `engine.timeline`; `planned_spans` turns the simulation
of schedules as data (`ds_lab.pipe.timeline`) into the same format, so planned and measured charts
are drawn by one function.
"""
from __future__ import annotations

from ds_lab.comm.topology import AXES

KIND = {"F": "forward", "B": "backward"}
SPAN_COLORS = {"forward": "#4C72B0", "backward": "#DD8452"}  # the dashboard's colours (monitor/plots.py)
AXIS_COLORS = {"pipe": "#55A868", "data": "#8172B3", "model": "#C44E52"}


def planned_spans(slots: list) -> list:
    """`ds_lab.pipe.timeline(schedules)` (per stage: (start, end, "F"|"B", micro_batch, chunk)) as Gantt rows."""
    return [[(KIND[kind], mb, chunk, start, end) for start, end, kind, mb, chunk in stage] for stage in slots]


def compute_spans(spans_per_stage: list) -> list:
    """Keep the forward and backward spans (the engine's timeline also has reduce and step spans)."""
    return [[s for s in stage if KIND.get(s[0], s[0]) in SPAN_COLORS] for stage in spans_per_stage]


def draw_gantt(ax, spans_per_stage: list, title: str = "", chunks: int = 1) -> float:
    """One row per stage (stage 0 on top), one box per forward (blue) or backward (orange), labelled
    with its micro-batch; time from the first start. With chunks > 1 (interleaved), lighter boxes
    are the later chunks of a stage. Returns the chart's duration (to align charts on shared axes)."""
    rows = compute_spans(spans_per_stage)
    begin = min(s[3] for row in rows for s in row)
    for stage, row in enumerate(rows):
        y = len(rows) - 1 - stage
        for kind, mb, chunk, t0, t1 in row:
            kind = KIND.get(kind, kind)
            alpha = 1.0 if chunks == 1 or (chunk or 0) < len(rows) else 0.55
            ax.broken_barh([(t0 - begin, t1 - t0)], (y - 0.4, 0.8), facecolors=SPAN_COLORS[kind], alpha=alpha,
                           edgecolor="white", linewidth=0.5)
            ax.text(t0 - begin + (t1 - t0) / 2, y, str(mb), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(rows)), [f"stage {s}" for s in reversed(range(len(rows)))])
    ax.set_title(title, fontsize=10)
    duration = max(s[4] for row in rows for s in row) - begin
    ax.set_xlim(0, duration)
    return duration


def gantt_legend(fig) -> None:
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=c, label=k) for k, c in SPAN_COLORS.items()], loc="upper right", ncol=2,
               fontsize=8)


def _layout(topology):
    """Where rank r sits: stages left to right, data replicas top to bottom, tensor ranks side by side
    and a little lower each, so that a line between two stages passes no other rank."""
    places = {}
    model = topology.get_dim("model")
    for rank in range(topology.world_size):
        c = topology.get_coord(rank)
        x = c["pipe"] * (model + 0.8) + c["model"]
        y = -c["data"] * (1.0 + 0.55 * model) - 0.55 * c["model"]
        places[rank] = (x, y)
    return places


def draw_topology(topology, figsize=(12, 3.6)):
    """Three panels, one per axis of the grid (pipe, data, model), each with every rank as a box
    labelled "rank r (p, d, t)" and that axis's groups drawn in colour (outlines; arrows along the
    pipe): the ranks that differ only on that axis. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    fig, axes = plt.subplots(1, 3, figsize=figsize)
    places = _layout(topology)
    for ax, axis in zip(axes, AXES):
        for rank, (x, y) in places.items():
            c = topology.get_coord(rank)
            ax.add_patch(FancyBboxPatch((x - 0.4, y - 0.35), 0.8, 0.7, boxstyle="round,pad=0.02",
                                        facecolor="#f2f2f2", edgecolor="black", linewidth=0.8))
            ax.text(x, y + 0.1, f"rank {rank}", ha="center", va="center", fontsize=9, weight="bold")
            ax.text(x, y - 0.15, f"({c['pipe']}, {c['data']}, {c['model']})", ha="center", va="center", fontsize=8)
        for i, ranks in enumerate(topology.axis_groups(axis)):
            if axis == "pipe":  # a pipe group is a chain: activations flow stage to stage
                for a, b in zip(ranks, ranks[1:]):
                    ax.annotate("", places[b], places[a], arrowprops=dict(arrowstyle="-|>", color=AXIS_COLORS[axis],
                                                                          lw=2, shrinkA=24, shrinkB=24))
                continue
            xs, ys = zip(*(places[r] for r in ranks))  # a data or model group: an outline around it
            pad = 0.5
            ax.add_patch(FancyBboxPatch((min(xs) - pad, min(ys) - 0.45), max(xs) - min(xs) + 2 * pad,
                                        max(ys) - min(ys) + 0.9, boxstyle="round,pad=0.02",
                                        facecolor="none", edgecolor=AXIS_COLORS[axis], linewidth=2,
                                        linestyle="-" if i % 2 == 0 else "--"))
        xs, ys = zip(*places.values())
        ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
        ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
        ax.set_aspect("equal")
        ax.axis("off")
        groups = topology.axis_groups(axis)
        ax.set_title(f"{axis} groups ({len(groups)} of {len(groups[0])}): {groups}", fontsize=9,
                     color=AXIS_COLORS[axis])
    fig.suptitle(f"{topology}: rank (pipe, data, model)", fontsize=11)
    fig.tight_layout()
    return fig
