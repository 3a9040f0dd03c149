"""`ds-lab` command line.

    ds-lab train                                   # 2 ranks, the default GPT, about a minute on 2 cores
    ds-lab train --world-size 4 --steps 100 --precision bf16
    ds-lab train --config my_ds_config.json        # any DeepSpeed-style JSON config
    ds-lab estimate --params 7.5e9 --world-size 64 # ZeRO's per-rank model-state memory, no training
    ds-lab estimate --params 7.5e9 --world-size 8 --gpu-memory 80e9   # ... and what fits on an 80 GB GPU
    ds-lab run --num_procs 2 my_script.py --deepspeed_config ds.json  # DeepSpeed's `deepspeed` launcher

`train` starts real processes, trains the small GPT on the shipped corpus with a tqdm progress bar
(loss, tokens/s; on stderr, one line every 10 s when it is not a terminal), then prints each rank's
memory ledger and the comm summary of rank 0.
`estimate` prints the ZeRO paper's arithmetic (ds_lab.zero.estimate) for the four stages.
`run` starts any script on N processes (or across hosts with a hostfile) as `deepspeed` does: its
options are DeepSpeed's (`ds-lab run --help`; the logic is in ds_lab/runner.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from ds_lab import comm
from ds_lab.config import ConfigError, DeepSpeedConfig


def _train(args) -> int:
    from ds_lab.launch import launch
    from ds_lab.train import DEFAULT_CONFIG, format_memory, train_worker

    if args.config:
        with open(args.config) as f:
            config = json.load(f)
    else:
        config = json.loads(json.dumps(DEFAULT_CONFIG))
        config["scheduler"]["params"]["total_num_steps"] = args.steps
    if args.micro_batch is not None:
        config["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.grad_accum is not None:
        config["gradient_accumulation_steps"] = args.grad_accum
    if args.precision != "fp32":
        config[args.precision] = {"enabled": True}
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    parsed = DeepSpeedConfig.from_any(config, world_size=args.world_size)  # a bad config fails here, clearly
    model = dict(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.seq_len)
    print(f"ds-lab train: {args.world_size} ranks, {args.steps} steps, precision {parsed.precision}, "
          f"ZeRO stage {parsed.zero_optimization.stage}")
    dashboard = None
    if args.report:
        from ds_lab.monitor import Dashboard
        dashboard = Dashboard(title=f"ds-lab train, {args.world_size} ranks", live=False,
                              theory=_theory(parsed, model, args.world_size))
    t0 = time.perf_counter()
    results = launch(train_worker, args.world_size, config=config, model=model, steps=args.steps, seed=args.seed,
                     tty=sys.stderr.isatty(), dashboard=dashboard)
    wall = time.perf_counter() - t0
    r0 = results[0]
    print(f"\nparameters Ψ = {r0['num_parameters']:,}   final loss {r0['losses'][-1]:.3f}   "
          f"{sum(r['tokens_per_s'] for r in results[:1]):,.0f} tokens/s   wall {wall:.1f} s\n")
    print("memory per rank (bytes, measured from live tensors):")
    print(format_memory(results))
    print("\ncommunication on rank 0 (training loop):")
    print(comm.format_summary(r0["comm"]))
    if args.report:
        _write_report(args.report, dashboard, results, config, model, wall)
    return 0


def _theory(parsed, model, world_size) -> dict:
    """What the paper predicts for this run: model-state bytes per rank, wire bytes per step."""
    from ds_lab.models import GPT, GPTConfig
    from ds_lab.train import DEFAULT_MODEL
    from ds_lab.zero.estimate import estimate_ledger

    psi = GPT(GPTConfig(**{**DEFAULT_MODEL, **model})).num_parameters()
    stage, n = parsed.zero_optimization.stage, world_size
    memory = estimate_ledger(psi, n, stage, precision=parsed.precision)
    memory.pop("total")
    grad_bytes = psi * (4 if parsed.precision == "fp32" else 2)
    rounds = 3 if stage == 3 else 2  # ZeRO-3 gathers the parameters twice, others once (in all-reduce)
    return {"memory": memory,
            "comm": {"per_step_bytes": rounds * (n - 1) / n * grad_bytes,
                     "label": f"{rounds}(N-1)/N x gradient bytes"}}


def _write_report(folder, dashboard, results, config, model, wall) -> None:
    """The dashboard (all four panels, and each alone) as PNGs, and every number as JSON."""
    import os
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ds_lab.monitor import plots

    os.makedirs(folder, exist_ok=True)
    dashboard.save_png(os.path.join(folder, "dashboard.png"))
    theory = dashboard.theory
    for name, draw in (("memory", lambda ax: plots.plot_memory(ax, dashboard.store, theory)),
                       ("comm", lambda ax: plots.plot_comm(ax, dashboard.store, theory)),
                       ("loss", lambda ax: plots.plot_loss(ax, dashboard.store)),
                       ("timeline", lambda ax: plots.plot_timeline(ax, dashboard.store))):
        fig = Figure(figsize=(8, 5), layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig.add_subplot())
        fig.savefig(os.path.join(folder, f"{name}.png"), dpi=100)
    measurements = dict(config=config, model=model, wall_seconds=wall, theory=theory,
                        ranks=[{k: v for k, v in r.items()} for r in results])
    with open(os.path.join(folder, "measurements.json"), "w") as f:
        json.dump(measurements, f, indent=1, default=str)
    print(f"\nreport: {folder}/dashboard.png, memory.png, comm.png, loss.png, timeline.png, measurements.json")


def _estimate(args) -> int:
    from ds_lab.zero.estimate import format_table, format_what_fits

    try:
        print(format_table(args.params, args.world_size, args.precision))
        if args.gpu_memory is not None:
            print()
            print(format_what_fits(args.gpu_memory, args.world_size, args.precision))
    except ValueError as err:
        print(f"estimate: {err}", file=sys.stderr)
        return 2
    return 0


def _zero_to_fp32(args) -> int:
    """Merge a checkpoint's shards (any stage, any number of ranks) into one fp32 state_dict file."""
    import torch
    from ds_lab.runtime.checkpoint import atomic_write
    from ds_lab.zero import consolidate

    state = consolidate(args.checkpoint_dir, tag=args.tag)
    atomic_write(args.output_file, lambda f: torch.save(state, f))
    total = sum(v.numel() for v in state.values())
    print(f"wrote {args.output_file}: {len(state)} tensors, {total:,} elements, fp32")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # everything after `run` is the launcher's and the script's, untouched
        from ds_lab import runner
        return runner.main(argv[1:])
    parser = argparse.ArgumentParser(prog="ds-lab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="launch a script on N processes or several hosts (DeepSpeed's launcher; "
                   "ds-lab run --help)", add_help=False)
    train = sub.add_parser("train", help="train the small GPT on the shipped corpus across N processes")
    train.add_argument("--world-size", type=int, default=2)
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--config", help="DeepSpeed-style JSON config (default: a built-in AdamW config)")
    train.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    train.add_argument("--micro-batch", type=int)
    train.add_argument("--grad-accum", type=int)
    train.add_argument("--layers", type=int, default=4)
    train.add_argument("--embd", type=int, default=128)
    train.add_argument("--heads", type=int, default=4)
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="zero_optimization.stage")
    train.add_argument("--report", metavar="DIR", help="write the dashboard's PNGs and a JSON of the measurements")
    estimate = sub.add_parser("estimate", help="per-rank memory of model states at ZeRO stages 0-3 (no training)")
    estimate.add_argument("--params", type=float, required=True, help="number of parameters Ψ, e.g. 7.5e9")
    estimate.add_argument("--world-size", type=int, required=True, help="data-parallel ranks N")
    estimate.add_argument("--precision", choices=["mixed", "fp32"], default="mixed")
    estimate.add_argument("--gpu-memory", type=float, help="bytes per GPU, e.g. 80e9: also print what fits")
    to_fp32 = sub.add_parser("zero-to-fp32", help="merge a (ZeRO) checkpoint into one fp32 state_dict file")
    to_fp32.add_argument("checkpoint_dir")
    to_fp32.add_argument("output_file")
    to_fp32.add_argument("--tag", help="checkpoint tag (default: the one in 'latest')")
    args = parser.parse_args(argv)
    try:
        return {"train": _train, "estimate": _estimate, "zero-to-fp32": _zero_to_fp32}[args.command](args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
