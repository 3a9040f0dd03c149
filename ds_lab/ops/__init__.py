"""Fused kernels: kernels/*.cu run by CuPy on a GPU, by the CPU emulation anywhere, with a torch
reference of each (ds_lab/ops/backend.py says which runs)."""
from ds_lab.ops.backend import BACKENDS, BackendError, poison_outputs, resolve, set_fused_kernels

GELU_APPROXIMATE = "tanh"  # GPT-2's GeLU; "none" for the exact erf form (read at every call)

__all__ = ["BACKENDS", "BackendError", "GELU_APPROXIMATE", "poison_outputs", "resolve", "set_fused_kernels"]
