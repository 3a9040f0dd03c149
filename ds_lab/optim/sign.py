"""Two sign-based optimizers to set beside 1-bit Adam (config types of ds_lab's own; DeepSpeed has neither).

SignAdam — the update rule the article (§4.4) prints under the name "1-bit Adam":

    m <- b1 m + (1 - b1) g      v <- b2 v + (1 - b2) g^2      m^ = m/(1 - b1^t)    v^ = v/(1 - b2^t)
    p <- p - lr * sign(m^) / (sqrt(v^) + eps)                 (decoupled weight decay: p *= 1 - lr wd)

It is *not* 1-bit Adam and it compresses nothing: the sign is taken after the gradient has been
averaged, and the variance v needs the full gradient every step, so its traffic is Adam's
(the engine's fp32 all-reduce, 32 bits per element). Taking the sign throws away the momentum's
magnitude instead of sending less. Run distributed, it is a plain data-parallel optimizer.

SignSGD with majority vote (Bernstein et al., ICLR 2019; "Signum" when momentum > 0):

    m_r <- beta m_r + (1 - beta) g_r          each rank, from its own gradient (beta = 0: m_r = g_r)
    vote = sign(sum_r sign(m_r))              1 bit per element each way (`comm.sign_majority_vote`)
    p <- p - lr * vote                        (decoupled weight decay: p *= 1 - lr wd)

Its traffic is truly 1 bit per element (plus padding to whole bytes per chunk), with no scales
and no error feedback: the magnitude of the gradient is never sent. The engine's gradient
all-reduce is off for it (`compressing()` is always True). Its momentum is per rank: a
checkpoint keeps data-rank 0's, and every rank resumes from that one.
"""
from __future__ import annotations

import torch

from ds_lab import comm
from ds_lab.comm.compressed import sign_majority_vote_many, signs
from ds_lab.optim.adam import run_closure


class SignAdam(torch.optim.Optimizer):
    """The article's §4.4 rule: Adam's moments, the update's magnitude replaced by sign(m^)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True):
        if lr < 0 or eps < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"invalid SignAdam hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, step=0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            group["step"] += 1
            t, (beta1, beta2), lr = group["step"], group["betas"], group["lr"]
            bias1, bias2 = (1 - beta1 ** t, 1 - beta2 ** t) if group["bias_correction"] else (1.0, 1.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                denom = (v / bias2).sqrt_().add_(group["eps"])
                p.addcdiv_(torch.sign(m / bias1), denom, value=-lr)
        return loss


class SignSGD(torch.optim.Optimizer):
    """signSGD with majority vote over `group` (default: the world); Signum when momentum > 0."""

    def __init__(self, params, lr=1e-4, momentum=0.0, weight_decay=0.0, group=None):
        if lr < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid SignSGD hyper-parameters lr={lr} momentum={momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, step=0))
        self.group = group

    def compressing(self, step=None) -> bool:
        """Always: the vote replaces the gradient all-reduce from the first step on."""
        return True

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        world = comm.get_world_size(self.group)
        live = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        directions = []
        for group in self.param_groups:
            group["step"] += 1
        for group, p in live:  # this rank's own direction: its gradient, or its momentum (Signum)
            if group["momentum"] > 0:
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                directions.append(state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"]))
            else:
                directions.append(p.grad)
        if world > 1 and live:  # one vote for every tensor: one all_to_all and one all_gather
            votes = sign_majority_vote_many(directions, self.group)
        else:
            votes = [signs(d) for d in directions]
        for (group, p), vote in zip(live, votes):
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(vote, alpha=-group["lr"])
        return loss

