"""Mixed precision: which dtype the model computes in, and the dynamic loss scaler for fp16.

Bytes per parameter Ψ, data parallel with Adam (the ZeRO paper's 16Ψ):

    fp32:        params 4 + grads 4 + Adam m, v 8                         = 16Ψ
    bf16/fp16:   params 2 + grads 2 + fp32 master 4 + Adam m, v 8          = 16Ψ  (K = 12)

fp16's 5 exponent bits underflow small gradients, so the loss is multiplied by a scale S before
backward and the gradients divided by S before the step. The scale is *dynamic* (DeepSpeed's
semantics, `deepspeed/runtime/fp16/loss_scaler.py`):
- an overflow (inf/nan in any gradient) skips the step. With `hysteresis` h, the first h-1
  overflows in a row only use up the hysteresis; the h-th halves S (never below min_loss_scale);
- after `loss_scale_window` steps without overflow, S doubles (and hysteresis is refilled;
  with `consecutive_hysteresis` it is refilled after every good step).
bf16 has fp32's exponent range: no scaling needed.
"""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DynamicLossScaler:
    def __init__(self, init_scale=2.0 ** 16, scale_window=1000, hysteresis=2,
                 consecutive_hysteresis=False, min_scale=1.0, scale_factor=2.0):
        self.cur_scale = float(init_scale)
        self.scale_window, self.hysteresis = scale_window, hysteresis
        self.consecutive_hysteresis, self.min_scale = consecutive_hysteresis, float(min_scale)
        self.scale_factor = scale_factor
        self.cur_iter, self.last_overflow_iter, self.delayed_shift = 0, -1, hysteresis
        self.dynamic = True

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_scale == self.min_scale:
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.delayed_shift -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.delayed_shift = self.hysteresis
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.delayed_shift = self.hysteresis
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict:
        return dict(cur_scale=self.cur_scale, cur_iter=self.cur_iter,
                    last_overflow_iter=self.last_overflow_iter, delayed_shift=self.delayed_shift)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class StaticLossScaler(DynamicLossScaler):
    """`fp16.loss_scale` > 0: a fixed scale; overflows still skip the step."""

    def __init__(self, scale: float):
        super().__init__(init_scale=scale)
        self.dynamic = False

    def update_scale(self, overflow: bool) -> None:
        self.cur_iter += 1


def make_loss_scaler(fp16_config):
    """The scaler an `fp16` config section asks for (None when fp16 is off)."""
    if not fp16_config.enabled:
        return None
    if fp16_config.loss_scale and fp16_config.loss_scale > 0:
        return StaticLossScaler(fp16_config.loss_scale)
    return DynamicLossScaler(init_scale=2.0 ** fp16_config.initial_scale_power,
                             scale_window=fp16_config.loss_scale_window,
                             hysteresis=fp16_config.hysteresis,
                             consecutive_hysteresis=fp16_config.consecutive_hysteresis,
                             min_scale=fp16_config.min_loss_scale)


def has_overflow(tensors) -> bool:
    """True if any tensor holds an inf or a nan (one fused reduction, one sync)."""
    flags = [torch.logical_not(torch.isfinite(t)).any() for t in tensors]
    return bool(torch.stack(flags).any()) if flags else False
