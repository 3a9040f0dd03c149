"""A config advisor: (model, GPUs, memory per GPU) -> a DeepSpeed config, with its reasons (chapter 11).

    advice = recommend(7.5e9, gpus=64, gpu_memory=80e9, layers=32, hidden=4096, seq_len=2048)
    print(advice.explain())
    engine, *_ = ds_lab.initialize(model=model, config=advice.config)

The rules, in order, each checked by the estimator of chapter 3 (`ds_lab.zero.estimate`):

1. Precision: bf16 where the hardware has it (A100, H100, CPUs), else fp16 with dynamic loss
   scaling. Either way the model states are 16 bytes per parameter: 2 + 2 + K with K = 12.
2. Budget: gpu_memory x (1 - reserve). The reserve (default 20 %) is for what the estimator does
   not count: communication buckets, ZeRO-3's gathered layers, the allocator's fragmentation,
   the CUDA context. The ZeRO paper's measured model sizes sit about that far below its theory
   (Rajbhandari et al. 2020, Table 2: 6.2 B measured against 7.6 B for P_os at 64 GPUs).
3. ZeRO stage: the lowest stage whose model states (`estimate_ledger`) plus the activations of
   one micro batch (`estimate_activations`) fit in the budget. A lower stage sends fewer bytes:
   stages 0-2 move 2(N-1)/N x 2Ψ per step, stage 3 moves 3(N-1)/N x 2Ψ.
4. Offload: never chosen. Offloading trades the GPU's memory for PCIe traffic and a host-side
   optimizer step, so it is the last resort; where even stage 3 at micro batch 1 does not fit, the
   advisor raises `AdvisorError` and names what would (more GPUs, activation checkpointing, tensor
   or pipeline parallelism, or `zero_optimization.offload_optimizer`, which ds_lab has).
5. Micro batch: the largest power of two (up to `max_micro_batch`) whose activations still fit next
   to the model states; with a `global_batch`, one that divides global_batch / GPUs, and gradient
   accumulation makes up the rest.

Also here: `monitored_train`, the rank function of chapter 11's monitored run (losses, the comm
log's DeepSpeed-style table, the memory ledger).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import ds_lab
from ds_lab import comm
from ds_lab.units import format_bytes
from ds_lab.zero.estimate import estimate_activations, estimate_ledger, formula

__all__ = ["Advice", "AdvisorError", "recommend", "monitored_train"]


class AdvisorError(ValueError):
    """No config fits: the message says how far off it is and what would make it fit."""


@dataclass
class Advice:
    config: dict
    stage: int
    micro_batch: int
    accumulation: int
    precision: str
    states_bytes: int
    activation_bytes: int
    budget: float
    reasons: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.states_bytes + self.activation_bytes

    def explain(self) -> str:
        return "\n".join([f"ZeRO stage {self.stage}, micro batch {self.micro_batch} x accumulation "
                          f"{self.accumulation}, {self.precision}, offload none: "
                          f"{format_bytes(self.total_bytes)} of a {format_bytes(self.budget)} budget per GPU"]
                         + [f"  - {reason}" for reason in self.reasons])


def _activations(micro_batch, seq_len, hidden, layers, heads, vocab_size, checkpointing) -> int:
    # heads=None: the attention keeps no s x s scores (FlashAttention, torch's SDPA); dropout on
    # only when the scores are kept, i.e. a classic GPT; ds_lab's GPT has neither.
    return estimate_activations(micro_batch, seq_len, hidden, layers, num_heads=heads, vocab_size=vocab_size,
                                bytes_per_element=2, checkpointing=checkpointing,
                                dropout=heads is not None)["total"]


def recommend(num_params, gpus: int, gpu_memory: float, *, layers: int, hidden: int, seq_len: int,
              heads: int | None = None, vocab_size: int | None = None, global_batch: int | None = None,
              bf16_supported: bool = True, reserve: float = 0.2, checkpointing: bool = False,
              max_micro_batch: int = 32, lr: float = 1e-3) -> Advice:
    """The config the rules above give; raises AdvisorError when nothing fits."""
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve={reserve} must be a fraction in [0, 1), e.g. 0.2 keeps 20 % free")
    if global_batch is not None and global_batch % gpus:
        raise ValueError(f"global_batch {global_batch} is not a multiple of the {gpus} GPUs; "
                         f"make it one so every GPU gets whole micro batches")
    budget = gpu_memory * (1 - reserve)
    precision = "bf16" if bf16_supported else "fp16"
    per_gpu_batch = global_batch // gpus if global_batch else None

    def activations(b):
        return _activations(b, seq_len, hidden, layers, heads, vocab_size, checkpointing)

    reasons = [f"precision {precision}: " + ("the hardware has bf16, which needs no loss scaling" if bf16_supported
                                             else "no bf16 on this hardware: fp16 with dynamic loss scaling"),
               f"budget {format_bytes(gpu_memory)} x {1 - reserve:.0%} = {format_bytes(budget)} "
               f"(the rest for buckets, gathered layers, fragmentation)"]
    stage = None
    for candidate in (0, 1, 2, 3):
        states = estimate_ledger(num_params, gpus, candidate, "mixed")["total"]
        verdict = "fits" if states + activations(1) <= budget else "does not fit"
        reasons.append(f"stage {candidate}: {formula(candidate)} = {format_bytes(states)} of model states "
                       f"+ {format_bytes(activations(1))} of activations at micro batch 1: {verdict}")
        if verdict == "fits":
            stage = candidate
            break
    if stage is None:
        need = estimate_ledger(num_params, gpus, 3, "mixed")["total"] + activations(1)
        room = budget - activations(1)  # what is left for the states, 16Ψ/N at stage 3
        fix = (f"use {int(16 * num_params // room) + 1} GPUs or more" if room > 0 else
               "the activations of one micro batch alone exceed the budget: shorten the sequence")
        raise AdvisorError(
            f"{num_params:.3g} parameters do not fit on {gpus} GPUs of {format_bytes(gpu_memory)}: even ZeRO "
            f"stage 3 at micro batch 1 needs {format_bytes(need)} per GPU, the budget is {format_bytes(budget)}. "
            f"To fit: {fix}, or turn on activation checkpointing (checkpointing=True), or add tensor or "
            f"pipeline parallelism, or offload the optimizer to host memory (zero_optimization.offload_optimizer)")
    states = estimate_ledger(num_params, gpus, stage, "mixed")["total"]
    micro = 1
    while (micro * 2 <= max_micro_batch and states + activations(micro * 2) <= budget
           and (per_gpu_batch is None or per_gpu_batch % (micro * 2) == 0)):
        micro *= 2
    accumulation = per_gpu_batch // micro if per_gpu_batch else 1
    reasons.append(f"micro batch {micro}: the largest power of two whose activations "
                   f"({format_bytes(activations(micro))}) fit beside the states"
                   + (f" and divide the {per_gpu_batch} sequences per GPU" if per_gpu_batch else ""))
    reasons.append("offload: none (the states fit without it; offload is the last resort)")
    if stage == 3:
        reasons.append("stage 3 sends up to 1.5x the bytes of stages 0-2 (less where stage3_max_reuse_distance "
                       "keeps parameters gathered): prefer more GPUs per model if you have them")
    config = {"train_batch_size": micro * accumulation * gpus, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": accumulation,
              "optimizer": {"type": "AdamW", "params": {"lr": lr}},
              "zero_optimization": {"stage": stage}}
    config[precision] = {"enabled": True}
    return Advice(config, stage, micro, accumulation, precision, states, activations(micro), budget, reasons)


def monitored_train(config: dict, batches, model: dict) -> dict:
    """Train one step per global batch with `config` (the monitors it names write as it runs);
    return the losses, DeepSpeed's comm table of this rank, and the memory ledger."""
    from ds_lab.lab.workers import rows_of
    from ds_lab.models import GPT, GPTConfig
    torch.manual_seed(0)
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**model)), config=config)
    rank, world_size = comm.get_rank(), comm.get_world_size()
    losses = []
    for batch in batches:
        x = rows_of(batch, rank, world_size)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.float().item())
    return dict(losses=losses, comm_table=comm.format_summary(), memory=engine.memory_report())
