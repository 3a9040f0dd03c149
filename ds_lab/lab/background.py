"""Chapter 1's facts and measurements: how models grew, what GPUs hold, what a step computes and allocates.

    MODEL_GROWTH            (model, billions of parameters, year, who, note): the article's §1.1, dated
    GPU_MEMORY              nominal capacities, in bytes as sold (GB = 1e9) -- `gib()` converts
    count_step_flops(...)   FLOPs of one forward + backward, counted op by op by torch's FlopCounterMode
    matmul_parameters(...)  the parameters that take part in a matrix product (6 FLOPs each per token)
    step_allocations(...)   what `engine.step()` allocates beyond the ledger, per op (torch's profiler)

The ledger (`engine.memory_report()`) counts the tensors the engine holds. Two things it cannot see
are measured here instead: the temporaries an op allocates and frees inside the optimizer step
(Adam's sqrt(v) on the torch path: 4Ψ bytes for an instant), read from the profiler's record of
every allocation; and the arithmetic a step really does, to set beside 6·Ψ·tokens.
"""
from __future__ import annotations

import time

import torch

# Parameters in billions; the year the model was announced (MT-NLG: announced 2021, paper 2022).
MODEL_GROWTH = (
    ("BERT-Large", 0.34, 2018, "Google", "encoder only"),
    ("GPT-2", 1.5, 2019, "OpenAI", ""),
    ("Megatron-LM 8.3B", 8.3, 2019, "NVIDIA", "a GPT-2-like model trained with the Megatron framework"),
    ("T5-11B", 11, 2019, "Google", "encoder-decoder"),
    ("Turing-NLG", 17, 2020, "Microsoft", "trained with DeepSpeed (ZeRO) and Megatron"),
    ("GPT-3", 175, 2020, "OpenAI", ""),
    ("Gopher", 280, 2021, "DeepMind", ""),
    ("MT-NLG", 530, 2021, "Microsoft + NVIDIA", "DeepSpeed + Megatron (paper 2022)"),
    ("LaMDA", 137, 2022, "Google", "smaller than GPT-3"),
    ("PaLM", 540, 2022, "Google", ""),
)

# As sold, GB = 1e9 bytes (the ZeRO paper computes with these).
GPU_MEMORY = {"V100 32 GB": 32e9, "A100 40 GB": 40e9, "A100 / H100 80 GB": 80e9, "H200 141 GB": 141e9}


def gib(nbytes: float) -> float:
    """Bytes -> GiB (2**30 bytes): what allocators, nvidia-smi (MiB) and torch report in."""
    return nbytes / 2**30


def growth_table() -> str:
    lines = [f"{'year':<6}{'model':<18}{'parameters':>12}  {'who':<19}note"]
    for name, billions, year, who, note in sorted(MODEL_GROWTH, key=lambda row: (row[2], row[1])):
        lines.append(f"{year:<6}{name:<18}{billions:>10g} B  {who:<19}{note}")
    return "\n".join(lines)


def gpu_table() -> str:
    lines = [f"{'GPU':<20}{'bytes (GB = 1e9)':>18}{'GiB':>8}"]
    for name, nbytes in GPU_MEMORY.items():
        lines.append(f"{name:<20}{nbytes:>18,.0f}{gib(nbytes):>8.1f}")
    return "\n".join(lines)


def count_step_flops(model: torch.nn.Module, batch: dict) -> int:
    """FLOPs of one forward and backward of `model` on `batch`, summed over the ops torch counts
    (matrix products and attention; elementwise ops are not counted). Gradients are cleared after."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_parameters(model: torch.nn.Module) -> int:
    """Elements of the weights of the model's Linear layers, each storage once (an output head tied
    to the token embedding is counted once, as the head). Biases, LayerNorms and the position
    embedding take part in no matrix product, and 6·Ψ counts them anyway."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            total += module.weight.numel()
    return total


def timed_steps(engine, batches) -> list:
    """Seconds of each training step (forward, backward, optimizer step) on these batches."""
    seconds = []
    for batch in batches:
        start = time.perf_counter()
        engine.backward(engine(**batch).loss)
        engine.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def step_allocations(engine, batch, min_bytes: int = 1024) -> dict:
    """{op: bytes} that `engine.step()` allocated and freed again inside itself, per aten op, from
    torch's profiler (every allocation recorded with its op). Run on a CPU rank: on a GPU the
    profiler also reports device memory, under other keys. Ops below `min_bytes` are left out."""
    from torch.profiler import ProfilerActivity, profile
    engine.backward(engine(**batch).loss)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.step()
    out = {}
    for event in prof.key_averages():
        allocated = event.self_cpu_memory_usage
        if event.key.startswith("aten::") and allocated >= min_bytes:
            out[event.key] = out.get(event.key, 0) + allocated
    return out
