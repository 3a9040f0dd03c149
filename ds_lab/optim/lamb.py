"""LAMB: Adam's direction, scaled per tensor by a trust ratio ||w|| / ||update|| (You et al., 2019).

DeepSpeed's FusedLamb (deepspeed/ops/lamb/fused_lamb.py and its CUDA kernel
csrc/lamb/fused_lamb_cuda_kernel.cu), for each parameter tensor p with gradient g at its step t:

    m <- b1 m + (1 - b1) g                 v <- b2 v + (1 - b2) g^2
    denom  = sqrt(v) + eps                 (sqrt(v + eps) with eps_inside_sqrt=True)
    update = m / denom + weight_decay * p  (decoupled decay, inside the ratio)
    coeff  = ||p|| / ||update||, clamped to [min_coeff, max_coeff]; 1 when either norm is 0
    step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)   (lr without bias_correction)
    p <- p - step_size * coeff * update

Note what the kernel does and this code copies: the bias corrections are folded into step_size, so
the update whose norm sets the trust ratio is the *uncorrected* m / (sqrt(v) + eps); the norms are
of the whole tensor (one coefficient per tensor; `get_lamb_coeffs()` returns the last step's).
Under ZeRO the tensors the optimizer sees are flat shards, so a coefficient is per shard, as with
DeepSpeed's FusedLamb under ZeRO (which DeepSpeed runs only with "zero_allow_untested_optimizer";
ds_lab warns, see ds_lab.modes.check_zero_optimizer).
Same 8 bytes of state per parameter as Adam; the step count is per tensor (state["step"]), as there.
`max_grad_norm` is refused as there (use the top-level gradient_clipping); amsgrad=True raises.
"""
from __future__ import annotations

import math

import torch

from ds_lab.optim.adam import run_closure


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, eps_inside_sqrt=False,
                 weight_decay=0., max_grad_norm=0., max_coeff=10.0, min_coeff=0.01, amsgrad=False):
        if amsgrad:
            raise RuntimeError("Lamb does not support the AMSGrad variant (DeepSpeed's FusedLamb does not either); "
                               "pass amsgrad=False")
        if max_grad_norm:
            raise ValueError("Lamb's max_grad_norm is not supported (DeepSpeed refuses it too): set the config's "
                             "top-level 'gradient_clipping' instead")
        if lr < 0 or eps < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not 0 < min_coeff <= max_coeff:
            raise ValueError(f"invalid Lamb hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"min_coeff={min_coeff} max_coeff={max_coeff}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm, max_coeff=max_coeff,
                        min_coeff=min_coeff)
        super().__init__(params, defaults)
        self.eps_mode = 0 if eps_inside_sqrt else 1  # DeepSpeed's names: 0 inside the sqrt, 1 outside
        self.lamb_coeffs = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        self.lamb_coeffs = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                self.lamb_coeffs.append(self._update(p, state, group, beta1, beta2))
        return loss

    def _update(self, p, state, group, beta1, beta2) -> torch.Tensor:
        """One tensor's step (module docstring); returns its trust coefficient as a 0-d tensor."""
        w, g = p.float(), p.grad.float()
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v + group["eps"]).sqrt() if self.eps_mode == 0 else v.sqrt().add_(group["eps"])
        update = m / denom
        if group["weight_decay"] != 0:
            update.add_(w, alpha=group["weight_decay"])
        w_norm, u_norm = w.norm(), update.norm()
        ratio = (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])
        coeff = torch.where((w_norm != 0) & (u_norm != 0), ratio, torch.ones_like(ratio))
        step_size = group["lr"]
        if group["bias_correction"]:
            step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        p.copy_(w - step_size * coeff * update)
        return coeff

    def get_lamb_coeffs(self) -> list:
        """The trust coefficients of the last step, one float per tensor stepped (DeepSpeed's method)."""
        return [coeff.item() for coeff in self.lamb_coeffs]
