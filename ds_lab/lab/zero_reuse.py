"""ZeRO-3's traffic against `stage3_max_reuse_distance`, measured on real ranks and predicted apart.

    from ds_lab.lab.zero_reuse import traffic_by_reuse_distance, last_block_distance
    table = traffic_by_reuse_distance([0, last_block_distance(), 10**9], world_size=2)

A unit (a module's own parameters) stays whole from forward to backward when fewer than D elements
are used between its forward and its next use (ds_lab/zero/reuse.py, DeepSpeed's rule); backward then
gathers only the others. The prediction here does not ask the engine: it runs the model once on this
process with hooks of its own to learn which modules run in which order, takes each module's own
parameter sizes, and walks forward then backward keeping count. D = 0 is the ZeRO paper's 1.5x data
parallel; DeepSpeed's default, 1e9, keeps a small model whole: 1x. The step that records the module
order (the first) gathers everything twice, so each measurement is the last step's.

Measured against DeepSpeed 0.19.8 (4 Linear(16, 16), 2 ranks, persistence 0, prefetch 0): all-gathered
elements per step 2048 at D = 0; 1792 at D = 1, 256 and 512 (only the last Linear kept: the fourth's
forward and backward, 512 elements, lie between the third's forward and its backward, and 512 < 512
fails); 1536 at D = 513; 1024 at 1e9.
DeepSpeed also keeps a parameter whose later use its prefetcher has already walked past, so with its
default prefetch bucket (larger than this model) it keeps everything even at D = 0; ds_lab's
prefetch does not keep anything, and D alone decides.
"""
from __future__ import annotations

import torch

import ds_lab
from ds_lab import comm
from ds_lab.lab.measure import padded
from ds_lab.lab.workers import global_losses, rows_of
from ds_lab.models import GPT, GPTConfig

CHAPTER_MODEL = dict(n_layer=4, n_head=4, n_embd=192, block_size=64, tie_weights=False)  # chapter 03's MODEL
WIDTH = {"bf16": 2, "fp32": 4}


def _trace(model: torch.nn.Module) -> tuple:
    """({unit name: elements}, [units each module call uses, forward then backward]) from one forward
    on this process. A unit is named after the module that first registers its parameters (a tied
    matrix belongs to the first module holding it, as in ds_lab/zero/stage3_units.py)."""
    owner, sizes, calls, hooks = {}, {}, [], []
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p not in owner:
                owner[p] = name
                sizes[name] = sizes.get(name, 0) + p.numel()
    for name, module in model.named_modules():
        used = sorted({owner[p] for p in module.parameters(recurse=False)}, key=list(sizes).index)
        if used:
            hooks.append(module.register_forward_pre_hook(lambda m, a, used=used: calls.append(used)))
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long))
    for hook in hooks:
        hook.remove()
    return sizes, calls + calls[::-1]


def predict_allgather_bytes(distance: int, world_size: int = 2, model: dict = None, precision: str = "bf16",
                            recorded: bool = True) -> dict:
    """All-gathered message bytes of one ZeRO-3 step (persistence threshold 0), by pass. `recorded`:
    a step after the first (the first records the order and keeps nothing)."""
    sizes, trace = _trace(GPT(GPTConfig(**(model or CHAPTER_MODEL))))
    forward_calls, whole, sent = len(trace) // 2, set(), {"forward": 0, "backward": 0}
    for i, used in enumerate(trace):
        for unit in used:
            if unit not in whole:
                sent["forward" if i < forward_calls else "backward"] += WIDTH[precision] * padded(sizes[unit], world_size)
                whole.add(unit)
        for unit in used:
            later = [j for j in range(i + 1, len(trace)) if unit in trace[j]]
            if i >= forward_calls:  # backward: a unit goes once its gradients are in (its last use)
                keep = bool(later)
            else:
                between = sum(sizes[u] for j in range(i + 1, later[0]) for u in trace[j]) if later else None
                keep = recorded and between is not None and between < distance
            if not keep:
                whole.discard(unit)
    return dict(sent, total=sent["forward"] + sent["backward"])


def last_block_distance(model: dict = None) -> int:
    """The largest D that keeps the last block (and ln_f, lm_head) whole and nothing before it:
    between the last module before the block and its backward lie the block, ln_f and lm_head twice."""
    gpt = GPT(GPTConfig(**(model or CHAPTER_MODEL)))
    after = [gpt.blocks[-1], gpt.ln_f, gpt.lm_head]
    return 2 * sum(p.numel() for m in after for p in m.parameters())


def reuse_worker(configs: list, batches: list, model: dict) -> list:
    """Each config trains a fresh GPT (seed 0) on `batches`; per step every collective's message
    bytes, by tag, all records summed (the rest are scalars: overflow flag, norms), and the losses."""
    rank, world_size = comm.get_rank(), comm.get_world_size()
    out = []
    for config in configs:
        torch.manual_seed(0)
        engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**model)), config=config)
        run = dict(losses=[], steps=[])
        for batch in batches:
            mark = comm.record_count()
            x = rows_of(batch, rank, world_size)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            records = comm.get_log(since=mark)
            tags = {r.tag for r in records}
            run["steps"].append(dict(total=sum(r.bytes for r in records),
                                     **{tag: sum(r.bytes for r in records if r.tag == tag) for tag in tags}))
            run["losses"].append(loss.float().item())
        out.append(run)
    return out


def reuse_config(distance: int, world_size: int, precision: str = "bf16") -> dict:
    return {"train_batch_size": 2 * world_size, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "bf16": {"enabled": precision == "bf16"},
            "zero_optimization": {"stage": 3, "reduce_bucket_size": 100_000, "stage3_param_persistence_threshold": 0,
                                  "stage3_max_reuse_distance": distance}}


def traffic_by_reuse_distance(distances, world_size: int = 2, model: dict = None, steps: int = 2,
                              precision: str = "bf16") -> dict:
    """{D: {"allgather_bytes", "total_bytes", "ratio_to_dp", "losses", "predicted_allgather_bytes"}}
    measured on `world_size` real ranks (one launch), the bytes of the last step. ratio_to_dp: the
    step's all-gather and reduce-scatter bytes over data parallel's all-reduce, 2Ψ model-dtype elements
    (both carry the same (N-1)/N ring factor)."""
    model = model or CHAPTER_MODEL
    g = torch.Generator().manual_seed(0)
    vocab = GPTConfig(**model).vocab_size
    batches = [torch.randint(0, vocab, (2 * world_size, model["block_size"]), generator=g) for _ in range(steps)]
    configs = [reuse_config(d, world_size, precision) for d in distances]
    ranks = ds_lab.launch(reuse_worker, world_size, configs, batches, model)
    psi = GPT(GPTConfig(**model)).num_parameters()
    table = {}
    for i, d in enumerate(distances):
        runs = [rank_runs[i] for rank_runs in ranks]
        last = runs[0]["steps"][-1]
        gathered = last.get("param_allgather", 0)
        table[d] = dict(allgather_bytes=gathered, total_bytes=last["total"],
                        ratio_to_dp=(gathered + last.get("grad_reduce_scatter", 0)) / (2 * WIDTH[precision] * psi),
                        losses=global_losses(runs),
                        predicted_allgather_bytes=predict_allgather_bytes(d, world_size, model, precision)["total"],
                        first_step_allgather_bytes=runs[0]["steps"][0].get("param_allgather", 0),
                        per_rank_allgather_bytes=[r["steps"][-1].get("param_allgather", 0) for r in runs])
    return table
