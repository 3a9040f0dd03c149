"""ds_lab's ZeRO stages 1-3 against DeepSpeed's own: same GPT, data, ranks, init and config.

    python benchmarks/zero_vs_deepspeed.py                   # stages 1 2 3, 2 ranks (gloo), fp32
    python benchmarks/zero_vs_deepspeed.py --stages 3 --iters 40
    python benchmarks/zero_vs_deepspeed.py --ds-adam torch   # DeepSpeed with torch.optim.AdamW

DeepSpeed is optional: install it with `pip install deepspeed` (on a CPU-only torch it runs ZeRO
1-3 with gloo; set nothing, this script sets DS_ACCELERATOR=cpu). Without it, or when it cannot
start, the script says why and exits 0. Its CPU FusedAdam is a C++ op that DeepSpeed compiles on
first use (a few minutes, cached under ~/.cache/torch_extensions); `--ds-adam auto` builds it once
in a separate process before the ranks start and falls back to `torch_adam: true`
(torch.optim.AdamW) when the build fails. The report says which optimizer ran.

Both engines live in the same launched process on every rank: `ds_lab.launch` creates the gloo
group, and `deepspeed.init_distributed(dist_backend="gloo")` adopts that existing default group
(DeepSpeed wraps an already initialised torch.distributed instead of starting its own). For each
stage, one GPT is built from a seed and deep-copied, and each engine gets its copy with the *same*
config dict, which ds_lab reads with DeepSpeed's meaning:

    optimizer "Adam" (adam_w_mode defaults to True: decoupled weight decay, i.e. AdamW) with
    lr, betas, eps, weight_decay; gradient_clipping; zero_optimization.stage, reduce_bucket_size,
    overlap_comm, stage3_prefetch_bucket_size, stage3_param_persistence_threshold (DeepSpeed's
    defaults unless changed by a flag)

allgather_bucket_size is left out: ds_lab all-gathers per unit (its units follow
reduce_bucket_size) and warns that it does not enforce the key; DeepSpeed keeps its default, 5e8
elements, the same as reduce_bucket_size here. Both engines wrap `LossOnly(GPT)`, whose forward
returns the loss tensor: DeepSpeed's ZeRO-3 hooks look for tensors in a module's outputs and do
not look inside GPT's `GPTOutput` dataclass. (DeepSpeed still warns once about the `GPTOutput`
of the inner GPT module; that module registers no parameters of its own, so none of its hooks
has anything to fetch or release.)

The only key that differs: DeepSpeed's optimizer params get `torch_adam: true` under
`--ds-adam torch` (ds_lab's Adam is already torch `_foreach` kernels; it has no such key).

Timing is interleaved as in `dp_vs_ddp.py`: each iteration times one step of each engine, the
order alternates, an untimed barrier precedes each step, warm-up iterations are not timed. The
ratio is ds_lab / DeepSpeed, the median of the per-iteration ratios, per rank; the loss
difference is |loss_ds_lab - loss_DeepSpeed| on the same rank and step, max over both.
"""
from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ds_lab  # noqa: E402
from ds_lab import comm  # noqa: E402
from ds_lab.data import DistributedLoader, corpus_tokens  # noqa: E402
from ds_lab.models import GPT, GPTConfig  # noqa: E402
from interleave import PHASES, common_args, median_ms, run_interleaved, training_config  # noqa: E402  (this folder is on sys.path)
from zero_vs_fsdp import LossOnly  # noqa: E402  (this folder is on sys.path when run as a script)

MIB = 2**20
SIDES = ("ds_lab", "DeepSpeed")


def parse_args(argv=None):
    p = common_args(__doc__.splitlines()[0], n_embd=256, warmup=3, iters=20)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=(1, 2, 3))
    p.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--bucket", type=int, default=500_000_000,
                   help="zero_optimization.reduce_bucket_size (elements); ds_lab's stage-1/2 units follow it")
    p.add_argument("--overlap-comm", action=argparse.BooleanOptionalAction, default=True,
                   help="zero_optimization.overlap_comm, both engines")
    p.add_argument("--prefetch", type=int, default=50_000_000, help="stage3_prefetch_bucket_size")
    p.add_argument("--persistence-threshold", type=int, default=100_000,
                   help="stage3_param_persistence_threshold")
    p.add_argument("--ds-adam", choices=("auto", "fused", "torch"), default="auto",
                   help="DeepSpeed's Adam: its CPU FusedAdam op (built on first use), torch.optim.AdamW "
                        "(torch_adam: true), or fused when it builds and torch otherwise")
    return p.parse_args(argv)


