"""Gradient averaging arithmetic: where the 1/N goes, and which dtype goes on the wire.

Averaging over N ranks is a sum and a division; *when* the division happens decides the rounding
(and, in fp16, whether the sum overflows). DeepSpeed's rules, which ds_lab follows:

    stage 0, all-reduce (engine.allreduce_bucket), f = gradient_predivide_factor:
        postscale (default)          g x 1/f  -> all-reduce (sum) ->  x f/N   (each multiply skipped when 1)
        prescale_gradients: true     g x 1/N  -> all-reduce (sum)
    ZeRO 1, 2, 3, reduce-scatter (stage_1_and_2.average_tensor, stage3.__avg_scatter_contiguous_grads):
        g / N -> reduce-scatter (sum)          (ZeRO-2/3 refuse f != 1 and prescale; ZeRO-1 ignores them)

and the wire dtype is `communication_data_type`, or by default the training precision (fp16, bf16,
else fp32): the bucket is cast to it *before* the scaling, reduced, and cast back into the gradient
buffer (`tensor.copy_(tensor_to_allreduce)` in DeepSpeed). An fp32 model with
``"communication_data_type": "fp16"`` therefore sends 2-byte elements (the comm log shows it) and
its averaged gradient is the fp16 rounding of the fp16 sum of fp16-rounded scaled gradients.

    reduction = GradientReduction.from_config(config)
    wire = reduction.before_all_reduce(flat, N); all_reduce(wire); reduction.after_all_reduce(wire, flat, N)
    wire = reduction.before_reduce_scatter(flat, N); reduce_scatter(out_of(wire.dtype), wire)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GradientReduction:
    prescale: bool = False  # prescale_gradients
    predivide: float = 1.0  # gradient_predivide_factor
    dtype: Optional[torch.dtype] = None  # the wire dtype; None: the gradient buffer's own

    @classmethod
    def from_config(cls, config) -> "GradientReduction":
        """DeepSpeed's engine.communication_data_type: the key, else fp16 / bf16 / fp32 by precision."""
        name = config.communication_data_type or config.precision
        return cls(prescale=config.prescale_gradients, predivide=config.gradient_predivide_factor,
                   dtype=DTYPES[name])

    def wire(self, flat: torch.Tensor) -> torch.Tensor:
        """`flat` itself when it already has the wire dtype, else a cast copy of it."""
        return flat if self.dtype in (None, flat.dtype) else flat.to(self.dtype)

    def before_all_reduce(self, flat: torch.Tensor, world_size: int) -> torch.Tensor:
        """Stage 0: the tensor to all-reduce (cast and pre-scaled); pass it to `after_all_reduce`."""
        wire = self.wire(flat)
        if self.prescale:
            wire.mul_(1.0 / world_size)
        elif self.predivide != 1.0:
            wire.mul_(1.0 / self.predivide)
        return wire

    def after_all_reduce(self, wire: torch.Tensor, flat: torch.Tensor, world_size: int) -> None:
        """Stage 0, once the all-reduce of `wire` is complete: post-scale, and cast back into `flat`."""
        if not self.prescale and self.predivide != world_size:
            wire.mul_(self.predivide / world_size)
        if wire is not flat:
            flat.copy_(wire)

    def before_reduce_scatter(self, flat: torch.Tensor, world_size: int) -> torch.Tensor:
        """ZeRO: the tensor to reduce-scatter, cast and divided by N (the receiving chunk takes its dtype;
        `copy_` / `add_` of the result into the gradient shard casts it back)."""
        wire = self.wire(flat)
        wire.div_(world_size)
        return wire
