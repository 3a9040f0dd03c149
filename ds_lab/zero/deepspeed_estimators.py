"""DeepSpeed's own memory estimators, by their names: what to provision, not what ZeRO saves.

    from ds_lab.zero.estimate import estimate_zero2_model_states_mem_needs_all_cold
    estimate_zero2_model_states_mem_needs_all_cold(total_params=7.5e9, num_gpus_per_node=8)

DeepSpeed prints these tables from deepspeed/runtime/zero/stage_1_and_2.py and stage3.py. Their
numbers are provisioning guesses, not ZeRO's formula (that is `ds_lab.zero.estimate`): a 1.5x
buffer factor on CPU memory, fp32 gradients (18 = 2 + 4 + 4 + 8 bytes per partitioned parameter),
the largest layer all-gathered in fp32 for ZeRO-3, and GiB (2**30 bytes) printed as "GB". We
reproduce them, columns and all, so the two can be compared line by line.
"""
from __future__ import annotations

# DeepSpeed's columns are always GiB printed as "GB", 2 decimals: a fixed layout reproduced as is
# (ds_lab.units.format_bytes, which picks the unit, serves every other byte count).
_GIB = 2 ** 30


def _deepspeed_header(total_params, num_gpus_per_node, num_nodes, largest_layer_params=None) -> str:
    nodes = "nodes" if num_nodes > 1 else "node"
    gpus = "GPUs" if num_gpus_per_node > 1 else "GPU"
    model = f"SW: Model with {int(total_params / 1e6)}M total params"
    if largest_layer_params is not None:
        model += f", {int(largest_layer_params / 1e6)}M largest layer params"
    return ("Estimated memory needed for params, optim states and gradients for a:\n"
            f"HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} {gpus} per node.\n"
            f"{model}.\n"
            "  per CPU  |  per GPU |   Options")


def _deepspeed_row(row: dict) -> str:
    return f" {row['per_cpu'] / _GIB:7.2f}GB | {row['per_gpu'] / _GIB:6.2f}GB | {row['options']}"


def _device(offloaded: bool) -> str:
    return "cpu " if offloaded else "none"  # padded to line up, as DeepSpeed does


def estimate_zero2_model_states_mem_needs_all_cold(total_params, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5) -> list[dict]:
    """Print DeepSpeed's ZeRO-2 memory table for a model of total_params; return its rows.

    offload_optimizer=cpu: the GPU keeps 16-bit params (2Ψ); the CPU keeps the optimizer side,
    max(4·total_gpus, 16)·Ψ·buffer factor bytes. offload_optimizer=none: the GPU keeps
    2Ψ + 18Ψ/total_gpus (16-bit params, then 16- and 32-bit grads, fp32 master and m, v
    partitioned); the CPU needs 4Ψ per GPU of the node to load the model, times the factor.
    Each row: {"offload_optimizer", "per_cpu", "per_gpu", "options"}, bytes.
    """
    total_gpus = num_nodes * num_gpus_per_node
    rows = []
    for offload in (True, False):
        if offload:
            per_gpu = 2 * total_params
            per_cpu = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
        else:
            per_gpu = 2 * total_params + int(18 * total_params / total_gpus)
            per_cpu = total_params * 4 * num_gpus_per_node * additional_buffer_factor
        rows.append(dict(offload_optimizer=_device(offload).strip(), per_cpu=int(per_cpu), per_gpu=int(per_gpu),
                         options=f"offload_optimizer={_device(offload)}"))
    print(_deepspeed_header(total_params, num_gpus_per_node, num_nodes))
    for row in rows:
        print(_deepspeed_row(row))
    return rows


def estimate_zero3_model_states_mem_needs_all_cold(total_params, largest_layer_params, num_gpus_per_node: int = 1,
                                                   num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5) -> list[dict]:
    """Print DeepSpeed's ZeRO-3 memory table; return its rows.

    Every option keeps the largest layer gathered on the GPU in fp32-sized room: 4·largest_layer.
    Without offload the GPU adds 18Ψ/total_gpus. With the optimizer offloaded and params on the
    GPU it adds the 16-bit param shard 2Ψ/total_gpus; the node's CPU holds 16Ψ (18Ψ when params
    are offloaded too) divided across nodes, times the buffer factor. zero_init=0 means every GPU
    process loads the whole model on the CPU first (4Ψ per GPU of the node), so the CPU needs at
    least that. Each row: {"offload_param", "offload_optimizer", "zero_init", "per_cpu", "per_gpu",
    "options"}, bytes.
    """
    total_gpus = num_nodes * num_gpus_per_node
    per_node = total_params / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    rows = []
    for offload_optimizer, offload_param in ((True, True), (True, False), (False, False)):
        for zero_init in (True, False):
            if offload_param:
                per_gpu = largest_layer_memory
                per_cpu = per_node * 18 if zero_init else total_params * max(4 * num_gpus_per_node, 18 / num_nodes)
            elif offload_optimizer:
                per_gpu = largest_layer_memory + int(2 * total_params / total_gpus)
                per_cpu = per_node * 16 if zero_init else total_params * max(4 * num_gpus_per_node, 16 / num_nodes)
            else:
                per_gpu = largest_layer_memory + int(18 * total_params / total_gpus)
                per_cpu = (largest_layer_params if zero_init else total_params) * 4 * num_gpus_per_node
            options = (f"offload_param={_device(offload_param)}, offload_optimizer={_device(offload_optimizer)}, "
                       f"zero_init={int(zero_init)}")
            rows.append(dict(offload_param=_device(offload_param).strip(),
                             offload_optimizer=_device(offload_optimizer).strip(), zero_init=zero_init,
                             per_cpu=int(per_cpu * additional_buffer_factor), per_gpu=int(per_gpu), options=options))
    print(_deepspeed_header(total_params, num_gpus_per_node, num_nodes, largest_layer_params))
    for row in rows:
        print(_deepspeed_row(row))
    return rows
