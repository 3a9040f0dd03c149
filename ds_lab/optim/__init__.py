"""Optimizers over (flat) fp32 parameters, and the one function that builds the one a config names.

    adam.py          Adam / AdamW (8 bytes of state per parameter)
    lamb.py          LAMB: Adam's direction scaled per tensor by a clamped trust ratio (DeepSpeed's FusedLamb)
    onebit_adam.py   1-bit Adam: Adam warmup, then frozen variance and 1-bit compressed momentum
    sign.py          SignAdam (the article's §4.4 rule) and signSGD with majority vote
"""
from ds_lab.optim.adam import Adam
from ds_lab.optim.lamb import Lamb
from ds_lab.optim.onebit_adam import OneBitAdam
from ds_lab.optim.sign import SignAdam, SignSGD

__all__ = ["Adam", "Lamb", "OneBitAdam", "SignAdam", "SignSGD", "build_optimizer"]


def build_optimizer(optimizer_config, params, group=None):
    """The optimizer a config names, over `params`. `group`: the data-parallel process group, for
    the optimizers that communicate themselves (OneBitAdam, SignSGD). `ds_lab.config` has already
    resolved DeepSpeed's rule that "Adam" means decoupled weight decay unless `adam_w_mode` is false.
    Adam's `torch_adam: true` (DeepSpeed: torch.optim.Adam/AdamW instead of FusedAdam) selects the torch
    reference path of the same update (no fused kernel): ds_lab's Adam is numerically torch's."""
    kind, options = optimizer_config.type, dict(optimizer_config.params)
    if kind == "OneBitAdam":
        return OneBitAdam(params, group=group, **options)
    if kind == "SignSGD":
        return SignSGD(params, group=group, **options)
    if kind == "SignAdam":
        return SignAdam(params, **options)
    if kind == "Lamb":
        return Lamb(params, **options)
    return Adam(params, adam_w_mode=kind == "AdamW", **options)
