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
