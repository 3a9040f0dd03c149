"""A ring all-reduce built from send/recv, for teaching: what a ring really puts on the wire, measured.

    from ds_lab.comm.ring import ring_all_reduce
    sent = ring_all_reduce(grads)        # in place, SUM; returns the bytes this rank really sent

The tensor is cut into N chunks (N = the group's size; the first numel % N chunks are one element
longer). Rank r sends to r+1 and receives from r-1, 2(N-1) times:

    reduce-scatter, step s = 0..N-2:  send chunk (r-s) mod N, receive chunk (r-s-1) mod N and add it in
                                      -> rank r now holds the whole sum of chunk (r+1) mod N
    all-gather,     step s = 0..N-2:  send chunk (r+1-s) mod N, receive chunk (r-s) mod N and keep it

So rank r sends every chunk but one in each pass: 2·numel − |chunk r+1| − |chunk r+2| elements, which is
2(N−1)/N · numel when N divides numel -- the "2Ψ" of the ZeRO paper. The count returned is not this
formula: it is the sum of the `send` records this call left in the comm log (tag "ring_all_reduce"),
so a test that compares it with the formula can fail. Elsewhere `wire_bytes` (trace.py) is the
ring-model figure, message bytes × 2(N−1)/N; this function is what proves that model.

Deadlock-free with blocking point-to-point ops: even ranks send then receive, odd ranks receive then
send, so on every link one side is already receiving. Empty chunks (numel < N) are skipped on both
sides. Slow (2(N−1) round trips of 1/N of the message, no overlap): use `comm.all_reduce` for work.
`ds_lab.comm` does not re-export this (that would be an import circle); import `ds_lab.comm.ring`.
"""
from __future__ import annotations

import torch

from ds_lab import comm

TAG = "ring_all_reduce"


def chunk_bounds(numel: int, world_size: int) -> list:
    """(start, stop) of each of the N chunks: the first numel % N are one element longer."""
    base, extra = divmod(numel, world_size)
    bounds, start = [], 0
    for index in range(world_size):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _exchange(send_slice, recv_buffer, rank, next_rank, prev_rank, group) -> None:
    """One ring step: send `send_slice` to the next rank, receive into `recv_buffer` from the previous."""
    def send():
        if send_slice.numel():
            comm.send(send_slice.contiguous(), next_rank, group=group)

    def recv():
        if recv_buffer.numel():
            comm.recv(recv_buffer, prev_rank, group=group)

    if rank % 2 == 0:
        send(), recv()
    else:
        recv(), send()


def ring_all_reduce(tensor: torch.Tensor, group=None) -> int:
    """Sum `tensor` over `group` in place with a ring of send/recv; return the bytes this rank sent."""
    world, rank = comm.get_world_size(group), comm.get_rank(group)
    if world == 1:
        return 0
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).clone()
    chunks = chunk_bounds(flat.numel(), world)
    next_rank = comm.get_global_rank(group, (rank + 1) % world)
    prev_rank = comm.get_global_rank(group, (rank - 1) % world)
    mark = comm.record_count()
    with comm.tag(TAG):
        for step in range(world - 1):  # reduce-scatter
            start, stop = chunks[(rank - step) % world]
            recv_start, recv_stop = chunks[(rank - step - 1) % world]
            incoming = torch.empty(recv_stop - recv_start, dtype=flat.dtype, device=flat.device)
            _exchange(flat[start:stop], incoming, rank, next_rank, prev_rank, group)
            flat[recv_start:recv_stop] += incoming
        for step in range(world - 1):  # all-gather
            start, stop = chunks[(rank + 1 - step) % world]
            recv_start, recv_stop = chunks[(rank - step) % world]
            incoming = torch.empty(recv_stop - recv_start, dtype=flat.dtype, device=flat.device)
            _exchange(flat[start:stop], incoming, rank, next_rank, prev_rank, group)
            flat[recv_start:recv_stop] = incoming
    if flat.data_ptr() != tensor.data_ptr():
        tensor.copy_(flat.view_as(tensor))
    return sum(r.bytes for r in comm.get_log(since=mark) if r.op == "send" and r.tag == TAG)
