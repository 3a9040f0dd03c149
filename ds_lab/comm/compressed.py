"""The error-compensated 1-bit all-reduce of 1-bit Adam (Tang et al. 2021, arXiv 2102.02888), as
DeepSpeed ≤ 0.18 defined it (runtime/comm/nccl.py, compressed.py: `compressed_allreduce`).

Every rank holds a tensor x_r (1-bit Adam: its momentum); the result, identical on every rank,
approximates the average (1/N) sum_r x_r with one sign bit per element plus a few scales:

    worker r (all of x):           b = pad(x_r) + e_r                  e_r: worker error, kept
                                   s_r = ||b|| / sqrt(len(b))          one scale per rank
                                   e_r <- b - s_r * sign(b)            what the bits could not say
    all_to_all:                    chunk j of every worker's bits goes to rank j (the "server" of j)
    all_gather:                    the N worker scales
    server j (chunk j only):       c = sum_r (s_r / N) * sign(b_r)[j] + E_j     E_j: server error
                                   S_j = ||c|| / sqrt(len(c))
                                   E_j <- c - S_j * sign(c)
    all_gather:                    every server's bits and scale
    result:                        concat_j S_j * sign(c_j), cut back to len(x)

sign(0) = +1 (a bit cannot say 0). Each tensor is padded with zeros to a multiple of
N * lcm(N, 8), so that every rank's chunk is a whole number of bytes; padding, errors and scales
are per tensor (1-bit Adam compresses parameter by parameter).

Bits are packed 8 per byte, most significant bit first (numpy's `packbits` order): in torch on a
CPU, by kernels/sign_pack.cu on a GPU (`ds_lab.ops.sign_pack`, where the bit arithmetic lives).
`compressed_allreduce_many` compresses several tensors with one set of collectives (per-tensor
arithmetic, shared transport); the per-tensor bytes below add up.

Wire per rank for a tensor of n elements padded to P (message sizes as `comm.trace` counts them):
    all_to_all of the bits       P/8 bytes       x (N-1)/N on the wire
    all_gather of worker scales  4N bytes        x (N-1)/N
    all_gather of server bits    P/8 bytes       x (N-1)/N
    all_gather of server scales  4N bytes        x (N-1)/N
    = (N-1)/N * (P/4 + 8N) bytes, against (N-1)/N * 8n for the fp32 ring all-reduce it replaces:
    a ratio of P/(32 n) + N/n, i.e. 1/32 plus padding plus scales (`wire_bytes`).
"""
from __future__ import annotations

import math

import torch

from ds_lab import comm
from ds_lab.ops.sign_pack import pack_signs, pack_with_error, scale_of, signs, unpack_scaled, unpack_signs  # noqa: F401

