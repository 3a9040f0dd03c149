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

Bits are packed 8 per byte, most significant bit first (numpy's `packbits` order), in plain torch.

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

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def padded_length(n: int, world_size: int) -> int:
    """n rounded up to a multiple of N * lcm(N, 8): N chunks of whole bytes (DeepSpeed's rule)."""
    unit = world_size * (world_size * 8 // math.gcd(world_size, 8))
    return -(-n // unit) * unit


def signs(x: torch.Tensor) -> torch.Tensor:
    """+1.0 where x >= 0, -1.0 where x < 0 (so sign(0) = +1), in x's dtype."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """One bit per element of x (1 = non-negative), 8 per uint8 byte, MSB first. len(x) % 8 == 0."""
    bits = (x.reshape(-1, 8) >= 0).to(torch.uint8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The inverse of `pack_signs`: +1.0 / -1.0 for each of the 8 * len(packed) bits."""
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return torch.where(bits, 1.0, -1.0).to(dtype).reshape(-1)


def scale_of(x: torch.Tensor) -> torch.Tensor:
    """The 1-bit scale: ||x|| / sqrt(len(x)) (the root mean square), a one-element float32 tensor."""
    return (torch.linalg.vector_norm(x) / math.sqrt(x.numel())).reshape(1)


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
    n, world = x.numel(), comm.get_world_size(group)
    padded = worker_error.numel()
    if padded != padded_length(n, world) or server_error.numel() != padded // world:
        raise ValueError(f"error buffers of {padded} and {server_error.numel()} elements for a tensor of {n} "
                         f"on {world} ranks: need {padded_length(n, world)} and {padded_length(n, world) // world}")
    buffer = torch.zeros(padded, dtype=torch.float32, device=x.device)
    buffer[:n] = x.reshape(-1)
    # ---- worker: compress all of x, keep what the bits could not say
    buffer.add_(worker_error)
    worker_scale = scale_of(buffer)
    worker_error.copy_(buffer - worker_scale * signs(buffer))
    bits = pack_signs(buffer)  # N chunks of padded / (8N) bytes, chunk j for server j
    received = torch.empty_like(bits)
    scales = torch.empty(world, dtype=torch.float32, device=x.device)
    with comm.tag("compressed_allreduce"):
        comm.all_to_all(received, bits, group=group)
        comm.all_gather(scales, worker_scale, group=group)
    # ---- server: average its chunk of every worker's signs, compress again
    chunk = unpack_signs(received).reshape(world, -1)
    averaged = chunk.mul_(scales.mul(1 / world).reshape(world, 1)).sum(0)
    averaged.add_(server_error)
    server_scale = scale_of(averaged)
    server_error.copy_(averaged - server_scale * signs(averaged))
    server_bits = pack_signs(averaged)
    all_bits = torch.empty(world * server_bits.numel(), dtype=torch.uint8, device=x.device)
    server_scales = torch.empty(world, dtype=torch.float32, device=x.device)
    with comm.tag("compressed_allreduce"):
        comm.all_gather(all_bits, server_bits, group=group)
        comm.all_gather(server_scales, server_scale, group=group)
    result = unpack_signs(all_bits).reshape(world, -1).mul_(server_scales.reshape(world, 1)).reshape(-1)
    return result[:n].reshape(x.shape).to(x.dtype)


def sign_majority_vote(x: torch.Tensor, group=None) -> torch.Tensor:
    """signSGD with majority vote (Bernstein et al. 2018): each rank sends sign(x_r) as 1 bit per
    element; the result is sign(sum_r sign(x_r)) on every rank (a tie, possible for even N, votes +1).

    The same two phases as `compressed_allreduce`, without scales or errors: all_to_all of the bits,
    each rank votes on its chunk, all_gather of the voted bits. Wire per rank: (N-1)/N * P/4 bytes.
    """
    n, world = x.numel(), comm.get_world_size(group)
    padded = padded_length(n, world)
    buffer = torch.zeros(padded, dtype=torch.float32, device=x.device)
    buffer[:n] = x.reshape(-1)
    bits = pack_signs(buffer)
    received = torch.empty_like(bits)
    with comm.tag("sign_vote"):
        comm.all_to_all(received, bits, group=group)
    votes = unpack_signs(received).reshape(world, -1).sum(0)
    voted = pack_signs(votes)
    all_bits = torch.empty(world * voted.numel(), dtype=torch.uint8, device=x.device)
    with comm.tag("sign_vote"):
        comm.all_gather(all_bits, voted, group=group)
    return unpack_signs(all_bits)[:n].reshape(x.shape).to(x.dtype)
