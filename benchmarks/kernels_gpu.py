"""ds_lab's CUDA kernels against torch eager on one GPU: time, effective bandwidth, the copy ceiling.

    python benchmarks/kernels_gpu.py                          # every op, about a minute on an H100/H200
    python benchmarks/kernels_gpu.py --ops adam,layer_norm --repeat 50

Every op here is memory-bound (a few flops per byte), so the measure is bandwidth. Per op and dtype:

    ds_lab     the op with backend="cuda": kernels/<op>.cu compiled for this GPU, launched by CuPy
    torch      eager torch: F.layer_norm; F.gelu(x + b, approximate="tanh"); torch.softmax of the
               scores masked with -inf above the diagonal; torch.optim.AdamW(foreach=True) and
               AdamW(fused=True) (one kernel per step, like ours)

Time: CUDA events around each call, the median of --repeat calls after --warmup. Effective
bandwidth = bytes per element x elements / time, with the bytes per element a kernel must move at
least (the figure in its .cu header comment, printed below the table for checking), the same
figure for ds_lab and for torch: torch moving more bytes shows as a lower effective bandwidth.
The ceiling is measured, not quoted: a device-to-device copy of the op's input
(`torch.empty_like(x).copy_(x)`, 2 x its bytes) timed the same way. "/ copy" = effective
bandwidth / copy bandwidth; "time / ds_lab" = the row's time over ds_lab's (> 1: ds_lab is faster).
"max |diff|" compares ds_lab's output with torch's once, before timing.

Backward rows ("bwd") time `torch.autograd.grad` of a kept forward graph (ds_lab's op runs its
backward kernels; torch its own), with a fixed upstream gradient.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPS = ("adam", "layer_norm", "bias_gelu", "causal_softmax")
ADAM_SIZES = (16_000_000, 16_000_000, 8_000_000, 4_000_000, 4_000_000, 1_000_000, 1_000_000)  # 50 M, 7 tensors
ROWS, COLS = 16_384, 4_096  # layer_norm, bias_gelu: 64 M elements (GPT-style width)
HEADS, LENGTH = 64, 1_024  # causal_softmax: [64, 1024, 1024] scores, 64 M elements
# minimal bytes per element, from the kernels' header comments: (forward, backward) by element size
BYTES = {"layer_norm": {4: (8, 12), 2: (4, 6)}, "bias_gelu": {4: (8, 12), 2: (4, 6)},
         "causal_softmax": {4: (6, 8), 2: (3, 4)}}  # causal: averaged over the triangle
ADAM_BYTES = 28  # fp32: reads p, g, m, v, writes p, m, v
DEVICE, BACKEND = "cuda", "cuda"  # --smoke: "cpu", "emulate" (the same script, tiny sizes, wall-clock time)
KERNEL_FILE = {"adam": "fused_adam", "layer_norm": "layer_norm", "bias_gelu": "bias_gelu",
               "causal_softmax": "causal_softmax"}


def time_ms(fn, warmup: int, repeat: int) -> float:
    """Median milliseconds of `fn()` on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":  # --smoke only
        return statistics.median(_wall_ms(fn) for _ in range(repeat))
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def copy_gbps(x: torch.Tensor, warmup: int, repeat: int) -> float:
    """The device's practical bandwidth ceiling: GB/s of copying x (read + write)."""
    out = torch.empty_like(x)
    ms = time_ms(lambda: out.copy_(x), warmup, repeat)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def header_bytes(module: str) -> str:
    """The 'Bytes moved per element' paragraph of kernels/<module>.cu's header comment."""
    lines = (ROOT / "kernels" / f"{module}.cu").read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if re.search(r"bytes (moved )?per element", line, re.I)), None)
    if start is None:
        return "(no 'Bytes moved per element' line in the header)"
    paragraph = []
    for line in lines[start:]:
        text = line.removeprefix("//").strip()
        if not line.startswith("//") or not text:
            break
        paragraph.append(text)
    return " ".join(" ".join(paragraph).split())


def _rows(op, dtype_name, numel, bytes_per_element, timings, copy, diff):
    """Table rows: one per implementation, ds_lab first."""
    ours = timings["ds_lab"]
    out = []
    for name, ms in timings.items():
        gbps = bytes_per_element * numel / ms / 1e6
        out.append(f"| {op} | {dtype_name} | {numel:,} | {bytes_per_element} | {name} | {ms:.3f} | {gbps:,.0f} | "
                   f"{gbps / copy:.2f} | {ms / ours:.2f} | {diff if name == 'ds_lab' else ''} |")
    return out


def bench_adam(args) -> list:
    from ds_lab.ops.fused_adam import fused_adam_step
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    params0 = [torch.randn(n, device=DEVICE, generator=generator) for n in ADAM_SIZES]
    grads = [torch.randn(n, device=DEVICE, generator=generator) for n in ADAM_SIZES]
    ours = [p.clone() for p in params0]
    m, v = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    step = [0]

    def ds_lab_step():
        step[0] += 1
        fused_adam_step(ours, grads, m, v, step=step[0], backend=BACKEND, **hyper)

    def torch_optimizer(**flavour):
        params = [torch.nn.Parameter(p.clone()) for p in params0]
        for p, g in zip(params, grads):
            p.grad = g
        return params, torch.optim.AdamW(params, **hyper, **flavour)

    foreach_params, foreach = torch_optimizer(foreach=True)
    _, fused = torch_optimizer(fused=True)
    ds_lab_step()
    foreach.step()
    diff = max((a - b.detach()).abs().max().item() for a, b in zip(ours, foreach_params))
    timings = {"ds_lab": time_ms(ds_lab_step, args.warmup, args.repeat),
               "torch AdamW foreach": time_ms(foreach.step, args.warmup, args.repeat),
               "torch AdamW fused": time_ms(fused.step, args.warmup, args.repeat)}
    copy = copy_gbps(params0[0], args.warmup, args.repeat)
    return _rows("adam step", "fp32", sum(ADAM_SIZES), ADAM_BYTES, timings, copy, f"{diff:.1e}")


