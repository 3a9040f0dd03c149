"""Rank functions for tests/test_ring.py (importable, so launched ranks find them)."""
from __future__ import annotations

import torch

from ds_lab import comm
from ds_lab.comm.ring import ring_all_reduce


def ring_worker(sizes):
    """For each size: the ring's result and gloo's, on integers and on floats, and the bytes sent."""
    rank, out = comm.get_rank(), {}
    generator = torch.Generator().manual_seed(1234 + rank)
    for n in sizes:
        ints = torch.randint(-10**6, 10**6, (n,), generator=generator, dtype=torch.int64)
        floats = torch.randn(n, generator=generator)
        ring_ints, ring_floats = ints.clone(), floats.clone()
        comm.all_reduce(ints)
        comm.all_reduce(floats)
        mark = comm.record_count()
        sent_ints = ring_all_reduce(ring_ints)
        records = [(r.op, r.bytes, r.tag) for r in comm.get_log(since=mark)]
        sent_floats = ring_all_reduce(ring_floats)
        out[n] = dict(ints_equal=torch.equal(ints, ring_ints),
                      floats_close=torch.allclose(floats, ring_floats, rtol=1e-5, atol=1e-5),
                      sent_ints=sent_ints, sent_floats=sent_floats, records=records)
    return out


def ring_in_subgroup_worker(n):
    """The ring over a group of the odd ranks of a world of 4: ranks are group ranks, peers global."""
    group = comm.new_group([1, 3])
    rank = comm.get_rank()
    if rank % 2 == 0:
        return None
    tensor = torch.arange(n, dtype=torch.int64) * (rank + 1)
    sent = ring_all_reduce(tensor, group=group)
    return tensor.tolist(), sent
