"""`FusedAdam` (DeepSpeed's deepspeed/ops/adam/fused_adam.py), and the step both Adams here share.

DeepSpeed's FusedAdam updates all tensors of a param group with one multi-tensor CUDA launch; here
the update is `ds_lab.ops.fused_adam_step` (the fused kernel on a GPU with CuPy, torch's `_foreach`
ops elsewhere), so the arithmetic lives in one place (ds_lab/ops/fused_adam.py) and equals
torch.optim.AdamW (adam_w_mode=True, the default) or torch.optim.Adam with L2 weight decay (False).

As in DeepSpeed: the step count is the group's "step" (one int per group); the moments are the
state's "exp_avg" and "exp_avg_sq"; `zero_grad()` sets gradients to None when `set_grad_none`
(the default); `amsgrad=True` raises (DeepSpeed's FusedAdam has no AMSGrad either).
A param that is not fp32 (bf16, fp16) is updated through a temporary fp32 copy (its state stays
fp32) and written back rounded: the fp32-compute the CUDA kernel does on such tensors.
"""
from __future__ import annotations

import torch

from ds_lab.ops.fused_adam import fused_adam_step


def _refuse_amsgrad(name: str, amsgrad: bool) -> None:
    if amsgrad:
        raise RuntimeError(f"{name} does not support the AMSGrad variant (DeepSpeed's does not either); "
                           "pass amsgrad=False, or use torch.optim.Adam(amsgrad=True)")


class _MultiTensorAdam(torch.optim.Optimizer):
    """The step of FusedAdam and DeepSpeedCPUAdam: one `fused_adam_step` per (group, dtype)."""

    adam_w_mode = True
    fp32_optimizer_states = True

    def _state_for(self, p):
        state = self.state[p]
        if not state:
            dtype = torch.float32 if self.fp32_optimizer_states else p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            group["step"] = group.get("step", 0) + 1
            hyper = dict(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                         step=group["step"], adam_w_mode=bool(self.adam_w_mode),
                         bias_correction=group["bias_correction"])
            states = [self._state_for(p) for p in params]
            direct = [i for i, p in enumerate(params) if p.dtype == states[i]["exp_avg"].dtype]
            if direct:
                fused_adam_step([params[i] for i in direct], [params[i].grad for i in direct],
                                [states[i]["exp_avg"] for i in direct], [states[i]["exp_avg_sq"] for i in direct],
                                **hyper)
            mixed = [i for i in range(len(params)) if i not in set(direct)]
            if mixed:  # low-precision params with fp32 state: compute on fp32 copies, write back rounded
                masters = [params[i].float() for i in mixed]
                fused_adam_step([params[i] for i in mixed], [params[i].grad for i in mixed],
                                [states[i]["exp_avg"] for i in mixed], [states[i]["exp_avg_sq"] for i in mixed],
                                masters=masters, **hyper)
        return loss


class FusedAdam(_MultiTensorAdam):
    """DeepSpeed's FusedAdam: AdamW by default (adam_w_mode=True), Adam with L2 decay otherwise."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0., amsgrad=False, set_grad_none=True):
        _refuse_amsgrad("FusedAdam", amsgrad)
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none

    def zero_grad(self, set_to_none: bool = None):
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)