def _forward_and_backward(op, dtype, ds_lab_fn, torch_fn, inputs, args) -> list:
    """Rows for the forward and the backward of one elementwise/row op, ds_lab vs torch."""
    x = inputs[0]
    copy = copy_gbps(x, args.warmup, args.repeat)
    fwd_bytes, bwd_bytes = BYTES[op][x.element_size()]
    name = str(dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
    diff = (ds_lab_fn(*inputs).float() - torch_fn(*inputs).float()).abs().max().item()
    rows = _rows(op + " fwd", name, x.numel(), fwd_bytes,
                 {"ds_lab": time_ms(lambda: ds_lab_fn(*inputs), args.warmup, args.repeat),
                  "torch": time_ms(lambda: torch_fn(*inputs), args.warmup, args.repeat)}, copy, f"{diff:.1e}")
    leaves = [t.detach().requires_grad_() for t in inputs]
    dy = torch.randn_like(x)
    timings = {}
    for label, fn in (("ds_lab", ds_lab_fn), ("torch", torch_fn)):
        y = fn(*leaves)
        timings[label] = time_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True),
                                 args.warmup, args.repeat)
    return rows + _rows(op + " bwd", name, x.numel(), bwd_bytes, timings, copy, "")


def bench_layer_norm(args, dtype) -> list:
    from ds_lab.ops.norm import layer_norm
    x = torch.randn(ROWS, COLS, device=DEVICE, dtype=dtype)
    w, b = torch.randn(COLS, device=DEVICE, dtype=dtype), torch.randn(COLS, device=DEVICE, dtype=dtype)
    return _forward_and_backward("layer_norm", dtype, lambda x, w, b: layer_norm(x, w, b, 1e-5, backend=BACKEND),
                                 lambda x, w, b: F.layer_norm(x, (COLS,), w, b, 1e-5), (x, w, b), args)


def bench_bias_gelu(args, dtype) -> list:
    from ds_lab.ops.gelu import bias_gelu
    x, b = torch.randn(ROWS, COLS, device=DEVICE, dtype=dtype), torch.randn(COLS, device=DEVICE, dtype=dtype)
    return _forward_and_backward("bias_gelu", dtype, lambda x, b: bias_gelu(x, b, backend=BACKEND),
                                 lambda x, b: F.gelu(x + b, approximate="tanh"), (x, b), args)


def bench_causal_softmax(args, dtype) -> list:
    from ds_lab.ops.softmax import causal_softmax
    scores = torch.randn(HEADS, LENGTH, LENGTH, device=DEVICE, dtype=dtype)
    above = torch.ones(LENGTH, LENGTH, device=DEVICE, dtype=torch.bool).triu(1)
    return _forward_and_backward("causal_softmax", dtype, lambda s: causal_softmax(s, backend=BACKEND),
                                 lambda s: torch.softmax(s.masked_fill(above, float("-inf")), dim=-1), (scores,), args)


def environment() -> str:
    props = torch.cuda.get_device_properties(0)
    import cupy
    return (f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
            f"sm_{props.major}{props.minor}; torch {torch.__version__} (CUDA {torch.version.cuda}), CuPy "
            f"{cupy.__version__}, driver CUDA {cupy.cuda.runtime.driverGetVersion()}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="check the script on the CPU: the emulated kernels "
                        "at tiny sizes, wall-clock time (the numbers mean nothing)")
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    if unknown := sorted(set(ops) - set(OPS)):
        parser.error(f"unknown ops {unknown}; choose from {', '.join(OPS)}")
    from ds_lab.ops.backend import cupy_available
    if args.smoke:
        return smoke(ops, args)
    if not torch.cuda.is_available():
        sys.exit("kernels_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here. The same kernels run "
                 "on the CPU in tests/test_kernels_parity.py (backend='emulate').")
    if not cupy_available():
        sys.exit("kernels_gpu.py needs CuPy to launch the kernels: pip install cupy-cuda12x (cupy-cuda13x for "
                 "CUDA 13), or run scripts/gpu_check.sh, which installs it")
    print(f"{environment()}\n")
    return report(ops, args)


def smoke(ops, args) -> int:
    global DEVICE, BACKEND, ADAM_SIZES, ROWS, COLS, HEADS, LENGTH
    DEVICE, BACKEND, ADAM_SIZES, ROWS, COLS, HEADS, LENGTH = "cpu", "emulate", (3000, 1000), 8, 96, 2, 16
    args.warmup, args.repeat = 1, 2
    print("smoke run on the CPU (emulated kernels, tiny sizes): checks the script, the numbers mean nothing\n")
    return report(ops, args)


def report(ops, args) -> int:
    """Print the markdown table for `ops`, then the kernels' own bytes-per-element statements."""
    print("| op | dtype | elements | bytes/elem | implementation | ms (median) | effective GB/s | / copy | "
          "time / ds_lab | max abs diff |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for op in ops:
        if op == "adam":
            rows = bench_adam(args)
        else:
            bench = {"layer_norm": bench_layer_norm, "bias_gelu": bench_bias_gelu,
                     "causal_softmax": bench_causal_softmax}[op]
            rows = bench(args, torch.float32) + bench(args, torch.bfloat16)
        print("\n".join(rows), flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print("\nBytes per element, as the kernels' headers state them:")
    for op in ops:
        print(f"- kernels/{KERNEL_FILE[op]}.cu: {header_bytes(KERNEL_FILE[op])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
