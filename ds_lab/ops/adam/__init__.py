"""DeepSpeed's hand-built Adam optimizers, `deepspeed.ops.adam.FusedAdam` and `DeepSpeedCPUAdam`.

    from ds_lab.ops.adam import FusedAdam
    optimizer = FusedAdam(model.parameters(), lr=1e-3, weight_decay=0.01)   # AdamW by default
    engine, optimizer, _, _ = ds_lab.initialize(model=model, optimizer=optimizer, config=config)

Both are torch.optim.Optimizers with DeepSpeed's constructor signatures and defaults whose update is
`ds_lab.ops.fused_adam_step`: the multi-tensor kernel (kernels/fused_adam.cu) on a GPU with CuPy,
torch's `_foreach` ops otherwise, the same math as ds_lab.optim.Adam and torch.optim.Adam/AdamW.
"""
from ds_lab.ops.adam.cpu_adam import DeepSpeedCPUAdam
from ds_lab.ops.adam.fused_adam import FusedAdam

__all__ = ["FusedAdam", "DeepSpeedCPUAdam"]
