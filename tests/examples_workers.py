"""Workers for tests/test_examples.py: the bf16 gradient-accumulation arithmetic of ZeRO 1, 2 and 3."""
import copy

import torch

import ds_lab
from ds_lab.utils import safe_get_full_grad

MICRO_STEPS, WORLD = 4, 2
bf16 = torch.bfloat16


def _batch(rank: int, micro: int):
    generator = torch.Generator().manual_seed(100 * rank + micro)
    return torch.randn(3, 8, generator=generator).to(bf16), torch.randn(3, 4, generator=generator)


def _loss(model, x, y):
    return ((model(x).float() - y) ** 2).mean()


def _micro_grads(reference):
    """Every rank's every micro-step gradient (bf16, of loss / accumulation steps), computed here alone."""
    grads = {}
    for rank in range(WORLD):
        for micro in range(MICRO_STEPS):
            reference.zero_grad(set_to_none=True)
            (_loss(reference, *_batch(rank, micro)) / MICRO_STEPS).backward()
            grads[rank, micro] = [p.grad.clone() for p in reference.parameters()]
    return grads


def expected_gradient(grads, stage: int, accum):
    """DeepSpeed 0.19.8's averaged gradient, written out per parameter:
    stage 1, bf16 accumulation: each rank sums its micro-steps in bf16, / N in bf16, sum over ranks in bf16
    stage 1, fp32 (BF16_Optimizer): each rank sums in fp32, cast to bf16, sum over ranks, x 1/N, in bf16
    stages 2, 3: every micro-step is / N and summed over ranks in bf16, then added into the shard's dtype
    (stage_1_and_2.average_tensor; stage3.partition_grads adds into its fp32 or bf16 partition)."""
    result = []
    for i in range(len(grads[0, 0])):
        g = {key: value[i] for key, value in grads.items()}
        if stage == 1 and accum is None:
            local = [g[r, 0] for r in range(WORLD)]
            for m in range(1, MICRO_STEPS):
                local = [local[r] + g[r, m] for r in range(WORLD)]  # bf16 + bf16 -> bf16
            wire = [x / WORLD for x in local]
            total = wire[0]
            for x in wire[1:]:
                total = total + x
        elif stage == 1:
            local = [sum((g[r, m].float() for m in range(1, MICRO_STEPS)), g[r, 0].float()) for r in range(WORLD)]
            total = local[0].to(bf16)
            for x in local[1:]:
                total = total + x.to(bf16)
            total = total * (1.0 / WORLD)
        else:
            total = torch.zeros_like(g[0, 0], dtype=torch.float32 if accum == "fp32" else bf16)
            for m in range(MICRO_STEPS):
                reduced = g[0, m] / WORLD
                for r in range(1, WORLD):
                    reduced = reduced + g[r, m] / WORLD
                total = total + reduced.to(total.dtype)
        result.append(total.float())
    return result


def accumulation_worker(cases):
    """For each (stage, grad_accum_dtype): the engine's averaged gradients at the boundary, and the
    expected ones, as (max abs difference, max abs gradient) per case."""
    rank = ds_lab.comm.get_rank()
    out = {}
    for stage, accum in cases:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        reference = copy.deepcopy(model).to(bf16)
        config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": MICRO_STEPS,
                  "bf16": {"enabled": True}, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                  "zero_optimization": {"stage": stage}}
        if accum is not None:
            config["data_types"] = {"grad_accum_dtype": accum}
        engine, *_ = ds_lab.initialize(model=model, config=config)
        for micro in range(MICRO_STEPS):
            engine.backward(_loss(engine, *_batch(rank, micro)))
            if micro < MICRO_STEPS - 1:
                engine.step()
        ours = [safe_get_full_grad(p) for p in model.parameters()]
        engine.step()
        expected = expected_gradient(_micro_grads(reference), stage, accum)
        diff = max((a - b).abs().max().item() for a, b in zip(ours, expected))
        out[f"{stage}/{accum}"] = (diff, max(b.abs().max().item() for b in expected))
    return out
