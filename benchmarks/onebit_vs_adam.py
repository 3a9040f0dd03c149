"""1-bit Adam and signSGD against Adam: step time and bytes per step side by side, then loss at equal steps.

    python benchmarks/onebit_vs_adam.py                      # 4x256 GPT, 2 ranks; then 120 steps of chapter 05's GPT
    python benchmarks/onebit_vs_adam.py --convergence 0      # the timing only

Timing. Each rank builds three engines from the same seed: "Adam" (fp32 gradient all-reduce every
step), "OneBitAdam" with freeze_step 2 (so every timed step is a compressed one: local momentum,
1-bit exchange with error feedback) and "SignSGD" (majority vote). They step on the same batches,
interleaved after a barrier, the order alternating (benchmarks/interleave.py). Bytes are what this
rank sent per step, from the `ds_lab.comm` log. Compression costs compute (signs, packing, norms,
per tensor) and saves bytes: on one machine's loopback, bytes are cheap, so expect the compute to
show; the α-β projection (`ds_lab.comm.links`) prices the same bytes on a real network.

Convergence. `ds_lab.lab.compression.compression_train` on chapter 05's GPT and batches: final loss
(mean of the last 10 steps) and the whole run's bytes, 15 % warmup for 1-bit Adam.
"""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ds_lab  # noqa: E402
from ds_lab import comm  # noqa: E402
from ds_lab.comm import links  # noqa: E402
from ds_lab.data import DistributedLoader, corpus_tokens  # noqa: E402
from ds_lab.lab.compression import compression_train, global_curve, step_wire  # noqa: E402
from ds_lab.models import GPT, GPTConfig  # noqa: E402
from interleave import common_args, engine_step, median_ms, run_interleaved  # noqa: E402

SIDES = {"Adam": {"type": "Adam", "params": {}},
         "OneBitAdam": {"type": "OneBitAdam", "params": {"freeze_step": 2}},
         "SignSGD": {"type": "SignSGD", "params": {"momentum": 0.9}}}


def parse_args(argv=None):
    p = common_args(__doc__.splitlines()[0], n_embd=256, warmup=5, iters=40)
    p.set_defaults(block_size=64, micro_batch=4)
    p.add_argument("--convergence", type=int, default=120, help="steps of the convergence runs (0: skip them)")
    return p.parse_args(argv)


def counted(step):
    """A side that also records the bytes this rank sent during its step."""
    sent = []

    def side(batch, t):
        mark = comm.record_count()
        loss = step(batch, t)
        sent.append(sum(r.wire_bytes for r in comm.get_log(since=mark)))
        return loss
    side.sent = sent
    return side


def worker(args) -> dict:
    model = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    sides = {}
    for name, section in SIDES.items():
        torch.manual_seed(args.seed)
        optimizer = {"type": section["type"], "params": dict(section["params"], lr=args.lr)}
        engine, *_ = ds_lab.initialize(model=GPT(GPTConfig(**model)), config={
            "train_micro_batch_size_per_gpu": args.micro_batch, "gradient_clipping": 0.0, "optimizer": optimizer})
        sides[name] = counted(engine_step(engine))
    loader = DistributedLoader(corpus_tokens(), args.block_size, args.micro_batch, dp_rank=comm.get_rank(),
                               dp_size=comm.get_world_size(), seed=args.seed)

    def batch_of(i):
        x = loader.batch(i)["input_ids"]
        return {"input_ids": x, "labels": x}

    times, losses = run_interleaved(sides, batch_of, args.warmup, args.iters)
    records = {}
    for name in sides:  # one more step of each, for its records (priced by the α-β model below)
        mark = comm.record_count()
        sides[name](batch_of(args.warmup + args.iters), [0.0])
        records[name] = [SimpleNamespace(op=r.op, group_size=r.group_size, wire_bytes=r.wire_bytes, link=r.link)
                         for r in comm.get_log(since=mark) if r.op != "barrier"]
    return dict(times={k: v["total"] for k, v in times.items()}, sent={k: s.sent[-1] for k, s in sides.items()},
                records=records, params=sum(p.numel() for p in GPT(GPTConfig(**model)).parameters()))


def convergence(steps: int, world: int) -> list:
    model = dict(n_layer=2, n_head=4, n_embd=64, block_size=64)
    loader = DistributedLoader(corpus_tokens(), 64, 16, seed=1)
    batches = [loader.batch(i)["input_ids"] for i in range(steps)]
    betas, warmup = [0.9, 0.99], int(0.15 * steps)
    runs = {"Adam": ({"type": "Adam", "params": {"lr": 1e-3, "betas": betas}}, False),
            "1-bit Adam": ({"type": "OneBitAdam", "params": {"lr": 1e-3, "betas": betas, "freeze_step": warmup + 1}},
                           True),
            "1-bit Adam, no error feedback": ({"type": "OneBitAdam", "params": {
                "lr": 1e-3, "betas": betas, "freeze_step": warmup + 1, "error_feedback": False}}, True),
            "SignAdam (article §4.4)": ({"type": "SignAdam", "params": {"lr": 1e-3, "betas": betas}}, False),
            "SignSGD, majority vote": ({"type": "SignSGD", "params": {"lr": 1e-3, "momentum": 0.9}}, False)}
    lines = [f"convergence: chapter 05's GPT (2x64, 16 x 64 tokens per step) on {world} ranks, {steps} steps, "
             f"1-bit Adam warmup {warmup} steps (15 %)", "| optimizer | loss, mean of last 10 | bytes sent, whole run |",
             "|---|---:|---:|"]
    for name, (section, masks) in runs.items():
        results = ds_lab.launch(compression_train, world, section, batches, model, masks=masks)
        curve = global_curve(results)
        lines.append(f"| {name} | {sum(curve[-10:]) / 10:.3f} | {sum(step_wire(results[0])):,.0f} |")
    return lines


def main(argv=None):
    args = parse_args(argv)
    results = ds_lab.launch(worker, args.world_size, args)
    r0 = results[0]
    print(f"GPT n_layer={args.n_layer} n_embd={args.n_embd} block_size={args.block_size}: {r0['params']:,} parameters; "
          f"micro-batch {args.micro_batch} x {args.world_size} ranks; {args.iters} timed steps after {args.warmup}")
    print("| optimizer | step ms (median, rank 0 / 1) | / Adam | bytes sent per step | / Adam | projected comm, "
          "A100 + HDR200, one node per rank |")
    print("|---|---:|---:|---:|---:|---:|")
    model = links.PRESETS["a100-nvlink+ib-hdr200"]
    for name in SIDES:
        ms = [median_ms(r["times"][name]) for r in results]
        ratio = [m / median_ms(r["times"]["Adam"]) for m, r in zip(ms, results)]
        inter = [SimpleNamespace(**dict(vars(rec), link="inter")) for rec in r0["records"][name]]
        print(f"| {name} | {ms[0]:.1f} / {ms[-1]:.1f} | {ratio[0]:.2f} / {ratio[-1]:.2f} | {r0['sent'][name]:,.0f} | "
              f"{r0['sent'][name] / r0['sent']['Adam']:.4f} | {model.estimate_seconds(inter) * 1e3:.3f} ms |")
    if args.convergence:
        print("\n" + "\n".join(convergence(args.convergence, args.world_size)))


if __name__ == "__main__":
    main()
