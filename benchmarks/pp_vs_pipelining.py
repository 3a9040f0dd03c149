"""ds_lab pipeline parallel against torch.distributed.pipelining: same layers, micro-batches, schedule, ranks.

    python benchmarks/pp_vs_pipelining.py                        # P=2 stages (gloo), GPT 4x128, m=4, 1F1B
    python benchmarks/pp_vs_pipelining.py --schedule afab        # ds_lab "afab" vs torch ScheduleGPipe
    python benchmarks/pp_vs_pipelining.py --micro-batches 8 --micro-batch 4
    python benchmarks/pp_vs_pipelining.py --profile 5            # then cProfile 5 steps of each side

About 15 s on 2 CPU cores at load 2.3 (one torch thread per rank); longer when the cores are more loaded.

Every rank of the world is one pipeline stage (P = world size, data parallel 1). The model is a small
GPT written as a list of layers, untied so that both sides hold exactly the same modules:

    [TokenAndPosition (wte + wpe), Block x n_layer, LayerNorm, Linear head (no bias)]

ds_lab builds it as a PipelineModule (LayerSpec, seed_layers=True, partition_method "parameters"); the
torch side takes a deep copy of this stage's modules, as an nn.Sequential, before anything trains. So
both sides start from the same weights and cut the model at the same layer. Per step both run one
batch of m micro-batches (`--micro-batches`, each `--micro-batch` sequences; the same rows on both):

    ds_lab : engine.train_batch(iter of m (inputs, labels))   schedule "1f1b" (TrainSchedule) or "afab"
             (the last stage backpropagates loss / m; the step: global norm over the stages, clipping,
             optimizer; the returned loss is the mean over micro-batches, broadcast along the pipe)
    torch  : PipelineStage(nn.Sequential) + Schedule1F1B or ScheduleGPipe(loss_fn, scale_grads=True)
             stage 0: schedule.step(inputs); last: step(target=labels, losses=list); others: step()
             (return_outputs=False: ds_lab does not return logits either). Then what ds_lab's
             OptimizerStep does, by hand: mean of the micro-batch losses broadcast from the last stage,
             the global gradient norm (local norm^2 all-reduced over the stages), clip_grads_with_norm_,
             AdamW.step(), zero_grad.

Loss scaling: ds_lab backpropagates loss / m per micro-batch; torch backpropagates the loss and divides
the accumulated gradients by m (scale_grads=True). The same gradients up to rounding, so the losses and
final weights agree to about 1e-6, not bitwise.

Optimizer (apples to apples): torch.optim.AdamW(foreach=True) with the same hyper-parameters on both
sides; ds_lab gets it as the client optimizer of ds_lab.initialize. Clipping 1.0 on both (`--clip 0`:
none on either).

Timing, ratio and correctness are as in dp_vs_ddp.py: interleaved steps, alternating order, an untimed
barrier before each; the ratio ds_lab / torch both as the median of per-iteration ratios and as the
ratio of medians. A step is split in two: the pipeline (forwards, backwards, send/recv) and the rest
(loss broadcast, norm, clipping, AdamW); ds_lab's rest is its OptimizerStep span from engine.timeline.
On the last stage that rest also holds the wait for stage 0's last backward (the loss broadcast and the
norm's all-reduce are the first points where the stages meet again), on both sides alike.
torch.distributed.pipelining talks to torch.distributed directly; ds_lab's p2p goes through ds_lab.comm.
"""
from __future__ import annotations

import copy
import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ds_lab  # noqa: E402
from ds_lab import comm  # noqa: E402
from ds_lab.data import DistributedLoader, corpus_tokens  # noqa: E402
from ds_lab.models.gpt import Block, Embedding, GPTConfig, Linear  # noqa: E402
from ds_lab.pipe import LayerSpec, PipelineModule  # noqa: E402
from interleave import agreement_line, common_args, exit_if_losses_differ, median_ms, ratio_lines, run_interleaved, training_config  # noqa: E402  (this folder is on sys.path)

LOSS_RTOL = 1e-4
TORCH_SCHEDULES = {"1f1b": Schedule1F1B, "afab": ScheduleGPipe}


