"""Fused kernels: kernels/*.cu run by CuPy on a GPU, by the CPU emulation anywhere, with a torch
reference of each (ds_lab/ops/backend.py says which runs).

    ds_lab.ops.layer_norm(x, weight, bias, eps=1e-5, backend=None)    LayerNorm, differentiable
    ds_lab.ops.bias_gelu(x, bias, backend=None)                       gelu(x + bias), differentiable
    ds_lab.ops.causal_softmax(scores, backend=None)                   softmax, upper triangle masked
    ds_lab.ops.fused_adam_step(params, grads, m, v, *, lr, ...)       one Adam/AdamW step, all tensors
    ds_lab.ops.pack_with_error(buffer, error) / unpack_scaled(...)    1-bit Adam's compression

backend: "cuda" (kernels/*.cu via CuPy), "emulate" (the same .cu on the CPU, ops/emulate.py),
"torch" (the reference), or None: the best available ("cuda" on a GPU with CuPy, else "torch").
"""
import sys
import types

from ds_lab.ops import gelu as _gelu
from ds_lab.ops.backend import BACKENDS, BackendError, poison_outputs, resolve, set_fused_kernels
from ds_lab.ops.fused_adam import fused_adam_step
from ds_lab.ops.gelu import bias_gelu
from ds_lab.ops.norm import layer_norm
from ds_lab.ops.sign_pack import pack_with_error, unpack_scaled
from ds_lab.ops.softmax import causal_softmax
from ds_lab.ops import adam  # noqa: E402  deepspeed.ops.adam.FusedAdam / DeepSpeedCPUAdam (ops/adam/)

GELU_APPROXIMATE = "tanh"  # GPT-2's GeLU; "none" for the exact erf form (read at every call)


class _Ops(types.ModuleType):
    """`ds_lab.ops.GELU_APPROXIMATE = "none"` is checked and reaches the op at once."""

    def __setattr__(self, name, value):
        if name == "GELU_APPROXIMATE":
            _gelu.set_approximate(value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Ops

__all__ = ["BACKENDS", "BackendError", "GELU_APPROXIMATE", "bias_gelu", "causal_softmax", "fused_adam_step",
           "layer_norm", "pack_with_error", "poison_outputs", "resolve", "set_fused_kernels", "unpack_scaled"]