def padded_length(n: int, world_size: int) -> int:
    """n rounded up to a multiple of N * lcm(N, 8): N chunks of whole bytes (DeepSpeed's rule)."""
    unit = world_size * (world_size * 8 // math.gcd(world_size, 8))
    return -(-n // unit) * unit


def wire_bytes(n: int, world_size: int) -> float:
    """Bytes one rank sends for one tensor of n elements (see the module docstring)."""
    if world_size == 1:
        return 0.0
    padded = padded_length(n, world_size)
    return (world_size - 1) / world_size * (padded / 4 + 8 * world_size)


def compressed_allreduce(x: torch.Tensor, worker_error: torch.Tensor, server_error: torch.Tensor,
                         group=None) -> torch.Tensor:
    """The average of x over the ranks of `group`, through 1-bit compression with error feedback.

    worker_error: float32, padded_length(x.numel(), N) elements; server_error: 1/N of that. Both are
    updated in place and must persist between calls (they carry what earlier rounds lost).
    Returns a new tensor of x's shape; x itself is not modified.
    """
    return compressed_allreduce_many([x], [worker_error], [server_error], group)[0]


def compressed_allreduce_many(xs: list, worker_errors: list, server_errors: list, group=None) -> list:
    """`compressed_allreduce` of several tensors at once: the arithmetic is per tensor (own padding,
    errors and scales, exactly as one call each), the transport is shared: one all_to_all and three
    all_gathers in all, instead of four per tensor (the same bytes, far fewer latencies)."""
    world = comm.get_world_size(group)
    device = xs[0].device
    bits, worker_scales = [], []
    for x, worker_error, server_error in zip(xs, worker_errors, server_errors):
        n, padded = x.numel(), worker_error.numel()
        if padded != padded_length(n, world) or server_error.numel() != padded // world:
            raise ValueError(f"error buffers of {padded} and {server_error.numel()} elements for a tensor of "
                             f"{n} on {world} ranks: need {padded_length(n, world)} and "
                             f"{padded_length(n, world) // world}")
        # ---- worker: compress all of x, keep what the bits could not say
        buffer = torch.zeros(padded, dtype=torch.float32, device=device)
        buffer[:n] = x.reshape(-1)
        buffer.add_(worker_error)
        packed, scale = pack_with_error(buffer, worker_error)  # e <- b - s sign(b); a kernel on a GPU
        bits.append(packed.reshape(world, -1))  # row j: the chunk server j averages
        worker_scales.append(scale)
    widths = [b.shape[1] for b in bits]
    send = torch.cat(bits, dim=1)  # row j, for rank j: every tensor's chunk j
    received = torch.empty_like(send)  # row r, from rank r: every tensor's chunk of this rank
    scales = torch.empty(world, len(xs), dtype=torch.float32, device=device)
    with comm.tag("compressed_allreduce"):
        comm.all_to_all(received.view(-1), send.view(-1), group=group)
        comm.all_gather(scales.view(-1), torch.cat(worker_scales), group=group)
    # ---- server: average this rank's chunk of every worker's signs, compress again
    server_bits, server_scale_list, offset = [], [], 0
    for i, (width, server_error) in enumerate(zip(widths, server_errors)):
        chunk = unpack_signs(received[:, offset:offset + width]).reshape(world, -1)
        averaged = chunk.mul_(scales[:, i].mul(1 / world).reshape(world, 1)).sum(0)
        averaged.add_(server_error)
        packed, server_scale = pack_with_error(averaged, server_error)  # E <- c - S sign(c)
        server_bits.append(packed)
        server_scale_list.append(server_scale)
        offset += width
    all_bits = torch.empty(world, offset, dtype=torch.uint8, device=device)
    server_scales = torch.empty(world, len(xs), dtype=torch.float32, device=device)
    with comm.tag("compressed_allreduce"):
        comm.all_gather(all_bits.view(-1), torch.cat(server_bits), group=group)
        comm.all_gather(server_scales.view(-1), torch.cat(server_scale_list), group=group)
    results, offset = [], 0
    for i, (x, width) in enumerate(zip(xs, widths)):
        result = unpack_scaled(all_bits[:, offset:offset + width].reshape(-1), server_scales[:, i].contiguous())
        results.append(result[:x.numel()].reshape(x.shape).to(x.dtype))
        offset += width
    return results


def sign_majority_vote(x: torch.Tensor, group=None) -> torch.Tensor:
    """signSGD with majority vote (Bernstein et al. 2018): each rank sends sign(x_r) as 1 bit per
    element; the result is sign(sum_r sign(x_r)) on every rank (a tie, possible for even N, votes +1).

    The same two phases as `compressed_allreduce`, without scales or errors: all_to_all of the bits,
    each rank votes on its chunk, all_gather of the voted bits. Wire per rank: (N-1)/N * P/4 bytes.
    """
    return sign_majority_vote_many([x], group)[0]


def sign_majority_vote_many(xs: list, group=None) -> list:
    """`sign_majority_vote` of several tensors with one all_to_all and one all_gather in all."""
    world = comm.get_world_size(group)
    device = xs[0].device
    bits = []
    for x in xs:
        buffer = torch.zeros(padded_length(x.numel(), world), dtype=torch.float32, device=device)
        buffer[:x.numel()] = x.reshape(-1)
        bits.append(pack_signs(buffer).reshape(world, -1))
    widths = [b.shape[1] for b in bits]
    send = torch.cat(bits, dim=1)
    received = torch.empty_like(send)
    with comm.tag("sign_vote"):
        comm.all_to_all(received.view(-1), send.view(-1), group=group)
    voted, offset = [], 0
    for width in widths:  # this rank's chunk of every tensor: count the votes
        voted.append(pack_signs(unpack_signs(received[:, offset:offset + width]).reshape(world, -1).sum(0)))
        offset += width
    all_bits = torch.empty(world, offset, dtype=torch.uint8, device=device)
    with comm.tag("sign_vote"):
        comm.all_gather(all_bits.view(-1), torch.cat(voted), group=group)
    results, offset = [], 0
    for x, width in zip(xs, widths):
        results.append(unpack_signs(all_bits[:, offset:offset + width])[:x.numel()].reshape(x.shape).to(x.dtype))
        offset += width
    return results
