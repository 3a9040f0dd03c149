"""The wire between pipeline stages: activations forward, their gradients backward, by send/recv.

Per micro-batch and stage boundary, forward sends the boundary activation (b x s x h elements for a
transformer) to the next stage and backward sends a gradient of the same size back:

    bytes per micro-batch per boundary = 2 x b s h x bytes per element

A receiver must allocate its buffer before the data arrives, so it must know shapes and dtypes.
They never change within a run, so they cross the wire once: the first message on each boundary
is a small int64 header (count, then dtype, ndim, dims of each tensor), cached on both sides;
every later message is the raw tensors only. A gradient's shape is that of the activation it
belongs to, which its sender received itself: no header at all.

Sends are asynchronous (`isend`, waited on at the end of the batch), receives block: a stage waits
only for what it needs next, which is deadlock-free because the schedules' message orders match
(schedule.messages). Activations and gradients travel with different tags, so the two streams
between the same pair of ranks (interleaved with 2 stages) never cross. Every message goes through
`ds_lab.comm` under the trace tags "pipe_meta", "pipe_activation" and "pipe_grad".
"""
from __future__ import annotations

import torch

from ds_lab import comm

ACTIVATION_TAG, GRAD_TAG = 1, 2
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
          torch.uint8]
HEADER_LENGTH = 64


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class StageLink:
    """One rank's send/recv to the ranks of the same (data, model) coordinates on other stages."""

    def __init__(self, grid, device):
        self.grid, self.device = grid, device
        self.headers_sent, self.headers = set(), {}  # key -> [(dtype, shape)]
        self.pending = []  # (handle, tensor) of isends not yet waited on: keeps the tensor alive

    def rank_of(self, stage: int) -> int:
        coord = self.grid.coord
        return self.grid.topology.get_rank(pipe=stage, data=coord["data"], model=coord["model"])

    def _isend(self, tensor, stage: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        self.pending.append((comm.isend(tensor, self.rank_of(stage), tag=tag), tensor))

    def send_activation(self, x, stage: int, key) -> None:
        tensors = as_tuple(x)
        if key not in self.headers_sent:
            header = [len(tensors)]
            for t in tensors:
                header += [DTYPES.index(t.dtype), t.dim(), *t.shape]
            if len(header) > HEADER_LENGTH:
                raise ValueError(f"activation header of {len(header)} numbers > {HEADER_LENGTH}: too many tensors")
            with comm.tag("pipe_meta"):
                self._isend(torch.tensor(header + [0] * (HEADER_LENGTH - len(header))), stage, ACTIVATION_TAG)
            self.headers_sent.add(key)
        with comm.tag("pipe_activation"):
            for t in tensors:
                self._isend(t, stage, ACTIVATION_TAG)

    def recv_activation(self, stage: int, key) -> tuple:
        if key not in self.headers:
            header = torch.zeros(HEADER_LENGTH, dtype=torch.int64)
            with comm.tag("pipe_meta"):
                comm.recv(header, self.rank_of(stage), tag=ACTIVATION_TAG)
            header, specs, i = header.tolist(), [], 1
            for _ in range(header[0]):
                dtype, ndim = DTYPES[header[i]], header[i + 1]
                specs.append((dtype, tuple(header[i + 2:i + 2 + ndim])))
                i += 2 + ndim
            self.headers[key] = specs
        out = []
        with comm.tag("pipe_activation"):
            for dtype, shape in self.headers[key]:
                buffer = torch.empty(shape, dtype=dtype, device=self.device)
                comm.recv(buffer, self.rank_of(stage), tag=ACTIVATION_TAG)
                out.append(buffer)
        return tuple(out)

    def send_grads(self, grads, stage: int) -> None:
        with comm.tag("pipe_grad"):
            for g in grads:
                self._isend(g, stage, GRAD_TAG)

    def recv_grads(self, like, stage: int) -> list:
        """Gradients for the tensors `like` (the floating-point outputs this stage sent)."""
        out = []
        with comm.tag("pipe_grad"):
            for t in like:
                buffer = torch.empty_like(t, memory_format=torch.contiguous_format)
                comm.recv(buffer, self.rank_of(stage), tag=GRAD_TAG)
                out.append(buffer)
        return out

    def wait(self) -> None:
        for handle, _ in self.pending:
            handle.wait()
        self.pending = []
