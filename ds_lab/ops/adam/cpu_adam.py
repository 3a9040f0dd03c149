"""`DeepSpeedCPUAdam` (DeepSpeed's deepspeed/ops/adam/cpu_adam.py): Adam/AdamW for parameters in host memory.

DeepSpeed runs it with a vectorised C++ kernel (ZeRO-Offload's optimizer step); ds_lab's update is
`ds_lab.ops.fused_adam_step` on the CPU (torch's `_foreach` ops), the same math as
torch.optim.AdamW (adamw_mode=True, the default) or torch.optim.Adam with L2 weight decay.
DeepSpeed's signature and defaults; note the keyword is `adamw_mode` here and `adam_w_mode` in FusedAdam,
as in DeepSpeed. `fp32_optimizer_states=False` keeps the moments in the parameter's dtype.
Departures: DeepSpeed keeps one step count per parameter (state["step"]); ds_lab keeps the group's
(they are equal unless a parameter skips steps), and tensors on a GPU are accepted (DeepSpeed's
kernel reads host memory only).
"""
from __future__ import annotations

from ds_lab.ops.adam.fused_adam import _MultiTensorAdam, _refuse_amsgrad


class DeepSpeedCPUAdam(_MultiTensorAdam):
    optimizer_id = 0

    def __init__(self, model_params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0, amsgrad=False, adamw_mode=True, fp32_optimizer_states=True):
        _refuse_amsgrad("DeepSpeedCPUAdam", amsgrad)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, amsgrad=amsgrad)
        super().__init__(model_params, defaults)
        self.opt_id = DeepSpeedCPUAdam.optimizer_id
        DeepSpeedCPUAdam.optimizer_id += 1
        self.adam_w_mode = adamw_mode
        self.fp32_optimizer_states = fp32_optimizer_states

    def add_param_group(self, param_group):
        _refuse_amsgrad("DeepSpeedCPUAdam", param_group.get("amsgrad", self.defaults.get("amsgrad", False)))
        super().add_param_group(param_group)