def config(args, stage: int) -> dict:
    """The one config both engines read ("Adam": AdamW semantics in both)."""
    return {
        **training_config(args, optimizer_type="Adam"),
        "zero_optimization": {"stage": stage, "reduce_bucket_size": args.bucket,
                              "overlap_comm": args.overlap_comm, "stage3_prefetch_bucket_size": args.prefetch,
                              "stage3_param_persistence_threshold": args.persistence_threshold},
    }


# ---- is DeepSpeed there? (asked in child processes: a failing import or build cannot hurt us) ----

def _python(code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu")))


def deepspeed_version():
    """(version, None) when `import deepspeed` works, else (None, why)."""
    try:
        done = _python("import deepspeed; print(deepspeed.__version__)", timeout=300)
    except subprocess.TimeoutExpired:
        return None, "`import deepspeed` did not finish in 300 s"
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["(no message)"])[-1]
    return done.stdout.strip().splitlines()[-1], None


def fused_adam_builds():
    """(True, None) when DeepSpeed's CPU FusedAdam op loads (building it if needed), else (False, why)."""
    code = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(verbose=False)"
    try:
        done = _python(code, timeout=900)
    except subprocess.TimeoutExpired:
        return False, "building FusedAdam took over 900 s"
    if done.returncode != 0:
        return False, (done.stderr.strip().splitlines() or ["(no message)"])[-1]
    return True, None


# ---- the ranks ------------------------------------------------------------------------------------

def quiet_deepspeed():
    import deepspeed
    deepspeed.utils.logging.logger.setLevel(logging.WARNING)
    # DeepSpeed calls all_gather_into_tensor / reduce_scatter_tensor, deprecated in this torch
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def run_stage(args, stage: int, torch_adam: bool) -> dict:
    import deepspeed

    model_cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size, tie_weights=args.tie_weights)
    torch.manual_seed(args.seed)
    model = LossOnly(GPT(model_cfg))
    twin = copy.deepcopy(model)  # same initial weights for DeepSpeed
    num_parameters = model.model.num_parameters()
    cfg = config(args, stage)
    ds_cfg = copy.deepcopy(cfg)
    if torch_adam:
        ds_cfg["optimizer"]["params"]["torch_adam"] = True
    engine, _, _, _ = ds_lab.initialize(model=model, config=cfg)
    engine.track_activations = args.activation_tracking  # saved-tensor hooks in Python on every forward
    ds_engine, _, _, _ = deepspeed.initialize(model=twin, model_parameters=twin.parameters(), config=ds_cfg)
    loader = DistributedLoader(corpus_tokens(), args.block_size, args.micro_batch,
                               dp_rank=engine.dp_rank, dp_size=engine.dp_world_size, seed=args.seed)

    def step_of(eng):
        def step(batch, t):
            loss = eng(**batch)
            t.append(time.perf_counter())
            eng.backward(loss)
            t.append(time.perf_counter())
            eng.step()
            return loss
        return step

    sides = {"ds_lab": step_of(engine), "DeepSpeed": step_of(ds_engine)}
    times, losses = run_interleaved(sides, loader.batch, args.warmup, args.iters)
    optimizer = type(getattr(ds_engine, "basic_optimizer", None)).__name__
    memory = engine.memory_report()
    del engine, ds_engine, model, twin
    gc.collect()
    return dict(times=times, losses=losses, num_parameters=num_parameters, ds_optimizer=optimizer,
                ds_lab_model_states=sum(memory[k] for k in ("params", "grads", "master_params",
                                                            "optimizer_states")))


def worker(args, torch_adam: bool) -> dict:
    import deepspeed
    quiet_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the default group ds_lab.launch made
    stages = {stage: run_stage(args, stage, torch_adam) for stage in args.stages}
    return dict(rank=comm.get_rank(), threads=torch.get_num_threads(), stages=stages)


# ---- the report -----------------------------------------------------------------------------------

