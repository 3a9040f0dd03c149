"""What crossing a node boundary costs: an alpha-beta model of two links, and the analytic bytes.

The alpha-beta model. A ring collective over n ranks runs in steps; in each step every rank sends
one chunk of message/n bytes to its neighbour, all at once, so the step lasts as long as its
slowest edge. With alpha the per-step latency and beta the bandwidth of that edge:

    t(record) = steps(op, n) x alpha + wire_bytes / beta        wire_bytes as `trace` counts them
        all_reduce                       steps 2(n-1)   (reduce-scatter, then all-gather)
        reduce_scatter, all_gather,
        all_to_all, broadcast            steps n-1
        send, recv                       steps 1
        barrier                          steps 2(n-1), no bytes

A record whose group spans nodes ("inter") pays the inter-node alpha and beta for all of it (its
ring has at least one edge over the network, and that edge sets the pace); "intra" and ""
(a one-node job) pay the intra-node ones. The model assumes one NIC per rank (a DGX: one
InfiniBand port per GPU), so the k rails of a hierarchical all-reduce run side by side, each at
the full inter-node beta. `estimate_seconds(records)` adds the records up, one after the other: a
projection of the communication time, not of the step (overlap with backward hides part of it).

Which bytes cross the node boundary (`cross_node_bytes`). N ranks, k per node, m = N/k nodes,
nodes are contiguous rank blocks, message S (the hierarchical one padded to a multiple of k):

    flat ring over ranks 0..N-1       every rank sends 2(N-1)/N x S to rank+1 (mod N); only the m
                                      ranks at a node's end (local rank k-1) send over the network
    hierarchical                      rail j (local rank j of each node) all-reduces S/k over a ring
                                      of m ranks, one per node: every rail edge crosses a boundary

                                          flat ring                 hierarchical       ratio
    message each rank puts on the net     S                         S/k                1/k exactly
    per rank, bytes sent over the net     2(N-1)/N x S              2(m-1)/m x S/k     (m-1)/(N-1) <= 1/k
      (max over ranks: the busiest NIC)
    whole job, bytes over the boundary    m x 2(N-1)/N x S          2(m-1) x S         k(m-1)/(N-1) -> 1
    per node, bytes out of the node       2(N-1)/N x S, one NIC     2(m-1)/m x S, k NICs

So "inter-node bytes are 1/k of the flat ring's" holds for the message size and (as an upper
bound, tending to 1/k as m grows) for the busiest NIC's bytes; it does *not* hold for the total
bytes that cross node boundaries, which are about the same (2(m-1)S against about 2mS): a
contiguous flat ring already crosses each boundary once. What the hierarchy buys is spreading
those bytes over k NICs per node instead of one, and 2(m-1) inter-node latency steps instead of
2(N-1). At m = 2, k = 2 (the tests): 1/2, 1/3 and 2/3.

In the comm log, a record's link says whether its group spans nodes; its wire bytes are what this
rank sent. For the hierarchical rails that is exactly the bytes over the network; for a flat ring
it is an upper bound (exact at the boundary ranks, zero crossing elsewhere): `inter_wire_bytes`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ds_lab.comm.nodes import INTER

_STEPS = {"all_reduce": lambda n: 2 * (n - 1), "barrier": lambda n: 2 * (n - 1), "send": lambda n: 1,
          "recv": lambda n: 1}


def ring_steps(op: str, n: int) -> int:
    if n <= 1:
        return 0
    return _STEPS.get(op, lambda n: n - 1)(n)


@dataclass(frozen=True)
class LinkModel:
    """Bandwidths in bytes/s (one direction), latencies in seconds per ring step."""

    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float

    def record_seconds(self, rec) -> float:
        inter = rec.link == INTER
        alpha = self.inter_latency if inter else self.intra_latency
        beta = self.inter_bandwidth if inter else self.intra_bandwidth
        return ring_steps(rec.op, rec.group_size) * alpha + rec.wire_bytes / beta

    def estimate_seconds(self, records) -> float:
        """Communication time of these records on this cluster, one after another (no overlap)."""
        return sum(self.record_seconds(rec) for rec in records)


# Bandwidths: vendor figures per direction. NVLink: A100 "600 GB/s" and H100 SXM "900 GB/s" are
# both directions together (NVIDIA A100 / H100 datasheets), so 300 and 450 GB/s one way. InfiniBand
# port rates: EDR 100 Gb/s, HDR 200 Gb/s, NDR 400 Gb/s (IBTA), i.e. 12.5, 25, 50 GB/s one way; DGX
# A100/H100 have one such port per GPU. Latencies are assumptions of the right order (a few
# microseconds per ring step over NVLink, more over the network), not measurements: put the
# figures of nccl-tests on your own cluster here before trusting a projection.
PRESETS = {
    "a100-nvlink+ib-edr100": LinkModel(300e9, 2e-6, 12.5e9, 5e-6),
    "a100-nvlink+ib-hdr200": LinkModel(300e9, 2e-6, 25e9, 5e-6),
    "h100-nvlink+ib-ndr400": LinkModel(450e9, 2e-6, 50e9, 5e-6),
}


def inter_wire_bytes(records) -> float:
    """The wire bytes of this rank's records over inter-node groups (see the module docstring)."""
    return sum(rec.wire_bytes for rec in records if rec.link == INTER)


def cross_node_bytes(numel: int, world_size: int, ranks_per_node: int, element_size: int = 4) -> dict:
    """The table above for one all-reduce of `numel` elements: {"flat": {...}, "hierarchical": {...}},
    each with "message", "per_rank", "total" (bytes; hierarchical padded to a multiple of k)."""
    n, k = world_size, ranks_per_node
    if n % k:
        raise ValueError(f"world_size {n} is not a multiple of ranks_per_node {k}")
    m = n // k
    flat_message = numel * element_size
    chunk = -(-numel // k) * element_size  # S/k after padding
    if m == 1:  # one node: nothing crosses
        return {"flat": dict(message=0, per_rank=0.0, total=0.0),
                "hierarchical": dict(message=0, per_rank=0.0, total=0.0)}
    flat_per_rank = flat_message * 2 * (n - 1) / n
    if k == 1:  # one rank per node: the hierarchy is the flat ring
        flat = dict(message=flat_message, per_rank=flat_per_rank, total=n * flat_per_rank)
        return {"flat": flat, "hierarchical": dict(flat)}
    hier_per_rank = chunk * 2 * (m - 1) / m
    return {"flat": dict(message=flat_message, per_rank=flat_per_rank, total=m * flat_per_rank),
            "hierarchical": dict(message=chunk, per_rank=hier_per_rank, total=n * hier_per_rank)}
