"""Rank functions for the hierarchical all-reduce tests (importable, so launched ranks find them)."""
from __future__ import annotations

import os

import torch

from ds_lab import comm
from ds_lab.comm import links, nodes
from ds_lab.comm.hierarchical import HierarchicalAllReduce, hierarchical_all_reduce
from ds_lab.models import GPT, GPTConfig
from tests.engine_workers import init
from tests.workers import TINY, full_weights, train_step


def _records(since):
    return [(r.op, r.bytes, r.group_size, r.link, r.wire_bytes, r.tag) for r in comm.get_log(since=since)]


def allreduce_worker(sizes):
    """For each size: the flat all-reduce, the hierarchical one (sync and async), their records."""
    rank = comm.get_rank()
    hierarchy = HierarchicalAllReduce()
    out = dict(env={k: os.environ[k] for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK")},
               node=nodes.node_of(rank), flat_fallback=hierarchy.flat, cases={})
    generator = torch.Generator().manual_seed(rank)
    for n in sizes:
        # integers: every summation order gives the same float, so the two must agree bitwise
        ints = torch.randint(-1000, 1000, (n,), generator=generator).float()
        floats = torch.randn(n, generator=generator)
        flat_ints, flat_floats = ints.clone(), floats.clone()
        mark = comm.record_count()
        comm.all_reduce(flat_ints)
        flat_log = _records(mark)
        comm.all_reduce(flat_floats)
        mark = comm.record_count()
        with comm.tag("case"):
            hierarchy.all_reduce(ints)
        hier_log = _records(mark)
        handle = hierarchy.all_reduce(floats, async_op=True)
        handle.wait()
        world_ints = torch.full((n,), float(rank))
        hierarchical_all_reduce(world_ints)
        out["cases"][n] = dict(ints_equal=torch.equal(ints, flat_ints),
                               floats_diff=(floats - flat_floats).abs().max().item(),
                               world_fn=world_ints.tolist()[:3], flat_log=flat_log, hier_log=hier_log)
    inter_rows = comm.summarize(tags=("case",), links=("inter",))
    out["inter_rows"] = [(row["op"], row["bytes"], row["count"], row["wire_bytes"]) for row in inter_rows]
    # sub-groups: every rank builds every data-parallel-like group (one rank per node: flat fallback)
    pairs = [[0, 2], [1, 3]]
    groups = [comm.new_group(p) for p in pairs]
    mine = next(g for g, p in zip(groups, pairs) if rank in p)
    sub = HierarchicalAllReduce.for_group(mine)
    t = torch.full((5,), float(rank + 1))
    sub.all_reduce(t)
    out["sub"] = dict(flat=sub.flat, ranks=sub.ranks, value=t[0].item(), uses_given_group=sub.group is mine)
    return out


def env_worker():
    rank = comm.get_rank()
    t = torch.ones(3)
    mark = comm.record_count()
    comm.all_reduce(t)
    (rec,) = comm.get_log(since=mark)
    return dict(rank=rank, local_rank=os.environ["LOCAL_RANK"], per_node=nodes.ranks_per_node(),
                node=nodes.node_of(rank), link=rec.link, value=t[0].item())


def engine_worker(config_without_flag, batches):
    """The same training with the flag off, then on: losses, weights, the gradient records."""
    out = {}
    for flag in (False, True):
        torch.manual_seed(0)
        engine, *_ = init(GPT(GPTConfig(**TINY)), {**config_without_flag, "hierarchical_allreduce": flag})
        comm.reset_log()
        losses = [train_step(engine, batch) for batch in batches]
        grads = [r for r in comm.get_log() if r.tag == "grad_allreduce"]
        out[flag] = dict(losses=losses, weights=full_weights(engine), records=[(r.op, r.bytes, r.link) for r in grads],
                         inter_wire_bytes=links.inter_wire_bytes(grads),
                         num_parameters=engine.num_parameters())
    return out
