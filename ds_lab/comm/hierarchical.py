"""Topology-aware all-reduce: reduce inside each node first, cross nodes with 1/k of the message.

A group of N = m x k ranks, k on each of m nodes, all-reduces a message of S bytes (SUM) in three
collectives, each recorded by `ds_lab.comm` with its link:

    1. intra-node reduce-scatter    k ranks of a node      local rank j gets chunk j (S/k) summed over its node
    2. inter-node all-reduce        m ranks, one per node  the k "rails" (same local rank j) sum chunk j over nodes
    3. intra-node all-gather        k ranks of a node      every rank gets all k summed chunks

Only step 2 leaves the node, and every rank puts S/k on the inter-node network instead of S
(a flat ring: 2(N-1)/N x S per rank; here 2(m-1)/m x S/k, see `links.cross_node_bytes` for which
accounting gives 1/k and which does not). Uneven messages are padded with zeros to a multiple of k.

Falls back to one flat all-reduce when the group sits on one node (m = 1) or has one rank per
node (k = 1), or when its nodes hold different numbers of its ranks (no equal chunks then).

Building one is collective, as `comm.new_group` is: every rank of the world constructs it, for
every group, in the same order, members or not. `HierarchicalAllReduce.for_group(group)` does that
for the groups of one axis (e.g. every data-parallel group) and returns this rank's.
"""
from __future__ import annotations

import torch

from ds_lab import comm
from ds_lab.comm import nodes
from ds_lab.comm.trace import current_tag


_MAKE = object()  # HierarchicalAllReduce(flat_group=...) not given: make one when needed


class HierarchicalAllReduce:
    """`group_ranks`: global ranks (None: the world). `flat_group`: a process group over exactly
    these ranks to use for the flat fallback (default: the world's, or one made here, collectively)."""

    def __init__(self, group_ranks=None, flat_group=_MAKE):
        world = comm.get_world_size()
        self.ranks = sorted(int(r) for r in (range(world) if group_ranks is None else group_ranks))
        self.rank = comm.get_rank()
        layout = list(nodes.nodes_of(self.ranks, nodes.ranks_per_node(world)).values())
        self.nodes, self.per_node = len(layout), len(layout[0])
        self.flat = self.nodes == 1 or self.per_node == 1 or any(len(n) != self.per_node for n in layout)
        self.group = self.intra = self.inter = None
        self.local_index = -1
        if self.flat:
            if flat_group is _MAKE:  # the world is torch's default group: no new group for it
                flat_group = None if self.ranks == list(range(world)) else comm.new_group(self.ranks)
            self.group = flat_group
            return
        for node_ranks in layout:  # every rank creates every group, in this order
            group = comm.new_group(node_ranks)
            if self.rank in node_ranks:
                self.intra, self.local_index = group, node_ranks.index(self.rank)
        for j in range(self.per_node):  # rail j: local rank j of every node
            group = comm.new_group([node_ranks[j] for node_ranks in layout])
            if j == self.local_index:
                self.inter = group

    @classmethod
    def for_group(cls, group=None) -> "HierarchicalAllReduce":
        """This rank's instance for `group` (None: the world), built collectively for every group
        of the same kind: one all-gather tells each rank every other rank's group members."""
        mine = comm.group_ranks(group)
        world = comm.get_world_size()
        if group is None or len(mine) == world or nodes.ranks_per_node(world) >= world:
            return cls(mine, group)  # every rank asks for the same group, or all are flat: no exchange
        gathered = torch.empty(world * len(mine), dtype=torch.int64)
        with comm.tag("hierarchical_setup"):
            comm.all_gather(gathered, torch.tensor(mine, dtype=torch.int64))
        every = list(dict.fromkeys(tuple(row) for row in gathered.view(world, len(mine)).tolist()))
        built = [cls(ranks, group if list(ranks) == mine else None) for ranks in every]  # same order everywhere
        return next(h for h in built if h.rank in h.ranks)

    def __repr__(self):
        shape = "flat" if self.flat else f"{self.nodes} nodes x {self.per_node} ranks"
        return f"HierarchicalAllReduce(ranks={self.ranks}, {shape})"

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False):
        """Sum `tensor` (contiguous) over the group's ranks, in place, as `comm.all_reduce` does.
        async_op: the intra-node reduce-scatter is issued now; the inter-node all-reduce and the
        all-gather run when the returned handle is waited on (each waits for the one before)."""
        if self.rank not in self.ranks:
            raise ValueError(f"rank {self.rank} is not in {self}; call all_reduce on its members only")
        if self.flat:
            return comm.all_reduce(tensor, group=self.group, async_op=async_op)
        flat = tensor.view(-1)
        chunk = -(-flat.numel() // self.per_node)
        padded = flat if chunk * self.per_node == flat.numel() else \
            torch.cat([flat, flat.new_zeros(chunk * self.per_node - flat.numel())])
        piece = flat.new_empty(chunk)
        handle = comm.reduce_scatter(piece, padded, group=self.intra, async_op=async_op)
        pending = _Pending(self, flat, padded, piece, handle, current_tag())
        if async_op:
            return pending
        pending.wait()
        return None


class _Pending:
    """The rest of a hierarchical all-reduce after its reduce-scatter; runs under its issuer's tag."""

    def __init__(self, owner, flat, padded, piece, handle, tag):
        self.owner, self.flat, self.padded, self.piece = owner, flat, padded, piece
        self.handle, self.tag, self.done = handle, tag, False

    def wait(self) -> bool:
        if self.done:
            return True
        with comm.tag(self.tag):
            if self.handle is not None:
                self.handle.wait()
            comm.all_reduce(self.piece, group=self.owner.inter)
            comm.all_gather(self.padded, self.piece, group=self.owner.intra)
        if self.padded is not self.flat:
            self.flat.copy_(self.padded[:self.flat.numel()])
        self.done = True
        return True

    def is_completed(self) -> bool:
        return self.done


_world = None  # the world's instance, built on first use


def _forget_world() -> None:
    """comm.destroy's hook: the world's instance must not keep destroyed groups (and threads) alive."""
    global _world
    _world = None


comm.at_destroy(_forget_world)


def hierarchical_all_reduce(tensor: torch.Tensor, async_op: bool = False):
    """`comm.all_reduce(tensor)` over the whole world, hierarchically. Every rank must call it
    (the first call builds the groups, collectively); for a sub-group use `HierarchicalAllReduce`."""
    global _world
    stale = _world is None or _world.ranks != list(range(comm.get_world_size())) or \
        any(g is not None and g not in comm._group_ranks for g in (_world.group, _world.intra, _world.inter))
    if stale:  # first call, or a new job since (comm.destroy forgets every group)
        _world = HierarchicalAllReduce()
    return _world.all_reduce(tensor, async_op=async_op)
