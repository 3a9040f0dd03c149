"""Optimizers over (flat) fp32 parameters."""
from ds_lab.optim.adam import Adam, build_optimizer

__all__ = ["Adam", "build_optimizer"]
