"""The alpha-beta cost of an all-reduce, and two measurements that check it on real ranks.

A ring all-reduce of M bytes over N ranks takes 2(N-1) steps; in each, every rank sends M/N bytes
to its neighbour. With alpha the fixed cost of one step (latency: launch, synchronisation, the
link's round trip) and beta the link's bandwidth (bytes/s):

    t(M, N) = 2(N-1)·alpha  +  2(N-1)/N · M/beta
              latency term      bandwidth term
              grows with N      tends to 2M/beta: per-rank bytes hardly grow with N

Sending the same M bytes as k messages (one per tensor, or one per bucket) pays the latency term
k times and the bandwidth term once:

    t_k = k·2(N-1)·alpha + 2(N-1)/N · M/beta

    all_reduce_seconds(M, N, alpha, beta, messages=1)     the model
    data_parallel_step(...)                               per-rank compute vs the two terms, fixed global batch
    time_all_reduces(total_elements, message_counts)      rank function: M sent as k equal all-reduces
    fit_per_message(counts, seconds)                      least squares t = k·a + b on the measurement
    ring_against_gloo(numel)                              rank function: `ring_all_reduce` (counts the
                                                          bytes it really sends) beside gloo's all_reduce

The first measurement checks the shape of the model on gloo (loopback: the "link" is shared
memory, so alpha is mostly software overhead per call). The second measures the wire bytes that
`wire_bytes` elsewhere only derives (message bytes x 2(N-1)/N).
"""
from __future__ import annotations

import statistics
import time

import torch

from ds_lab import comm
from ds_lab.comm.links import ring_steps
from ds_lab.comm.ring import ring_all_reduce


def all_reduce_seconds(message_bytes: float, world_size: int, alpha: float, beta: float, messages: int = 1) -> float:
    """The alpha-beta time of all-reducing `message_bytes` in total, as `messages` equal messages."""
    steps = ring_steps("all_reduce", world_size)  # 2(N-1)
    return messages * steps * alpha + (steps / world_size) * message_bytes / beta if world_size > 1 else 0.0


def data_parallel_step(psi: float, tokens: float, world_size: int, messages: int, alpha: float, beta: float,
                       flops_per_second: float, grad_bytes_per_param: int = 2) -> dict:
    """Seconds per rank of one data-parallel step at a fixed global batch of `tokens`: compute
    (6·Ψ·tokens/N FLOPs, falls as 1/N) beside the all-reduce of the 2Ψ gradient bytes as
    `messages` messages, split into the latency and the bandwidth terms (neither falls with N)."""
    grad_bytes = grad_bytes_per_param * psi
    steps = ring_steps("all_reduce", world_size)
    return dict(compute=6 * psi * tokens / world_size / flops_per_second,
                latency=messages * steps * alpha,
                bandwidth=(steps / world_size) * grad_bytes / beta if world_size > 1 else 0.0)


def time_all_reduces(total_elements: int, message_counts, repeats: int = 7) -> dict:
    """Runs on every rank: for each k, all-reduce `total_elements` fp32 elements as k equal tensors,
    one after another; {k: the fastest of `repeats` timings} (a barrier before each). The fastest,
    not the median: on a shared machine other processes only ever add time."""
    out = {}
    for k in message_counts:
        tensors = [torch.ones(total_elements // k) for _ in range(k)]
        for tensor in tensors[:1]:
            comm.all_reduce(tensor)  # warm up this size's buffers
        seconds = []
        for _ in range(repeats):
            comm.barrier()
            start = time.perf_counter()
            for tensor in tensors:
                comm.all_reduce(tensor)
            seconds.append(time.perf_counter() - start)
        out[k] = min(seconds)
    return out


def fit_per_message(counts, seconds) -> tuple:
    """Least squares of t = k·a + b over the measured (k, t): (a per message, b the rest)."""
    mean_k, mean_t = statistics.fmean(counts), statistics.fmean(seconds)
    a = (sum((k - mean_k) * (t - mean_t) for k, t in zip(counts, seconds))
         / sum((k - mean_k) ** 2 for k in counts))
    return a, mean_t - a * mean_k


def ring_against_gloo(numel: int, seed: int = 0) -> dict:
    """Runs on every rank: the same fp32 tensor (whole numbers, so every order of addition gives
    the same sum) all-reduced by gloo and by `ring_all_reduce`; the bytes the ring really sent."""
    rank = comm.get_rank()
    generator = torch.Generator().manual_seed(seed + rank)
    values = torch.randint(-1000, 1000, (numel,), generator=generator).float()
    by_gloo, by_ring = values.clone(), values.clone()
    comm.all_reduce(by_gloo)
    sent = ring_all_reduce(by_ring)
    return dict(sent=sent, equal=torch.equal(by_gloo, by_ring), message=4 * numel,
                world_size=comm.get_world_size())
