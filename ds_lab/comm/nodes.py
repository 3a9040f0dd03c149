"""Which node each rank is on: torchrun's contract, read from the environment.

    LOCAL_WORLD_SIZE = k            ranks per node (torchrun's --nproc-per-node; `launch(ranks_per_node=k)`)
    node_of(rank)    = rank // k    nodes are contiguous blocks of k global ranks
    LOCAL_RANK       = rank % k     (GROUP_RANK / NODE_RANK = rank // k)

torchrun numbers the ranks node by node, so "the same node" is a question about rank numbers only;
no host names are compared. With LOCAL_WORLD_SIZE unset, every rank of the job is on one node.

A process group is *intra*-node when all its members share a node and *inter*-node when they do not;
on a job that is one node the distinction is void and the link is "" (this is what
`CommRecord.link` records, see trace.py).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

INTRA, INTER, ONE_NODE = "intra", "inter", ""


def ranks_per_node(world_size: Optional[int] = None) -> int:
    """k = LOCAL_WORLD_SIZE; unset: the whole job (`world_size`, else WORLD_SIZE, else 1) is one node."""
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", 1))


def node_of(rank: int, per_node: Optional[int] = None) -> int:
    return rank // (per_node or ranks_per_node())


def nodes_of(ranks: Iterable[int], per_node: Optional[int] = None) -> dict:
    """{node: [its members of `ranks`, sorted]} in node order."""
    per_node = per_node or ranks_per_node()
    layout: dict = {}
    for rank in sorted(int(r) for r in ranks):
        layout.setdefault(node_of(rank, per_node), []).append(rank)
    return layout


def spans_nodes(ranks: Iterable[int], per_node: Optional[int] = None) -> bool:
    return len(nodes_of(ranks, per_node)) > 1


def link_of(ranks: Iterable[int], world_size: int) -> str:
    """"intra" / "inter" for a group with these global ranks; "" when the whole job is one node."""
    per_node = ranks_per_node(world_size)
    if per_node >= world_size:
        return ONE_NODE
    return INTER if spans_nodes(ranks, per_node) else INTRA
