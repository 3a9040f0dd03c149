"""Data parallel for the optimizers that exchange data themselves: 1-bit Adam after its warmup,
signSGD with majority vote from the first step (`ds_lab.optim.onebit_adam`, `ds_lab.optim.sign`).

Everything is stage 0's (`DataParallel`: one flat gradient buffer, fp32 masters under bf16/fp16),
except the one thing such an optimizer changes: while `optimizer.compressing()` says the next step
sends its own compressed message (1-bit momentum, sign votes), the engine's fp32 gradient
all-reduce is off and every rank's `.grad` stays its *local* gradient. This is DeepSpeed's
`enable_backward_allreduce = False`, set by OnebitAdam when its warmup ends; here the mode asks the
optimizer before each boundary backward, so a checkpoint loaded in either stage needs no flag.

The gradient norm (gradient_clipping) after the switch is each rank's own local norm, as in
DeepSpeed (its clip runs on the local gradients the optimizer is about to compress).
"""
from __future__ import annotations

from ds_lab.runtime.data_parallel import DataParallel


class CompressedDataParallel(DataParallel):
    """Stage-0 data parallel whose gradient all-reduce the optimizer can switch off."""

    name = "data parallel, optimizer-side compression"
    zero_grad_step_at_init = False  # not checked against DeepSpeed's 1-bit Adam in bf16/fp16: not taken

    def _all_reduce_now(self, boundary: bool) -> bool:
        compressing = getattr(self.optimizer, "compressing", None)  # a client optimizer may not have it
        return boundary and not (compressing is not None and compressing())

    def backward_start(self, boundary: bool) -> None:
        self.reducer.backward_start(self._all_reduce_now(boundary))

    def backward_end(self, boundary: bool) -> None:
        self.reducer.backward_end(self._all_reduce_now(boundary))
