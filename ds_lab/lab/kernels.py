"""Fused kernels in the course (chapter 06): the roofline from the kernels' own header figures, the
bytes an unfused torch sequence moves for the same op, and parity measured through the emulation.

    points = roofline_points()                 # from the "// roofline:" lines of kernels/*.cu
    fig = draw_roofline(points, UNFUSED)       # fused vs unfused, on an H100's roof
"""
from __future__ import annotations

import re

import torch

from ds_lab.ops.emulate import KERNELS

# Datasheet figures (NVIDIA H100 SXM5 and A100 SXM4 80 GB): HBM bandwidth in bytes/s and fp32 (not
# tensor-core) peak in flop/s. Real kernels reach 80-90 % of the bandwidth at best (a device-to-
# device copy is the practical ceiling, which benchmarks/kernels_gpu.py measures).
GPUS = {"H100 SXM": dict(bandwidth=3.35e12, peak=67e12), "A100 80GB": dict(bandwidth=2.04e12, peak=19.5e12)}

# What the same op costs as a sequence of eager torch ops, fp32, if every op reads its inputs from
# DRAM and writes its output back (no op sees another's data in cache): bytes per element.
UNFUSED = {
    "bias_gelu_fwd_f32": ("t = x + b; y = gelu(t)", 16),                                   # 8 + 8
    "layer_norm_fwd_f32": ("mean, x - mean, square, mean, * rstd, * w, + b", 48),           # 4+8+8+4+8+8+8
    "causal_softmax_fwd_f32": ("masked_fill(mask, -inf), then softmax", 17),                # 4+1+4, 4+4
    "fused_adam_f32": ("_foreach: mul, lerp, mul, addcmul, sqrt, div, add, addcdiv", 84),  # see below
}
# Adam's 84: p *= decay (r/w p: 8), m.lerp_(g) (r m, g, w m: 12), v *= b2 (8), v += g*g (r v, g, g,
# w v: 16), d = sqrt(v) (8), d /= c (8), d += eps (8), p += m/d (r p, m, d, w p: 16).

_LINE = re.compile(r"^//\s*roofline:\s*(\w+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)


def roofline_points() -> dict:
    """{kernel: {"file", "bytes", "flops", "intensity"}} from every kernels/*.cu header."""
    points = {}
    for cu in sorted(KERNELS.glob("*.cu")):
        for name, nbytes, flops in _LINE.findall(cu.read_text()):
            points[name] = dict(file=cu.name, bytes=float(nbytes), flops=float(flops),
                                intensity=float(flops) / float(nbytes))
    return points


def bound_seconds(elements: int, bytes_per_element: float, flops_per_element: float, gpu: str = "H100 SXM") -> float:
    """The roofline's lower bound on the time: max(bytes / bandwidth, flops / peak)."""
    spec = GPUS[gpu]
    return max(elements * bytes_per_element / spec["bandwidth"], elements * flops_per_element / spec["peak"])


def draw_roofline(points: dict, unfused: dict | None = None, gpu: str = "H100 SXM", figsize=(8, 4.5)):
    """Log-log roofline of `gpu`: attainable flop/s against flops per byte; each fused kernel at its
    header's intensity, and (hollow) the same op done unfused, `unfused[kernel] = (label, bytes)`."""
    import matplotlib.pyplot as plt

    spec = GPUS[gpu]
    ridge = spec["peak"] / spec["bandwidth"]
    fig, ax = plt.subplots(figsize=figsize)
    xs = [0.01, ridge, 1000]
    ax.plot(xs, [min(spec["peak"], x * spec["bandwidth"]) for x in xs], color="black")
    ax.annotate(f"{spec['bandwidth'] / 1e12:.2f} TB/s", (0.05, 0.05 * spec["bandwidth"] * 1.3), rotation=28)
    ax.annotate(f"fp32 peak {spec['peak'] / 1e12:.1f} TFLOP/s (ridge at {ridge:.0f} flop/B)",
                (ridge * 1.2, spec["peak"] * 1.15))
    for i, (name, p) in enumerate(sorted(points.items())):
        color = plt.cm.tab10(i % 10)
        ax.plot(p["intensity"], p["intensity"] * spec["bandwidth"], "o", color=color, label=name)
        if unfused and name in unfused:
            x = p["flops"] / unfused[name][1]
            ax.plot(x, x * spec["bandwidth"], "o", mfc="none", color=color)
            ax.annotate("", (p["intensity"], p["intensity"] * spec["bandwidth"]), (x, x * spec["bandwidth"]),
                        arrowprops=dict(arrowstyle="->", color=color))
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlim(0.01, 1000), ax.set_ylim(1e10, spec["peak"] * 3)
    ax.set_xlabel("arithmetic intensity (flop per byte moved)"), ax.set_ylabel("attainable flop/s")
    ax.set_title(f"{gpu}: every fused kernel sits far left of the ridge (memory-bound); hollow = unfused")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    return fig


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def function_source(file: str, name: str) -> str:
    """The definition of function or kernel `name` in kernels/<file> (with its `template` line)."""
    text = (KERNELS / file).read_text()
    for match in re.finditer(r"\b" + name + r"\s*\(", text):
        depth, i = 0, match.end() - 1
        for i in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
        rest = text[i + 1:].lstrip()
        if not rest.startswith("{"):
            continue  # a call or a declaration, not the definition
        begin = text.rfind("\n", 0, match.start()) + 1
        previous = text.rfind("\n", 0, begin - 1) + 1
        if text[previous:begin].lstrip().startswith("template"):
            begin = previous
        body, depth = text.index("{", i), 0
        for j in range(body, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[begin:j + 1]
    raise ValueError(f"no definition of {name} in {file}")
