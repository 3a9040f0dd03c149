"""Adam and AdamW, with exactly K = 8 bytes of state per fp32 parameter (the paper's count).

For each parameter p with gradient g, at step t (lr, betas (b1, b2), eps, weight decay wd):

    AdamW (adam_w_mode=True):  p <- p (1 - lr wd)            decoupled decay (Loshchilov & Hutter)
    Adam  (adam_w_mode=False): g <- g + wd p                  L2 penalty folded into the gradient
    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

Two moments, m and v, in fp32: 8 bytes per parameter, which with the fp32 master copy (4 bytes)
is the K = 12 of mixed-precision ZeRO. The step count t is a Python int per group (as in
DeepSpeed's FusedAdam), not a tensor per parameter, so the memory ledger sees exactly 8Ψ.
The math is the same as torch.optim.Adam/AdamW's (tests compare them); the update is one fused
kernel launch per group on a GPU with CuPy (kernels/fused_adam.cu, the `fused_kernels` switch),
torch's `_foreach` ops otherwise: `ds_lab.ops.fused_adam`.

DeepSpeed's `"type": "Adam"` means adam_w_mode=True (decoupled decay) and weight_decay=0 by
default; `ds_lab.config` resolves that and `build_optimizer` follows it. `torch_adam=True`
(DeepSpeed's switch from FusedAdam to torch.optim.Adam/AdamW) runs the torch `_foreach` reference,
never the fused kernel; the numbers are the same either way.
"""
from __future__ import annotations

import torch

from ds_lab.ops.fused_adam import fused_adam_step


def run_closure(closure):
    """torch.optim's convention: `step(closure)` re-evaluates the loss, with gradients on, first."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Adam(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 adam_w_mode=True, bias_correction=True, torch_adam=False):
        if lr < 0 or eps < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"invalid Adam hyper-parameters lr={lr} betas={betas} eps={eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        adam_w_mode=adam_w_mode, bias_correction=bias_correction, step=0)
        super().__init__(params, defaults)
        self.torch_adam = bool(torch_adam)  # DeepSpeed's torch_adam: the torch path, never the fused kernel

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
            group["step"] += 1
            self._update(group, params, grads, exp_avgs, exp_avg_sqs, "torch" if self.torch_adam else None)
        return loss

    @staticmethod
    def _update(group, params, grads, exp_avgs, exp_avg_sqs, backend=None):
        """The update above for every tensor of the group: one fused kernel launch on a GPU
        (kernels/fused_adam.cu), torch `_foreach` ops elsewhere (`ds_lab.ops.fused_adam`)."""
        fused_adam_step(params, grads, exp_avgs, exp_avg_sqs, lr=group["lr"], betas=group["betas"],
                        eps=group["eps"], weight_decay=group["weight_decay"], step=group["step"],
                        adam_w_mode=group["adam_w_mode"], bias_correction=group["bias_correction"],
                        backend=backend)

