"""Mixed precision: which dtype the model computes in, and the dynamic loss scaler for fp16.

Bytes per parameter Ψ, data parallel with Adam (the ZeRO paper's 16Ψ):

    fp32:        params 4 + grads 4 + Adam m, v 8                         = 16Ψ
    bf16/fp16:   params 2 + grads 2 + fp32 master 4 + Adam m, v 8          = 16Ψ  (K = 12)

fp16's 5 exponent bits underflow small gradients, so the loss is multiplied by a scale S before
backward and the gradients divided by S before the step. The scale is *dynamic*, step for step as
DeepSpeed 0.19 moves it (`deepspeed/runtime/fp16/loss_scaler.py` under ZeRO,
`fp16/fused_optimizer.py` and `unfused_optimizer.py` at stage 0; tests/test_loss_scaler.py holds
the sequences measured from DeepSpeed itself):
- an overflow (inf/nan in any gradient) skips the step. With `hysteresis` h, the first h-1
  overflows only use up the hysteresis; the next halves S (never below min_loss_scale). The
  hysteresis is refilled only when S doubles (with `consecutive_hysteresis`: after every good step);
- S doubles on the (window+1)-th good step after the last overflow (or the start), then every
  `loss_scale_window` good steps;
- an overflow when S already *is* min_loss_scale (and the hysteresis is used up) stops the run:
  a smaller scale is not allowed, so DeepSpeed stops the run rather than skip steps forever.
DeepSpeed's two fp16 paths differ, and the engine's mode says which it runs: ZeRO (stages 1-3)
does all of the above; stage 0's fp16 optimizer has no hysteresis (every overflow halves S,
`hysteresis` and `consecutive_hysteresis` are ignored) and stays at min_loss_scale silently,
skipping every overflowing step. `fp16.loss_scale` > 0 is a static scale: never changed,
overflowing steps still skipped.
bf16 has fp32's exponent range: no scaling needed.

fp32 master weights start from the 2-byte values, as DeepSpeed's do: its engine casts the module to
bf16/fp16 before its optimizer copies the masters from it, so master = fp32(bf16(w)). Taken from w
itself, a master starts up to half an ulp away and the updated weights round differently from the
first step on (`master_values`).

Gradient accumulation across micro-steps (DeepSpeed's `data_types.grad_accum_dtype`, default: the
model's dtype): by default gradients accumulate in the 2-byte dtype at every stage, as DeepSpeed's
do. With `"fp32"` (ZeRO only): ZeRO-1 adds each micro-step's gradient into an fp32 buffer, averaged
over the ranks at the boundary (DeepSpeed's BF16_Optimizer, zero/stage1.py); ZeRO-2/3 add each
micro-step's averaged gradient into fp32 shards (zero/stage2.py). `accumulation_dtype` reads the key.
At stage 0, bf16/fp16 also take DeepSpeed's zero-gradient optimizer step at init (data_parallel.py).
tests/test_examples.py checks all of it against DeepSpeed 0.19.8, bit for bit.
"""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def master_values(tensors, model_dtype) -> list:
    """The values the fp32 masters are copied from: each tensor rounded to the model's dtype (a
    no-op in fp32), so that master = fp32(bf16(w)) exactly as in DeepSpeed."""
    return [t.detach().to(model_dtype) for t in tensors]


def accumulation_dtype(data_types_config):
    """`data_types.grad_accum_dtype` as a torch dtype; None (DeepSpeed's default) means the model's."""
    name = data_types_config.grad_accum_dtype
    return None if name is None else DTYPES[name]


class LossScaleAtMinimumError(RuntimeError):
    """The gradients overflow at min_loss_scale: DeepSpeed stops the run here too (ZeRO path)."""


class DynamicLossScaler:
    def __init__(self, init_scale=2.0 ** 16, scale_window=1000, hysteresis=2, consecutive_hysteresis=False,
                 min_scale=1.0, scale_factor=2.0, raise_below_minimum=True):
        self.cur_scale = float(init_scale)
        self.scale_window, self.hysteresis = scale_window, hysteresis
        self.consecutive_hysteresis, self.min_scale = consecutive_hysteresis, float(min_scale)
        self.scale_factor, self.raise_below_minimum = scale_factor, raise_below_minimum
        self.cur_iter, self.last_overflow_iter, self.cur_hysteresis = 0, -1, hysteresis
        self.dynamic = True

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.hysteresis == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_below_minimum:
                    raise LossScaleAtMinimumError(
                        f"Current loss scale already at minimum ({self.min_scale:g}) - cannot decrease scale "
                        f"anymore: the gradients overflow (inf/nan) even at the smallest scale allowed. Look "
                        f"for the inf/nan in the loss or the data, lower the learning rate, or lower "
                        f"fp16.min_loss_scale")
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.hysteresis
            good_steps_before_this = self.cur_iter - self.last_overflow_iter - 1
            if good_steps_before_this > 0 and good_steps_before_this % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.hysteresis
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict:
        return dict(cur_scale=self.cur_scale, cur_iter=self.cur_iter,
                    last_overflow_iter=self.last_overflow_iter, cur_hysteresis=self.cur_hysteresis)

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if "delayed_shift" in state:  # the name earlier ds_lab checkpoints used
            state["cur_hysteresis"] = state.pop("delayed_shift")
        for key in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis"):
            setattr(self, key, state[key])


class StaticLossScaler(DynamicLossScaler):
    """`fp16.loss_scale` > 0: a fixed scale; overflows still skip the step."""

    def __init__(self, scale: float):
        super().__init__(init_scale=scale)
        self.dynamic = False

    def update_scale(self, overflow: bool) -> None:
        self.cur_iter += 1


def make_loss_scaler(fp16_config, use_hysteresis: bool = True, raise_below_minimum: bool = True):
    """The scaler an `fp16` config section asks for (None when fp16 is off).

    What differs between DeepSpeed's two fp16 paths is passed by the engine's mode:
    ZeRO stages 1-3: use_hysteresis=True, raise_below_minimum=True (the defaults);
    stage 0:         use_hysteresis=False, raise_below_minimum=False.
    """
    if not fp16_config.enabled:
        return None
    if fp16_config.loss_scale and fp16_config.loss_scale > 0:
        return StaticLossScaler(fp16_config.loss_scale)
    return DynamicLossScaler(init_scale=2.0 ** fp16_config.initial_scale_power,
                             scale_window=fp16_config.loss_scale_window,
                             hysteresis=fp16_config.hysteresis if use_hysteresis else 1,
                             consecutive_hysteresis=fp16_config.consecutive_hysteresis and use_hysteresis,
                             min_scale=fp16_config.min_loss_scale,
                             raise_below_minimum=raise_below_minimum)


def has_overflow(tensors) -> bool:
    """True if any tensor holds an inf or a nan (one fused reduction, one sync)."""
    flags = [torch.logical_not(torch.isfinite(t)).any() for t in tensors]
    return bool(torch.stack(flags).any()) if flags else False


def cast_inputs_half(inputs):
    """`fp16.auto_cast`: every floating-point tensor in forward's positional inputs becomes fp16,
    inside lists, tuples and dicts too (DeepSpeed's engine._cast_inputs_half)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.half() if inputs.is_floating_point() else inputs
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(cast_inputs_half(x) for x in inputs)
    if isinstance(inputs, dict):
        return {k: cast_inputs_half(v) for k, v in inputs.items()}
    return inputs
