"""ds_lab tensor parallel (Megatron layers) against torch DTensor tensor parallel: same GPT, data, ranks.

    python benchmarks/tp_vs_dtensor.py                          # T=2 (gloo), GPT 4x128, 40 timed iterations
    python benchmarks/tp_vs_dtensor.py --warmup 3 --iters 40 --n-embd 256
    python benchmarks/tp_vs_dtensor.py --ds-adamw config        # ds_lab's own AdamW instead of torch's

About 16 s on 2 CPU cores at load 2.5 (one torch thread per rank); longer when the cores are more loaded.

Every rank of the world is one tensor-parallel rank (T = world size, data parallel 1). Both sides live
in the same launched processes, start from the same weights (one GPT built from the seed) and train
on the same micro-batch (tensor partners see the same data), in fp32:

    ds_lab  : initialize_model_parallel(T); GPTTP(config, full=gpt) -> ds_lab.initialize
              engine(**batch) -> engine.backward(loss) -> engine.step()
              (the engine's tensor-parallel gradient norm and clipping; optimizer: see below)
    DTensor : the plain ds_lab GPT, parallelize_module over DeviceMesh("cpu", [0..T-1]):
              attn.c_attn, mlp.c_fc: ColwiseParallel     attn.c_proj, mlp.c_proj: RowwiseParallel
              wte: RowwiseParallel (vocab rows)          lm_head: ColwiseParallel, logits Shard(-1)
              with loss_parallel(): loss = model(**batch).loss; loss.backward()
              clip_grad_norm_ (DTensor and plain gradients together) -> AdamW.step() -> zero_grad
              (AdamW in two parameter groups, DTensor and plain: a foreach kernel cannot mix them)

So the two sides shard the same tensors: Megatron's plan, which is also torchtitan's (vocabulary
split embedding and head, cross-entropy on the sharded logits without gathering them). Both
replicate the LayerNorms, the position embedding and the row-parallel biases. No sequence parallel.

The fused qkv weight. ds_lab's GPT holds q|k|v as one [3h, h] Linear. ColwiseParallel splits its rows
contiguously, which would give rank 0 all of q and half of k. ds_lab's ColumnParallelLinear(stride=3)
gives rank r the r-th chunk of each of q, k and v, that is its own heads. The DTensor side therefore
stores the fused weight rank-major, [q_0; k_0; v_0; q_1; k_1; v_1; ...], so that the contiguous split
hands each rank exactly ds_lab's shard, and its attention splits the local [3h/T] output into q, k, v
for its n_head/T heads (`RankMajorAttention`). The matmuls are the same shapes on both sides, and the
local shards of every parameter are equal elementwise, which the final check uses.

Optimizer (apples to apples): by default both sides run torch.optim.AdamW(foreach=True) with the same
hyper-parameters. ds_lab gets it as the client optimizer of ds_lab.initialize, and the engine still
does its own clipping (`gradient_clipping`, the norm summed over the tensor group). `--ds-adamw config`
gives ds_lab its own AdamW from the config instead (the same math, also `_foreach`).

Timing, ratio and correctness are as in dp_vs_ddp.py: interleaved steps, alternating order, an
untimed barrier before each; the ratio ds_lab / DTensor both as the median of per-iteration ratios
and as the ratio of medians. The losses must agree on every step and rank (relative <= 1e-4), and
the final local parameter shards are compared.

DTensor talks to torch.distributed directly (its redistributions are its own collectives); ds_lab's
tensor-parallel traffic goes through ds_lab.comm, whose log gives the collectives per step.
"""
from __future__ import annotations

import copy
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ds_lab  # noqa: E402
from ds_lab import comm  # noqa: E402
from ds_lab.data import DistributedLoader, corpus_tokens  # noqa: E402
from ds_lab.models import GPT, GPTConfig  # noqa: E402
from ds_lab.models.gpt_tp import GPTTP  # noqa: E402
from ds_lab.parallel import initialize_model_parallel  # noqa: E402
from interleave import PHASES, agreement_line, common_args, engine_step, exit_if_losses_differ, median_ms, ratio_lines, run_interleaved, training_config  # noqa: E402  (this folder is on sys.path)

LOSS_RTOL = 1e-4


