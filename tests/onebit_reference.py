"""Single-process simulations of the communication-compressing algorithms: N simulated workers in one
process, written apart from ds_lab's code (from the paper and DeepSpeed ≤ 0.18's definitions), to
hold the launched runs to."""
from __future__ import annotations

import math

import torch


def padded(n: int, world: int) -> int:
    unit = world * (world * 8 // math.gcd(world, 8))  # N * lcm(N, 8)
    return math.ceil(n / unit) * unit


def sign_pm(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


class SimulatedCompressor:
    """The error-compensated 1-bit all-reduce among N simulated workers, for one tensor."""

    def __init__(self, n: int, world: int):
        self.n, self.world, self.P = n, world, padded(n, world)
        self.worker_error = [torch.zeros(self.P) for _ in range(world)]
        self.server_error = [torch.zeros(self.P // world) for _ in range(world)]

    def __call__(self, xs: list) -> torch.Tensor:
        world, chunk = self.world, self.P // self.world
        signs, scales = [], []
        for r, x in enumerate(xs):
            buffer = torch.cat([x.reshape(-1).float(), torch.zeros(self.P - self.n)]) + self.worker_error[r]
            scale = rms(buffer)
            self.worker_error[r] = buffer - scale * sign_pm(buffer)
            signs.append(sign_pm(buffer))
            scales.append(scale)
        out = torch.empty(self.P)
        for j in range(world):  # server j averages chunk j of every worker
            part = slice(j * chunk, (j + 1) * chunk)
            c = signs[0][part] * (scales[0] * (1 / world))
            for r in range(1, world):
                c = c + signs[r][part] * (scales[r] * (1 / world))
            c = c + self.server_error[j]
            scale = rms(c)
            self.server_error[j] = c - scale * sign_pm(c)
            out[part] = sign_pm(c) * scale
        return out[:self.n].reshape(xs[0].shape)


def majority_vote(xs: list) -> torch.Tensor:
    total = sign_pm(xs[0])
    for x in xs[1:]:
        total = total + sign_pm(x)
    return sign_pm(total)


def clipped(grads: list, clip: float) -> list:
    """clip_grad_norm_'s arithmetic on one worker's gradients (its own norm: after 1-bit Adam's
    switch every rank clips its local gradient, as DeepSpeed does)."""
    if not clip:
        return grads
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return [g * torch.clamp(clip / (norm + 1e-6), max=1.0) for g in grads]


def simulate_onebit_adam(start: list, grads: list, compressing: list, lr, betas=(0.9, 0.999), eps=1e-8,
                         weight_decay=0.0, reset_errors_after=None, clip=0.0):
    """1-bit Adam over N simulated workers. start: the parameters; grads[r][t][i]: worker r's gradient of
    parameter i at step t, as its optimizer saw it (the average during warmup); compressing[t]: whether
    step t compresses. Returns the final parameters."""
    world, (beta1, beta2) = len(grads), betas
    params = [p.clone() for p in start]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    compressors = [SimulatedCompressor(p.numel(), world) for p in params]
    for t, compress in enumerate(compressing):
        if reset_errors_after == t:
            compressors = [SimulatedCompressor(p.numel(), world) for p in params]
        step_grads = [clipped(grads[r][t], clip) for r in range(world)]
        for i, p in enumerate(params):
            if not compress:
                g = step_grads[0][i]
                m[i] = torch.add(m[i] * beta1, g, alpha=1 - beta1)
                v[i] = torch.addcmul(v[i] * beta2, g, g, value=1 - beta2)
            else:
                local = [torch.add(m[i] * beta1, step_grads[r][i], alpha=1 - beta1) for r in range(world)]
                m[i] = compressors[i](local) if world > 1 else local[0]
            update = m[i] / (v[i].sqrt() + eps)
            if weight_decay > 0:
                update = update + weight_decay * p
            params[i] = p - lr * update
    return params


def simulate_sign_sgd(start: list, grads: list, lr, momentum=0.0, weight_decay=0.0):
    """signSGD with majority vote (Signum when momentum > 0), each worker with its own momentum."""
    world = len(grads)
    params = [p.clone() for p in start]
    bufs = [[torch.zeros_like(p) for p in params] for _ in range(world)]
    for t in range(len(grads[0])):
        for i, p in enumerate(params):
            directions = []
            for r in range(world):
                if momentum > 0:
                    bufs[r][i] = bufs[r][i] * momentum + (1 - momentum) * grads[r][t][i]
                    directions.append(bufs[r][i])
                else:
                    directions.append(grads[r][t][i])
            vote = majority_vote(directions)
            if weight_decay:
                p = p * (1 - lr * weight_decay)
            params[i] = p - lr * vote
    return params


def simulate_sign_adam(start: list, grads: list, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """The article's §4.4 rule on the averaged gradient grads[t][i]: p -= lr sign(m^)/(sqrt(v^)+eps)."""
    (beta1, beta2), params = betas, [p.clone() for p in start]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, step in enumerate(grads, 1):
        for i, g in enumerate(step):
            m[i] = torch.lerp(m[i], g, 1 - beta1)
            v[i] = torch.addcmul(v[i] * beta2, g, g, value=1 - beta2)
            p = params[i] * (1 - lr * weight_decay) if weight_decay else params[i]
            denom = (v[i] / (1 - beta2 ** t)).sqrt() + eps
            params[i] = torch.addcdiv(p, torch.sign(m[i] / (1 - beta1 ** t)), denom, value=-lr)
    return params