def report(args, results, version: str, adam_note: str) -> str:
    r0 = results[0]
    first = r0["stages"][args.stages[0]]
    psi = first["num_parameters"]
    lines = [f"GPT n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} "
             f"block_size={args.block_size} tie_weights={args.tie_weights}: {psi:,} parameters "
             f"({4 * psi / MIB:.2f} MiB fp32); micro-batch {args.micro_batch} x {args.world_size} ranks "
             f"(gloo, {r0['threads']} torch thread(s) per rank), fp32; torch {torch.__version__}, "
             f"DeepSpeed {version}",
             f"config (both): optimizer Adam (AdamW semantics), gradient_clipping={args.clip}, "
             f"reduce_bucket_size={args.bucket:,}, overlap_comm={args.overlap_comm}, "
             f"stage3_prefetch_bucket_size={args.prefetch:,}, "
             f"stage3_param_persistence_threshold={args.persistence_threshold:,}; "
             f"ds_lab activation tracking on every step={args.activation_tracking}",
             f"DeepSpeed's Adam: {first['ds_optimizer']} ({adam_note}); ds_lab's: ds_lab.optim.Adam (torch _foreach)",
             f"per stage: {args.iters} timed iterations after {args.warmup} warm-up, order alternating", "",
             "rank 0 median ms per step (forward / backward / step), ratio ds_lab/DeepSpeed = median of "
             "per-iteration ratios:",
             "| stage | ds_lab ms | DeepSpeed ms | ds_lab fwd / bwd / step | DeepSpeed fwd / bwd / step | "
             "ratio rank 0 | ratio rank 1 | max loss diff |",
             "|---|---:|---:|---|---|---:|---:|---:|"]
    for stage in args.stages:
        t = r0["stages"][stage]["times"]
        ratios = []
        for r in results[:2]:
            ts = r["stages"][stage]["times"]
            ratios.append(statistics.median(a / b for a, b in zip(ts["ds_lab"]["total"], ts["DeepSpeed"]["total"])))
        diff = max(abs(a - b) for r in results
                   for a, b in zip(r["stages"][stage]["losses"]["ds_lab"], r["stages"][stage]["losses"]["DeepSpeed"]))
        phases = {name: " / ".join(f"{median_ms(t[name][ph]):.0f}" for ph in PHASES) for name in SIDES}
        lines.append(f"| {stage} | {median_ms(t['ds_lab']['total']):.1f} | {median_ms(t['DeepSpeed']['total']):.1f} | "
                     f"{phases['ds_lab']} | {phases['DeepSpeed']} | "
                     + " | ".join(f"{x:.3f}" for x in ratios) + (" | -" if len(ratios) < 2 else "")
                     + f" | {diff:.1e} |")
    last = r0["stages"][args.stages[-1]]["losses"]["ds_lab"]
    lines.append(f"(loss differences: |ds_lab - DeepSpeed| on the same rank and step, max over "
                 f"{args.warmup + args.iters} steps and {len(results)} ranks; rank 0 loss "
                 f"{last[0]:.4f} -> {last[-1]:.4f} at stage {args.stages[-1]})")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the ranks are forked: they inherit it
    version, why = deepspeed_version()
    if version is None:
        print(f"DeepSpeed is not usable here, nothing to compare: {why}\n"
              f"Install it with `pip install deepspeed` (keep your torch), then run this again.")
        return 0
    torch_adam, adam_note = True, "torch_adam: true, asked for"
    if args.ds_adam != "torch":
        built, why = fused_adam_builds()
        if built:
            torch_adam, adam_note = False, "DeepSpeed's CPU FusedAdam op"
        elif args.ds_adam == "fused":
            print(f"DeepSpeed's CPU FusedAdam op did not build: {why}\nRun with --ds-adam torch.")
            return 0
        else:
            adam_note = f"torch_adam: true, because FusedAdam did not build: {why}"
    try:
        results = ds_lab.launch(worker, args.world_size, args, torch_adam, timeout=600)
    except ds_lab.RankError as err:
        if "deepspeed" not in err.remote_traceback.lower():
            raise
        print(f"DeepSpeed {version} failed to run here, nothing to compare; rank {err.rank}'s error:\n"
              + err.remote_traceback.strip().splitlines()[-1])
        return 0
    print(report(args, results, version, adam_note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