def parse_args(argv=None):
    p = common_args(__doc__.splitlines()[0], n_embd=128, warmup=3, iters=40)
    p.add_argument("--ds-adamw", choices=("torch", "config"), default="torch",
                   help="ds_lab's optimizer: torch.optim.AdamW(foreach=True) as the client optimizer "
                        "(the same as the DTensor side), or the config's AdamW (ds_lab.optim)")
    return p.parse_args(argv)


def rank_major(fused: torch.Tensor, size: int) -> torch.Tensor:
    """[q; k; v] (rows) -> [q_0; k_0; v_0; q_1; ...]: contiguous chunk r is ds_lab's stride-3 shard r."""
    return torch.cat([torch.cat([part.chunk(size)[r] for part in fused.chunk(3)]) for r in range(size)])


class RankMajorAttention(nn.Module):
    """gpt.CausalSelfAttention with a rank-major fused qkv, so that ColwiseParallel gives each rank whole
    heads. Works on whatever width c_attn returns: 3h unsharded, 3h/T as a local shard."""

    def __init__(self, attn: nn.Module, head_dim: int, size: int):
        super().__init__()
        self.c_attn, self.c_proj, self.head_dim = attn.c_attn, attn.c_proj, head_dim
        with torch.no_grad():
            self.c_attn.weight.copy_(rank_major(self.c_attn.weight, size))
            if self.c_attn.bias is not None:
                self.c_attn.bias.copy_(rank_major(self.c_attn.bias, size))

    def forward(self, x):
        qkv = self.c_attn(x)  # (B, s, 3 h/T): this rank's q, k, v
        B, S, width = qkv.shape
        q, k, v = (t.view(B, S, -1, self.head_dim).transpose(1, 2) for t in qkv.split(width // 3, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, S, width // 3))


def dtensor_twin(full: GPT, mesh: DeviceMesh) -> GPT:
    """A copy of `full`, tensor-parallel through torch's parallelize_module (Megatron's plan)."""
    model, cfg = copy.deepcopy(full), full.config
    if cfg.dropout:
        raise ValueError("tp_vs_dtensor compares dropout-free models; use GPTConfig(dropout=0)")
    for block in model.blocks:
        block.attn = RankMajorAttention(block.attn, cfg.n_embd // cfg.n_head, mesh.size())
    plan = {"wte": RowwiseParallel(input_layouts=Replicate()),  # vocab rows; output all-reduced
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}  # for loss_parallel
    for i in range(cfg.n_layer):
        plan.update({f"blocks.{i}.attn.c_attn": ColwiseParallel(), f"blocks.{i}.attn.c_proj": RowwiseParallel(),
                     f"blocks.{i}.mlp.c_fc": ColwiseParallel(), f"blocks.{i}.mlp.c_proj": RowwiseParallel()})
    parallelize_module(model, mesh, plan)
    if cfg.tie_weights:  # each module was distributed on its own, which unties them: tie the DTensors again
        model.lm_head.weight = model.wte.weight
    return model


def clip_mixed(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over DTensor and plain gradients together (torch.stack refuses to mix them): the
    DTensor norm is made whole (one all-reduce), then joined with the replicated plain ones."""
    dt = [p for p in params if p.grad is not None and isinstance(p.grad, DTensor)]
    plain = [p for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    dt_norm = torch.nn.utils.get_total_norm([p.grad for p in dt])
    dt_norm = dt_norm.full_tensor() if isinstance(dt_norm, DTensor) else dt_norm
    total = torch.linalg.vector_norm(torch.stack([dt_norm, torch.nn.utils.get_total_norm([p.grad for p in plain])]))
    torch.nn.utils.clip_grads_with_norm_(dt, max_norm, total)
    torch.nn.utils.clip_grads_with_norm_(plain, max_norm, total)
    return total


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def worker(args) -> dict:
    rank, size = comm.get_rank(), comm.get_world_size()
    initialize_model_parallel(size)
    model_cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size)
    torch.manual_seed(args.seed)
    full = GPT(model_cfg)
    tp = GPTTP(model_cfg, full=copy.deepcopy(full))
    mesh = DeviceMesh("cpu", list(range(size)))
    twin = dtensor_twin(full, mesh)
    del full

    config, adamw = training_config(args), dict(training_config(args)["optimizer"]["params"])
    adamw["betas"] = tuple(adamw["betas"])
    client = None
    if args.ds_adamw == "torch":
        del config["optimizer"]
        client = torch.optim.AdamW(tp.parameters(), foreach=True, **adamw)
    engine, _, _, _ = ds_lab.initialize(model=tp, optimizer=client, config=config)
    engine.track_activations = args.activation_tracking
    twin_params = list(twin.parameters())
    # two groups, same hyper-parameters: one foreach kernel may not mix DTensors and plain tensors
    twin_opt = torch.optim.AdamW([{"params": [p for p in twin_params if isinstance(p, DTensor)]},
                                  {"params": [p for p in twin_params if not isinstance(p, DTensor)]}],
                                 foreach=True, **adamw)
    # tensor partners must see the same micro-batch: data-parallel rank 0 of 1 on every rank
    loader = DistributedLoader(corpus_tokens(), args.block_size, args.micro_batch,
                               dp_rank=engine.dp_rank, dp_size=engine.dp_world_size, seed=args.seed)

    ds_step = engine_step(engine)

    def dtensor_step(batch, t):
        with loss_parallel():  # cross-entropy on the Shard(-1) logits, forward and backward
            out = twin(**batch)
            t.append(time.perf_counter())
            out.loss.backward()
        t.append(time.perf_counter())
        clip_mixed(twin_params, args.clip)
        twin_opt.step()
        twin_opt.zero_grad(set_to_none=True)
        return local(out.loss)

    sides = {"ds_lab": ds_step, "DTensor": dtensor_step}
    times, losses = run_interleaved(sides, loader.batch, args.warmup, args.iters, on_warm=comm.reset_log)
    comm_rows = comm.summarize()  # every ds_lab collective of the timed steps
    with torch.no_grad():  # the shards correspond name by name (rank-major qkv = ds_lab's stride-3 shard)
        theirs = dict(twin.named_parameters())
        pairs = [(p, local(theirs[name])) for name, p in engine.module.named_parameters()]
        ours = torch.cat([a.flatten() for a, _ in pairs])
        other = torch.cat([b.flatten() for _, b in pairs])
        param_rel_diff = ((ours - other).norm() / other.norm()).item()
    return dict(rank=rank, threads=torch.get_num_threads(), times=times, losses=losses,
                param_rel_diff=param_rel_diff, num_parameters=sum(p.numel() for p in engine.module.parameters()),
                comm_calls=sum(r["count"] for r in comm_rows) / args.iters,
                comm_bytes=sum(r["bytes"] * r["count"] for r in comm_rows) / args.iters)


def report(args, results) -> str:
    r0 = results[0]
    t = r0["times"]
    ds_opt = ("torch.optim.AdamW(foreach=True), client" if args.ds_adamw == "torch"
              else "config AdamW (ds_lab.optim)")
    lines = [f"GPT n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} block_size={args.block_size}, "
             f"tensor parallel T={args.world_size}: {r0['num_parameters']:,} parameters on rank 0 "
             f"(shards + replicated); micro-batch {args.micro_batch}, the same on every rank (gloo, "
             f"{r0['threads']} torch thread(s) per rank, torch {torch.__version__})",
             f"ds_lab optimizer: {ds_opt}; "
             f"DTensor: torch.optim.AdamW(foreach=True); clipping {args.clip:g} on both",
             f"{args.iters} timed iterations after {args.warmup} warm-up, order alternating", "",
             "rank 0, median ms per step:",
             "| side | step (total) | forward | backward | clip + AdamW + zero grads |",
             "|---|---:|---:|---:|---:|"]
    for name in ("ds_lab", "DTensor"):
        lines.append(f"| {name} | {median_ms(t[name]['total']):.2f} | "
                     + " | ".join(f"{median_ms(t[name][ph]):.2f}" for ph in PHASES) + " |")
    lines.append(f"ds_lab.comm log per step (rank 0, every tag): {r0['comm_calls']:g} collectives, "
                 f"{r0['comm_bytes'] / 2**20:.2f} MiB")
    lines.append("")
    lines += ratio_lines(results, "DTensor")
    lines.append(agreement_line(args, results, "DTensor", LOSS_RTOL, "local parameter shards"))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    results = ds_lab.launch(worker, args.world_size, args)
    print(report(args, results))
    exit_if_losses_differ(results, "DTensor", LOSS_RTOL)


if __name__ == "__main__":
    main()
