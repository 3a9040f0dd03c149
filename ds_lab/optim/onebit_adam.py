"""1-bit Adam (Tang et al. 2021, arXiv 2102.02888), as DeepSpeed ≤ 0.18 defined it
(runtime/fp16/onebit/adam.py: OnebitAdam) — the maintained version, and one that runs on a CPU.
tests/test_onebit.py holds it to DeepSpeed 0.18.9's own run (weight for weight, at 2, 3, 4 ranks)
and to a single-process simulation of N workers.

The observation: after a short warmup Adam's variance v changes slowly, so it can be frozen; then
Adam is momentum SGD with a fixed per-element learning rate, and momentum tolerates compression
when the compression error is fed back (`ds_lab.comm.compressed`). Two stages:

    warmup, steps 1 .. F-1 (F = freeze_step):   the engine all-reduces gradients in fp32
        m <- b1 m + (1 - b1) g              v <- b2 v + (1 - b2) g^2        (g: the average)
    compression, steps F, F+1, ...:             the engine's gradient all-reduce is off
        m_r <- b1 m + (1 - b1) g_r          from this rank's *local* gradient; v frozen
        m  <- compressed_allreduce(m_r)     1 bit per element + scales, with error feedback
    every step:
        update = m / (sqrt(v) + eps) (+ weight_decay * p)        p <- p - lr * update

No bias correction: DeepSpeed's OnebitAdam has none (its `bias_correction` argument is stored and
never read), so neither has this one; the argument is accepted and ignored, as there.

Where this differs from DeepSpeed's code, deliberately:
- The state (m, v) is made at construction. DeepSpeed's fp16 optimizer does this by running one
  `step()` on zero gradients at construction (which counts as step 1: hence "steps 1 .. F-1"
  above, and compression never before step 2); its fp32 path silently spends the user's first
  `step()` on it instead. Here step t is always the user's t-th step, with DeepSpeed's fp16 numbers.
- The errors are made when compression starts and are not part of the checkpoint; on load m, v
  and the step count are restored and both errors restart at zero (DeepSpeed saves rank 0's errors
  and then drops them on load, for the reasons its comment gives: they differ per rank and depend
  on the world size).
- `error_feedback=False` (ds_lab's own) zeroes both errors before every exchange: plain 1-bit
  compression, which the chapter runs to show why the errors are kept.
- `cuda_aware` and `comm_backend_name` are accepted and ignored: the collectives go through
  `ds_lab.comm` on whatever backend the process group has (gloo or NCCL).

A sign bit cannot say 0. A momentum entry that should stay exactly zero (an embedding row of a
token the data never contains: g = 0, so v = 0 after warmup) comes back from the compressed
all-reduce as +-scale, and its update m / (sqrt(0) + eps) is then of the order scale / 1e-8: such
rows run away. DeepSpeed's answer, kept here: a param group may carry `exp_avg_mask`, a 0/1 tensor
of the parameters' shape, multiplied into the momentum after every compressed exchange (it is
the user's, so a checkpoint load keeps the current one).
"""
from __future__ import annotations

import torch

from ds_lab import comm
from ds_lab.comm.compressed import compressed_allreduce_many, padded_length
from ds_lab.optim.adam import run_closure


class OneBitAdam(torch.optim.Optimizer):
    """1-bit Adam over `group` (default: the whole world). `compressing()` tells the engine's mode
    whether the next step exchanges the momentum itself (so the gradient all-reduce must be off)."""

    def __init__(self, params, lr=1e-3, freeze_step=100000, bias_correction=True, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=0.0, amsgrad=False, cuda_aware=False, comm_backend_name="nccl",
                 group=None, error_feedback=True):
        if amsgrad:
            raise ValueError("1-bit Adam does not support the AMSGrad variant (amsgrad=True)")
        if lr < 0 or eps < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"invalid 1-bit Adam hyper-parameters lr={lr} betas={betas} eps={eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, step=0)
        super().__init__(params, defaults)
        self.freeze_step, self.group = int(freeze_step), group
        self.cuda_aware, self.comm_backend_name = cuda_aware, comm_backend_name
        self.error_feedback = error_feedback  # False: ds_lab's switch to show what the errors are for
        for p in self._params():
            self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def steps_taken(self) -> int:
        return self.param_groups[0]["step"] if self.param_groups else 0

    def compressing(self, step=None) -> bool:
        """Whether step `step` (default: the next one) is in the compression stage."""
        step = self.steps_taken + 1 if step is None else step
        return step >= max(self.freeze_step, 2)

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        compress = self.compressing()
        live = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for group in self.param_groups:
            group["step"] += 1
        for group, p in live:  # the momentum (and, in warmup, the variance) from this rank's gradient
            beta1, beta2 = group["betas"]
            state, grad = self.state[p], p.grad
            state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
            if not compress:
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if compress:
            self._exchange_momentum([p for _, p in live])
        for group, p in live:
            exp_avg, exp_avg_sq = self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"]
            if compress and "exp_avg_mask" in group:  # entries whose momentum must stay exactly zero
                exp_avg.mul_(group["exp_avg_mask"].to(exp_avg.device))
            update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
            if group["weight_decay"] > 0.0:
                update += group["weight_decay"] * p
            p.add_(-group["lr"] * update)
        return loss

    def _exchange_momentum(self, params: list) -> None:
        """Every parameter's momentum through the error-compensated 1-bit all-reduce: per tensor
        arithmetic, one set of collectives for all of them (`compressed_allreduce_many`)."""
        world = comm.get_world_size(self.group)
        if world == 1 or not params:
            return
        errors = [self._errors(p, world) for p in params]
        if not self.error_feedback:  # every round forgets what earlier rounds lost
            for worker_error, server_error in errors:
                worker_error.zero_(), server_error.zero_()
        momenta = [self.state[p]["exp_avg"] for p in params]
        averaged = compressed_allreduce_many(momenta, [e for e, _ in errors], [e for _, e in errors], self.group)
        for exp_avg, value in zip(momenta, averaged):
            exp_avg.copy_(value)

    def _errors(self, p, world: int):
        """The worker and server error of `p`, made (zero) at the first compressed step."""
        state = self.state[p]
        if "worker_error" not in state:
            padded = padded_length(p.numel(), world)
            state["worker_error"] = torch.zeros(padded, dtype=torch.float32, device=p.device)
            state["server_error"] = torch.zeros(padded // world, dtype=torch.float32, device=p.device)
        return state["worker_error"], state["server_error"]

    def state_dict(self):
        """m, v and the step count; not the errors (per rank, per world size: they restart on load)."""
        saved = super().state_dict()
        for state in saved["state"].values():
            state.pop("worker_error", None)
            state.pop("server_error", None)
        return saved

    def load_state_dict(self, state_dict):
        masks = [group.get("exp_avg_mask") for group in self.param_groups]  # the user's, not the saved ones
        super().load_state_dict(state_dict)
        for group, mask in zip(self.param_groups, masks):
            group.pop("exp_avg_mask", None)
            if mask is not None:
                group["exp_avg_mask"] = mask
        for p in self._params():  # DeepSpeed's rule: compression errors restart at zero on load
            self.state[p].pop("worker_error", None)
            self.state[p].pop("server_error", None)