def parse_args(argv=None):
    p = common_args(__doc__.splitlines()[0], n_embd=128, warmup=3, iters=30)
    p.set_defaults(micro_batch=4)
    next(a for a in p._actions if a.dest == "micro_batch").help = "sequences per micro-batch"
    p.add_argument("--micro-batches", type=int, default=4, help="m, micro-batches per step (both sides)")
    p.add_argument("--schedule", choices=sorted(TORCH_SCHEDULES), default="1f1b",
                   help="ds_lab pipeline.schedule; torch Schedule1F1B or ScheduleGPipe")
    p.add_argument("--profile", type=int, default=0,
                   help="after the timed loop, cProfile this many more steps of each side (rank 0 and last)")
    return p.parse_args(argv)


class TokenAndPosition(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd)

    def forward(self, ids):
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))


def gpt_layers(cfg: GPTConfig) -> list:
    return [LayerSpec(TokenAndPosition, cfg), *[LayerSpec(Block, cfg) for _ in range(cfg.n_layer)],
            LayerSpec(nn.LayerNorm, cfg.n_embd), LayerSpec(Linear, cfg.n_embd, cfg.vocab_size, bias=False)]


def lm_loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def worker(args) -> dict:
    rank, stages = comm.get_rank(), comm.get_world_size()
    m, last = args.micro_batches, comm.get_world_size() - 1
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                    tie_weights=False)
    model = PipelineModule(gpt_layers(cfg), num_stages=stages, loss_fn=lm_loss, seed_layers=True,
                           base_seed=args.seed)
    twin = nn.Sequential(*copy.deepcopy(model.chunk_funcs[0]))  # this stage's layers, before any step

    adamw = dict(training_config(args)["optimizer"]["params"])
    adamw["betas"] = tuple(adamw["betas"])
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": m,
              "gradient_clipping": args.clip, "zero_optimization": {"stage": 0},
              "pipeline": {"schedule": args.schedule}}
    engine, _, _, _ = ds_lab.initialize(model=model, config=config,
                                        optimizer=torch.optim.AdamW(model.parameters(), foreach=True, **adamw))
    engine.track_activations = args.activation_tracking

    stage = PipelineStage(twin, rank, stages, torch.device("cpu"))
    schedule = TORCH_SCHEDULES[args.schedule](stage, m, loss_fn=lm_loss, scale_grads=True)
    twin_params = list(twin.parameters())
    twin_opt = torch.optim.AdamW(twin_params, foreach=True, **adamw)

    # every stage sees the same batch (stage 0 needs the inputs, the last the labels): m x micro rows
    loader = DistributedLoader(corpus_tokens(), args.block_size + 1, m * args.micro_batch, seed=args.seed)

    def batch_of(i):
        ids = loader.batch(i)["input_ids"]
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    step_spans = []

    def ds_step(batch, t):
        inputs, labels = batch
        loss = engine.train_batch(zip(inputs.chunk(m), labels.chunk(m)))
        t += [time.perf_counter()] * 2  # forward and backward are interleaved inside train_batch
        step_spans.append(next(t1 - t0 for phase, _, _, t0, t1 in reversed(engine.timeline) if phase == "step"))
        return loss

    def torch_step(batch, t):
        inputs, labels = batch
        losses = []
        if rank == 0:
            schedule.step(inputs, return_outputs=False)
        elif rank == last:
            schedule.step(target=labels, losses=losses, return_outputs=False)
        else:
            schedule.step(return_outputs=False)
        t += [time.perf_counter()] * 2
        loss = torch.stack(losses).mean() if rank == last else torch.zeros(())
        dist.broadcast(loss, src=last)
        if args.clip > 0:  # the norm over the whole pipeline: each stage's squares, summed over the stages
            sq = torch.nn.utils.get_total_norm([p.grad for p in twin_params if p.grad is not None]) ** 2
            dist.all_reduce(sq)
            torch.nn.utils.clip_grads_with_norm_(twin_params, args.clip, sq.sqrt())
        twin_opt.step()
        twin_opt.zero_grad(set_to_none=True)
        return loss

    sides = {"ds_lab": ds_step, "torch": torch_step}
    times, losses = run_interleaved(sides, batch_of, args.warmup, args.iters, on_warm=comm.reset_log)
    # move ds_lab's OptimizerStep span (loss broadcast, norm, clip, AdamW) from "forward" to "step"
    spans = step_spans[args.warmup:args.warmup + args.iters]
    times["ds_lab"]["step"] = spans
    times["ds_lab"]["forward"] = [a - s for a, s in zip(times["ds_lab"]["forward"], spans)]
    comm_rows = comm.summarize()
    with torch.no_grad():
        ours = torch.cat([p.flatten() for p in engine.module.parameters()])
        theirs = torch.cat([p.flatten() for p in twin.parameters()])
        param_rel_diff = ((ours - theirs).norm() / theirs.norm()).item()

    profiles = {}
    if args.profile:
        for name, side in sides.items():
            prof = cProfile.Profile()
            for i in range(args.profile):
                dist.barrier()
                prof.enable()
                side(batch_of(args.warmup + args.iters + i), [time.perf_counter()])
                prof.disable()
            buf = io.StringIO()
            stats = pstats.Stats(prof, stream=buf)
            calls = stats.total_calls / args.profile
            stats.sort_stats("tottime").print_stats(12)
            profiles[name] = (calls, buf.getvalue())

    return dict(rank=rank, threads=torch.get_num_threads(), times=times, losses=losses, parts=model.parts,
                param_rel_diff=param_rel_diff, num_parameters=sum(p.numel() for p in engine.module.parameters()),
                comm_calls=sum(r["count"] for r in comm_rows) / args.iters,
                comm_bytes=sum(r["bytes"] * r["count"] for r in comm_rows) / args.iters, profiles=profiles)


