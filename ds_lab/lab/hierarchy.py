"""Topology-aware all-reduce in the course (chapter 05): the flat ring and the hierarchical all-reduce
side by side on simulated nodes, with every record's link.

    results = ds_lab.launch(flat_vs_hierarchical, 4, 1_000_000, ranks_per_node=2)
"""
from __future__ import annotations

import statistics
import time

import torch

from ds_lab import comm
from ds_lab.comm import nodes
from ds_lab.comm.hierarchical import HierarchicalAllReduce


def _rows(mark) -> list:
    return [dict(op=r.op, bytes=r.bytes, group_size=r.group_size, link=r.link, wire_bytes=r.wire_bytes)
            for r in comm.get_log(since=mark)]


def flat_vs_hierarchical(numel: int, repeats: int = 5, seed: int = 0) -> dict:
    """All-reduce the same `numel` fp32 elements flat and hierarchically; return both sums (equal up
    to summation order), each one's records (op, bytes, group, link, wire) and median seconds."""
    rank = comm.get_rank()
    hierarchy = HierarchicalAllReduce()  # collective: every rank builds every intra and rail group
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed + rank))
    out = {}
    for name, reduce in (("flat", comm.all_reduce), ("hierarchical", hierarchy.all_reduce)):
        seconds = []
        for i in range(repeats):
            y = x.clone()
            comm.barrier()
            mark = comm.record_count()
            t0 = time.perf_counter()
            with comm.tag(name):
                reduce(y)
            seconds.append(time.perf_counter() - t0)
            if i == 0:
                out[name] = dict(result=y, records=[r for r in _rows(mark) if r["op"] != "barrier"])
        out[name]["seconds"] = statistics.median(seconds)
    out["node"] = nodes.node_of(rank)
    return out


def link_bytes(records, link: str) -> float:
    """Wire bytes of this rank's records over groups with this link ("intra" or "inter")."""
    return sum(r["wire_bytes"] for r in records if r["link"] == link)


PHASES = (("reduce_scatter", "intra", "1. reduce-scatter inside each node"),
          ("all_reduce", "inter", "2. all-reduce of 1/k between nodes"),
          ("all_gather", "intra", "3. all-gather inside each node"))


def draw_hierarchy(results: list, ranks_per_node: int, figsize=(12, 3.4)):
    """The hierarchical all-reduce of `flat_vs_hierarchical` on its nodes, one panel per phase: nodes
    as boxes, ranks as dots, each phase's partners joined (green inside a node, red across nodes)
    and labelled with what rank 0's log says that phase sent (wire bytes per rank)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    world = len(results)
    nodes = world // ranks_per_node
    records = {r["op"]: r for r in results[0]["hierarchical"]["records"]}
    fig, axes = plt.subplots(1, len(PHASES), figsize=figsize)
    for ax, (op, link, title) in zip(axes, PHASES):
        position = {rank: (rank // ranks_per_node * 3.0 + 0.6, ranks_per_node - 1 - rank % ranks_per_node)
                    for rank in range(world)}
        for node in range(nodes):
            ax.add_patch(FancyBboxPatch((node * 3.0, -0.5), 1.2, ranks_per_node, boxstyle="round,pad=0.05",
                                        fill=False, edgecolor="grey"))
            ax.text(node * 3.0 + 0.6, ranks_per_node - 0.3, f"node {node}", ha="center", color="grey")
        for rank, (x, y) in position.items():
            ax.plot(x, y, "o", color="black")
            ax.text(x, y + 0.15, f"rank {rank}", ha="center", va="bottom", fontsize=8)
        for a in range(world):
            for b in range(a + 1, world):
                same_node = a // ranks_per_node == b // ranks_per_node
                same_rail = a % ranks_per_node == b % ranks_per_node
                if (link == "intra" and same_node) or (link == "inter" and same_rail and not same_node):
                    (xa, ya), (xb, yb) = position[a], position[b]
                    ax.plot([xa, xb], [ya, yb], color="tab:green" if link == "intra" else "tab:red", lw=2)
        rec = records.get(op)
        label = f"{rec['wire_bytes']:,.0f} B sent per rank ({link})" if rec else "not run"
        ax.set_title(f"{title}\n{label}", fontsize=9)
        ax.set_xlim(-0.5, nodes * 3.0 - 1.3), ax.set_ylim(-0.9, ranks_per_node + 0.1), ax.axis("off")
    fig.tight_layout()
    return fig
