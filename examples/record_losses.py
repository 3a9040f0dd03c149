"""Run the example scripts under DeepSpeed or ds_lab and collect each rank's losses.

The scripts are written for DeepSpeed. `ds_lab_source` makes the ds_lab variant by changing only
the imports (`import deepspeed` -> `import ds_lab as deepspeed`, `from deepspeed.x` -> `from ds_lab.x`).
Recording DeepSpeed's losses (the fixture tests/deepspeed_examples.json; needs a Python with
DeepSpeed, here DeepSpeed 0.19.8 on CPU):

    python examples/record_losses.py --torchrun /path/to/deepspeed-venv/bin/torchrun

The last bits of the CPU kernels depend on the CPU (torch's vector code path, the BLAS's choices),
so each recording names the CPU it was made on, and a recording made on another CPU is added to the
fixture, not swapped in. tests/test_examples.py runs the same cases on ds_lab (with this Python's
torchrun) and compares with the recording made on a CPU like this one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
FIXTURE = EXAMPLES.parent / "tests" / "deepspeed_examples.json"
WORLD_SIZE = 2

# name: (script, config, extra arguments); "{dir}" is a fresh directory shared by the cases of one
# checkpoint family (the resumed run loads what the uninterrupted run saved)
CASES = {
    "cifar10_fp32": ("cifar10_deepspeed.py", "cifar10_fp32.json", []),
    "cifar10_bf16": ("cifar10_deepspeed.py", "cifar10_bf16.json", []),
    "cifar10_bf16_zero1": ("cifar10_deepspeed.py", "cifar10_bf16_zero1.json", []),
    "cifar10_bf16_zero1_fp32_accum": ("cifar10_deepspeed.py", "cifar10_bf16_zero1_fp32_accum.json", []),
    "cifar10_bf16_zero2": ("cifar10_deepspeed.py", "cifar10_bf16_zero2.json", []),
    "cifar10_bf16_zero2_fp32_accum": ("cifar10_deepspeed.py", "cifar10_bf16_zero2_fp32_accum.json", []),
    "bert_zero1": ("bert_mlm_deepspeed.py", "bert_zero1.json", []),
    "bert_zero2": ("bert_mlm_deepspeed.py", "bert_zero2.json", []),
    "checkpoint_zero1": ("checkpoint_resume_deepspeed.py", "checkpoint_zero1.json", ["--checkpoint_dir", "{dir}"]),
    "checkpoint_zero1_resumed": ("checkpoint_resume_deepspeed.py", "checkpoint_zero1.json",
                                 ["--checkpoint_dir", "{dir}", "--resume"]),
}

LOSS_LINE = re.compile(r"LOSS (\d+) (\d+) ([-+0-9.eE]+|nan|inf)")


def ds_lab_source(source: str) -> str:
    """The same script with only its imports changed to ds_lab's."""
    source = re.sub(r"^import deepspeed$", "import ds_lab as deepspeed", source, flags=re.M)
    return re.sub(r"^from deepspeed(\.| )", r"from ds_lab\1", source, flags=re.M)


def command(torchrun: str, script: str, config: str, extra: list, directory: str) -> list:
    return [torchrun, "--standalone", "--nproc-per-node", str(WORLD_SIZE), script, "--deepspeed",
            "--deepspeed_config", str(EXAMPLES / config)] + [a.replace("{dir}", directory) for a in extra]


def shell_command(name: str) -> str:
    """The command that recorded a case, as one would type it from the repository root."""
    script, config, extra = CASES[name]
    return " ".join(["DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node", str(WORLD_SIZE),
                     f"examples/{script} --deepspeed --deepspeed_config examples/{config}"] +
                    [a.replace("{dir}", "CHECKPOINT_DIR") for a in extra])


def parse_losses(output: str) -> dict:
    """{rank: [loss of micro-step 0, 1, ...]} from the LOSS lines (ranks' lines may interleave)."""
    found = {}
    for rank, step, value in LOSS_LINE.findall(output):
        found.setdefault(rank, {})[int(step)] = float(value)
    return {rank: [steps[s] for s in sorted(steps)] for rank, steps in sorted(found.items())}


def run_case(name: str, torchrun: str, directory: str, ds_lab: bool, env: dict | None = None,
             timeout: int = 600) -> dict:
    script, config, extra = CASES[name]
    path = str(EXAMPLES / script)
    if ds_lab:
        path = str(Path(directory) / f"ds_lab_{script}")
        Path(path).write_text(ds_lab_source((EXAMPLES / script).read_text()))
    result = subprocess.run(command(torchrun, path, config, extra, directory), capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})}, cwd=directory)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return parse_losses(result.stdout)


def cpu(python: str | None = None) -> dict:
    """The CPU as the kernels see it: torch's capability (its vector instruction set) and the model name,
    asked of `python`'s torch (None: this process's)."""
    if python is None:
        import torch
        capability = torch.backends.cpu.get_cpu_capability()
    else:
        capability = subprocess.run([python, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                                    capture_output=True, text=True, check=True).stdout.strip()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return {"capability": capability, "model": model}


def recordings(fixture: dict) -> list:
    """Every recording in a fixture: [{"cpu": {...} or None (not recorded), "cases": {...}}]."""
    return fixture.get("recordings") or [{"cpu": None, "cases": fixture["cases"]}]


def record(torchrun: str, previous: dict | None = None) -> dict:
    """Record every case with the DeepSpeed of `torchrun`'s Python. `previous`: a fixture whose
    recordings made on other CPUs are kept (one recording per CPU)."""
    import importlib.metadata as metadata

    python = str(Path(torchrun).with_name("python"))
    version = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('deepspeed'), "
                              "m.version('torch'), m.version('transformers'))"],
                             capture_output=True, text=True, check=True).stdout.split()
    fixture = {"deepspeed": version[0], "torch": version[1], "transformers": version[2],
               "world_size": WORLD_SIZE, "ds_lab_torch": metadata.version("torch"),
               "command": "DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 examples/<script> "
                          "--deepspeed --deepspeed_config examples/<config> <args>",
               "recordings": []}
    this_cpu, cases = cpu(python), {}
    with tempfile.TemporaryDirectory() as checkpoints:
        for name, (script, config, extra) in CASES.items():
            print(f"recording {name}", flush=True)
            losses = run_case(name, torchrun, checkpoints, ds_lab=False, env={"DS_ACCELERATOR": "cpu"})
            cases[name] = {"script": f"examples/{script}", "config": f"examples/{config}",
                           "args": extra, "command": shell_command(name), "losses": losses}
    kept = [r for r in recordings(previous) if r["cpu"] != this_cpu] if previous else []
    fixture["recordings"] = kept + [{"cpu": this_cpu, "cases": cases}]
    return fixture


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torchrun", required=True, help="torchrun of a Python environment with DeepSpeed")
    parser.add_argument("--out", default=str(FIXTURE))
    parser.add_argument("--replace", action="store_true", help="drop the recordings made on other CPUs")
    args = parser.parse_args()
    previous = None if args.replace or not Path(args.out).exists() else json.loads(Path(args.out).read_text())
    fixture = record(args.torchrun, previous)
    Path(args.out).write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
