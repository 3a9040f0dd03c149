"""`deepspeed.checkpointing`: DeepSpeed's activation-checkpointing module, under the name scripts import.

    import ds_lab as deepspeed
    deepspeed.checkpointing.configure(mpu, deepspeed_config=args.deepspeed_config)
    hidden = deepspeed.checkpointing.checkpoint(layer, hidden)

The implementation and what each option does here: ds_lab/runtime/activation_checkpointing.py.
"""
from ds_lab.runtime.activation_checkpointing import (CheckpointFunction, checkpoint, configure, get_cuda_rng_tracker,
                                                     is_configured, model_parallel_cuda_manual_seed,
                                                     partition_activations_in_checkpoint, reset, set_num_layers)

__all__ = ["CheckpointFunction", "checkpoint", "configure", "get_cuda_rng_tracker", "is_configured",
           "model_parallel_cuda_manual_seed", "partition_activations_in_checkpoint", "reset", "set_num_layers"]
