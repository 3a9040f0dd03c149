"""Measured vs the ZeRO paper, for every stage at world sizes 2, 3 and 4 (bf16 mixed precision).

    .venv/bin/python scripts/measure_zero.py            # about a minute on 2 CPU cores

For each (stage, N): the model-state bytes one rank holds, from `engine.memory_report()`, beside
`estimate_ledger` (the paper's formula), and the bytes each rank put on the wire in one step,
divided by data parallel's (stage 0) at the same N. Also the largest loss difference of each stage
from stage 0 over a few steps (fp32, so equality means 1e-7, not bf16 rounding).
"""
from __future__ import annotations

import torch

import ds_lab
from ds_lab import comm
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.models import GPT, GPTConfig
from ds_lab.zero.estimate import estimate_ledger

MODEL = dict(vocab_size=257, block_size=32, n_layer=4, n_head=4, n_embd=256, tie_weights=False)
TAGS = ("grad_allreduce", "grad_reduce_scatter", "param_allgather")
STATES = ("params", "grads", "master_params", "optimizer_states")


def worker(stage, precision, steps=3, global_batch=12):
    torch.manual_seed(0)
    config = {"train_batch_size": global_batch, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              # reuse distance 0: stage 3 gathers every module in forward and again in backward (the paper's 1.5x)
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                    "stage3_max_reuse_distance": 0}}
    if precision != "fp32":
        config[precision] = {"enabled": True}
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**MODEL)), config=config)
    loader = DistributedLoader(corpus_tokens(), MODEL["block_size"], engine.train_micro_batch_size_per_gpu(),
                               dp_rank=engine.dp_rank, dp_size=engine.dp_world_size, seed=3)
    losses, wire = [], 0.0
    for i in range(steps):
        comm.reset_log()
        loss = engine(**loader.batch(i)).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().reshape(1)
        comm.all_reduce(mean)
        losses.append(mean.item() / comm.get_world_size())
        wire = sum(r.wire_bytes for r in comm.get_log() if r.tag in TAGS)
    return dict(memory=engine.memory_report(), psi=engine.num_parameters(), wire=wire, losses=losses)


def main():
    print(f"{'N':>2} {'stage':>5} {'measured B/rank':>16} {'formula B/rank':>15} {'diff':>7} "
          f"{'wire B/step':>12} {'/ stage 0':>9} {'max loss diff vs stage 0 (fp32)':>32}")
    for n in (2, 3, 4):
        wire0 = losses0 = None
        for stage in (0, 1, 2, 3):
            r = ds_lab.launch(worker, n, stage, "bf16")[0]
            measured = sum(r["memory"][k] for k in STATES)
            formula = estimate_ledger(r["psi"], n, stage, precision="bf16")["total"]
            fp32 = ds_lab.launch(worker, n, stage, "fp32")[0]["losses"]
            wire0 = r["wire"] if stage == 0 else wire0
            losses0 = fp32 if stage == 0 else losses0
            diff = max(abs(a - b) / abs(b) for a, b in zip(fp32, losses0))
            print(f"{n:>2} {stage:>5} {measured:>16,} {formula:>15,} {100 * (measured - formula) / formula:>6.2f}% "
                  f"{r['wire']:>12,.0f} {r['wire'] / wire0:>9.3f} {diff:>32.1e}")
    print(f"\nΨ = {r['psi']:,} parameters; model states = params + grads + fp32 master + Adam m, v")


if __name__ == "__main__":
    main()