def report(args, results) -> str:
    r0 = results[0]
    torch_name = TORCH_SCHEDULES[args.schedule].__name__
    lines = [f"GPT (untied) n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} "
             f"block_size={args.block_size} as {len(r0['parts']) - 1} pipeline stages, layers cut at {r0['parts']} "
             f"(parameters per stage: {', '.join(format(r['num_parameters'], ',') for r in results)}); "
             f"{args.micro_batches} micro-batches of {args.micro_batch} sequences per step "
             f"(gloo, {r0['threads']} torch thread(s) per rank, torch {torch.__version__})",
             f"schedule: ds_lab {args.schedule!r} vs torch {torch_name}; both torch.optim.AdamW(foreach=True), "
             f"clipping {args.clip:g}",
             f"{args.iters} timed iterations after {args.warmup} warm-up, order alternating", "",
             "median ms per step:",
             "| rank (stage) | side | step (total) | pipeline (F, B, p2p) | loss + norm + clip + AdamW |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        for name in ("ds_lab", "torch"):
            t = r["times"][name]
            lines.append(f"| {r['rank']} | {name} | {median_ms(t['total']):.2f} | {median_ms(t['forward']):.2f} | "
                         f"{median_ms(t['step']):.2f} |")
    lines.append(f"ds_lab.comm log per step (rank 0, every tag): {r0['comm_calls']:g} calls, "
                 f"{r0['comm_bytes'] / 2**20:.2f} MiB")
    lines.append("")
    lines += ratio_lines(results, "torch")
    lines.append(agreement_line(args, results, "torch", LOSS_RTOL, "stage parameters"))
    for r in results:
        for name, (calls, text) in r["profiles"].items():
            lines += ["", f"cProfile rank {r['rank']} {name}: {calls:,.0f} Python calls per step", text]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.world_size < 2:
        sys.exit("a pipeline needs at least 2 stages: --world-size 2 or more")
    if args.schedule == "1f1b" and args.micro_batches < args.world_size:
        sys.exit(f"torch's Schedule1F1B needs --micro-batches >= the stage count {args.world_size}")
    results = ds_lab.launch(worker, args.world_size, args)
    print(report(args, results))
    exit_if_losses_differ(results, "torch", LOSS_RTOL)


if __name__ == "__main__":
    main()
