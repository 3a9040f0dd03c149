"""The 1-bit compression of ds_lab/comm/compressed.py as kernels (kernels/sign_pack.cu): the
worker's step in three launches and two passes over the buffer, and the unpacking.

    packed, scale = pack_with_error(buffer, worker_error)   # buffer = pad(x) + e, fp32, len % 8 == 0
        scale = ||buffer|| / sqrt(len)              (sum_squares_partial + sum_squares_final)
        packed = pack_signs(buffer)                 uint8, MSB first, bit 1 = buffer >= 0
        worker_error <- buffer - scale * sign(buffer)   in place            (sign_pack_with_error)
    values = unpack_scaled(packed, scales)          # +-scales[c] per bit, chunk c of len(packed)/len(scales) bytes

The "torch" backend is the arithmetic below (signs, pack_signs, unpack_signs, scale_of), which
comm/compressed.py uses too: on a CPU the all-reduce runs exactly these, on a GPU the kernels.
The kernels' scale sums the squares in fp64 in a fixed order: the same bits at every call, and
within a few fp32 ulps of torch's norm; given the scale, the bits and the error are exact.
"""
from __future__ import annotations

import math

import torch

from ds_lab.ops import backend as backends

THREADS = 256  # per block; the kernels' __launch_bounds__
MAX_SUM_BLOCKS = 1024  # partial sums of the first pass (the second pass adds them in one block)
MAX_BLOCKS = 65535


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


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



def _blocks(work_items: int, limit: int) -> int:
    return max(1, min(limit, -(-work_items // THREADS)))


def pack_with_error_reference(buffer: torch.Tensor, worker_error: torch.Tensor) -> tuple:
    """The worker step in torch: (pack_signs(buffer), scale_of(buffer)); worker_error updated."""
    scale = scale_of(buffer)
    worker_error.copy_(buffer - scale * signs(buffer))
    return pack_signs(buffer), scale


def unpack_scaled_reference(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """compressed.py's last step: unpack_signs, each chunk times its scale, flattened."""
    chunks = unpack_signs(packed).reshape(scales.numel(), -1)
    return chunks.mul_(scales.reshape(-1, 1)).reshape(-1)


def pack_with_error(buffer: torch.Tensor, worker_error: torch.Tensor, backend=None) -> tuple:
    """(packed uint8 [len/8], scale float32 [1]) of `buffer`, with `worker_error` set in place to
    buffer - scale * sign(buffer). Both fp32, contiguous, the same length, a multiple of 8."""
    n = buffer.numel()
    if buffer.dtype != torch.float32 or worker_error.dtype != torch.float32:
        raise TypeError(f"buffer is {buffer.dtype} and worker_error {worker_error.dtype}: both must be float32")
    if worker_error.numel() != n or n % 8 or n == 0:
        raise ValueError(f"buffer of {n} and worker_error of {worker_error.numel()} elements: need the same "
                         "non-zero length, a multiple of 8 (compressed.padded_length pads to one)")
    chosen = backends.resolve(backend, buffer, worker_error)
    contiguous = buffer.is_contiguous() and worker_error.is_contiguous()
    if not contiguous and backend is not None and chosen != "torch":
        raise ValueError("the kernels take contiguous buffers; call .contiguous() (or use backend='torch')")
    if chosen == "torch" or not contiguous:  # backend=None: the best that can take them
        return pack_with_error_reference(buffer, worker_error)
    device = buffer.device
    sum_blocks = _blocks(n // 4, MAX_SUM_BLOCKS)
    partial = backends.empty((sum_blocks,), torch.float64, device)
    scale = backends.empty((1,), torch.float32, device)
    packed = backends.empty((n // 8,), torch.uint8, device)
    backends.launch("sign_pack", "sum_squares_partial", (sum_blocks,), (THREADS,), (partial, buffer, n), chosen)
    backends.launch("sign_pack", "sum_squares_final", (1,), (THREADS,), (scale, partial, sum_blocks, n), chosen)
    backends.launch("sign_pack", "sign_pack_with_error", (_blocks(n // 8, MAX_BLOCKS),), (THREADS,),
                    (packed, worker_error, buffer, scale, n // 8), chosen)
    return packed, scale


def unpack_scaled(packed: torch.Tensor, scales: torch.Tensor, backend=None) -> torch.Tensor:
    """float32 [8 len(packed)]: +scales[c] where a bit is 1, -scales[c] where it is 0, for the
    len(scales) equal chunks c of `packed` (one scale: the whole tensor)."""
    n_bytes, chunks = packed.numel(), scales.numel()
    if packed.dtype != torch.uint8 or scales.dtype != torch.float32:
        raise TypeError(f"packed is {packed.dtype} and scales {scales.dtype}: need uint8 and float32")
    if chunks == 0 or n_bytes % chunks:
        raise ValueError(f"{n_bytes} bytes do not split into {chunks} equal chunks, one per scale")
    chosen = backends.resolve(backend, packed, scales)
    if chosen == "torch":
        return unpack_scaled_reference(packed, scales)
    packed, scales = packed.contiguous(), scales.contiguous()
    out = backends.empty((8 * n_bytes,), torch.float32, packed.device)
    if n_bytes:
        backends.launch("sign_pack", "unpack_scaled", (_blocks(n_bytes, MAX_BLOCKS),), (THREADS,),
                        (out, packed, scales, n_bytes // chunks, n_bytes), chosen)
    return out
