"""The flops profiler: parameters, MACs, FLOPs and latency of each module in one forward pass.

    from ds_lab.profiling.flops_profiler import get_model_profile
    flops, macs, params = get_model_profile(model, kwargs={"input_ids": ids}, as_string=False)

    prof = FlopsProfiler(model)            # or, in training: "flops_profiler": {"enabled": true}
    prof.start_profile()
    loss = model(**batch).loss
    prof.stop_profile()
    prof.print_model_profile(profile_step=1)
    prof.end_profile()

For a GPT (Ψ_m = weights of its matmuls, 12h² per layer + the vocabulary projection h·V; t = b·s
tokens) the forward is 2·Ψ_m·t + 4·b·s²·h per layer (attention) + the per-element terms of the
norms and GeLU (counting.py). Training, with the backward twice the forward, is 3x that, close to
the rule 6·Ψ·t: above it by attention's s² term, below by the parameters that do no matmul
(position embedding, biases, norms).

With the engine ("flops_profiler" config section, DeepSpeed's keys), rank 0 profiles the forward of
step `profile_step` and, after that step, prints the profile with the model FLOPs utilisation: the
training FLOPs (3 + recompute_fwd_factor) x forward over the step's wall time, against a peak
measured once on this machine (`measured_peak_flops`: a square matmul of the model's dtype, the
best of a few runs) — a CPU has no datasheet number that this process could trust.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn as nn

from ds_lab.profiling.flops_profiler import counting

DEFAULT_PRECISION = 2
_PEAK: dict = {}  # (device type, dtype) -> measured FLOP/s


def _sync(device=None) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measured_peak_flops(device="cpu", dtype=torch.float32, n: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of an n x n matmul on `device` in `dtype`, the best of `repeats` (measured once per process)."""
    key = (torch.device(device).type, dtype)
    if key not in _PEAK:
        generator = torch.Generator(device=device).manual_seed(0)  # the run's own random stream is untouched
        a = torch.randn(n, n, device=device, generator=generator).to(dtype)
        b = torch.randn(n, n, device=device, generator=generator).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            _sync()
            t0 = time.perf_counter()
            a @ b
            _sync()
            best = min(best, time.perf_counter() - t0)
        _PEAK[key] = 2 * n ** 3 / best
    return _PEAK[key]


class FlopsProfiler:
    """DeepSpeed's FlopsProfiler(model, ds_engine=None, recompute_fwd_factor=0.0): per-module
    `__flops__`, `__macs__`, `__params__`, `__duration__` while profiling."""

    def __init__(self, model, ds_engine=None, recompute_fwd_factor=0.0):
        self.model, self.ds_engine, self.recompute_fwd_factor = model, ds_engine, recompute_fwd_factor
        self.started = False
        self.func_patched = False
        self._handles: list = []
        self._t_start = None
        self.last_summary = None  # what the last print_model_profile showed

    def start_profile(self, ignore_list=None) -> None:
        """Reset the counts, wrap torch's functions (counting.py) and hook every module."""
        for handle in self._handles:  # started again before stop_profile: no second set of hooks
            handle.remove()
        self._handles = []
        self.reset_profile()
        counting.patch()
        ignore = tuple(ignore_list or ())

        def pre(module, inputs):
            counting.push()
            _sync()
            module.__start_time__ = time.perf_counter()

        def post(module, inputs, output):
            _sync()
            module.__duration__ += time.perf_counter() - module.__start_time__
            flops, macs = counting.pop()
            module.__flops__ += flops
            module.__macs__ += macs

        for module in self.model.modules():
            if ignore and isinstance(module, ignore):
                continue
            self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self.started, self.func_patched = True, True
        self._t_start = time.perf_counter()

    def stop_profile(self) -> None:
        """Put torch's functions back and remove the hooks; the counts stay until end_profile."""
        if self.started and self.func_patched:
            counting.unpatch()
            self.func_patched = False
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset_profile(self) -> None:
        for module in self.model.modules():
            module.__flops__ = module.__macs__ = 0
            module.__params__ = sum(p.numel() for p in module.parameters())
            module.__start_time__ = module.__duration__ = 0

    def end_profile(self) -> None:
        """Stop, and remove the attributes the profile added."""
        if not self.started:
            return
        self.stop_profile()
        self.started = False
        for module in self.model.modules():
            for name in ("__flops__", "__macs__", "__params__", "__start_time__", "__duration__"):
                if hasattr(module, name):
                    delattr(module, name)

    def get_total_flops(self, as_string=False):
        total = get_module_flops(self.model)
        return number_to_string(total) if as_string else total

    def get_total_macs(self, as_string=False):
        total = get_module_macs(self.model)
        return macs_to_string(total) if as_string else total

    def get_total_duration(self, as_string=False):
        total = get_module_duration(self.model)
        return duration_to_string(total) if as_string else total

    def get_total_params(self, as_string=False):
        total = self.model.__params__
        return params_to_string(total) if as_string else total

    def print_model_profile(self, profile_step=1, module_depth=-1, top_modules=1, detailed=True, output_file=None):
        """Print the summary, the top modules per depth and (detailed) the model tree annotated with
        each module's params, MACs, latency and FLOP/s; to `output_file` when given."""
        if not self.started:
            return
        if output_file:
            os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
            with open(output_file, "w", encoding="utf-8") as f:
                self._print(f, profile_step, module_depth, top_modules, detailed)
        else:
            self._print(sys.stdout, profile_step, module_depth, top_modules, detailed)

    def summary(self) -> dict:
        """The numbers the printed summary shows (the engine's MFU among them), as a dict."""
        flops, duration = self.get_total_flops(), self.get_total_duration()
        mp_size = self.ds_engine.grid.size("model") if self.ds_engine is not None else 1
        out = dict(params=self.get_total_params(), macs=self.get_total_macs(), flops=flops, fwd_latency=duration,
                   mp_size=mp_size, fwd_flops_per_second=flops / duration if duration else 0.0)
        if self.ds_engine is not None and self._t_start is not None:
            iter_latency = time.perf_counter() - self._t_start  # from this step's forward to its step()
            param = next(self.model.parameters(), None)
            device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
            factor = 3 + self.recompute_fwd_factor
            peak = measured_peak_flops(device, dtype if dtype.is_floating_point else torch.float32)
            out.update(train_flops=factor * flops, iter_latency=iter_latency, peak_flops_per_second=peak,
                       train_flops_per_second=factor * flops / iter_latency,
                       mfu=factor * flops / iter_latency / peak)
        return out

    def _print(self, f, profile_step, module_depth, top_modules, detailed) -> None:
        s = self.last_summary = self.summary()
        line = "{:<70}  {}".format
        p = lambda *a: print(*a, file=f)  # noqa: E731
        p("\n-------------------------- DeepSpeed Flops Profiler --------------------------")
        p(f"Profile Summary at step {profile_step}:")
        engine = self.ds_engine
        if engine is not None:
            p(line("world size: ", engine.world_size))
            p(line("data parallel size: ", engine.dp_world_size))
            p(line("model parallel size: ", s["mp_size"]))
            p(line("batch size per GPU: ", engine.train_micro_batch_size_per_gpu()))
        p(line("params per GPU: ", params_to_string(s["params"])))
        p(line("params of model = params per GPU * mp_size: ", params_to_string(s["params"] * s["mp_size"])))
        p(line("fwd MACs per GPU: ", macs_to_string(s["macs"])))
        p(line("fwd flops per GPU: ", number_to_string(s["flops"])))
        p(line("fwd flops of model = fwd flops per GPU * mp_size: ", number_to_string(s["flops"] * s["mp_size"])))
        p(line("fwd latency: ", duration_to_string(s["fwd_latency"])))
        p(line("fwd FLOPS per GPU = fwd flops per GPU / fwd latency: ", flops_to_string(s["fwd_flops_per_second"])))
        if "mfu" in s:
            factor = 3 + self.recompute_fwd_factor
            p(line("iter latency (this step's forward to the end of its step): ",
                   duration_to_string(s["iter_latency"])))
            p(line(f"FLOPS per GPU = {factor:g} * fwd flops per GPU / iter latency: ",
                   flops_to_string(s["train_flops_per_second"])))
            p(line("peak FLOPS (measured: square matmul on this device): ",
                   flops_to_string(s["peak_flops_per_second"])))
            p(line("model FLOPs utilisation (MFU): ", f"{100 * s['mfu']:.2f} %"))
        p("\n----------------------------- Aggregated Profile per GPU -----------------------------")
        self.print_model_aggregated_profile(module_depth, top_modules, file=f)
        if detailed:
            p("\n------------------------------ Detailed Profile per GPU ------------------------------")
            p("Each module: params, % of params, MACs, % of MACs, fwd latency, % of latency, fwd FLOPS")
            self._print_tree(self.model, "", 0, s, f)
        p("------------------------------------------------------------------------------")

    def _print_tree(self, module, name, depth, totals, f) -> None:
        params, macs, duration = module.__params__, get_module_macs(module), get_module_duration(module)
        pct = lambda a, b: round(100 * a / b, DEFAULT_PRECISION) if b else 0  # noqa: E731
        items = [f"{params_to_string(params)} = {pct(params, totals['params']):g}% Params",
                 f"{macs_to_string(macs)} = {pct(macs, totals['macs']):g}% MACs",
                 f"{duration_to_string(duration)} = {pct(duration, totals['fwd_latency']):g}% latency",
                 flops_to_string(get_module_flops(module) / duration if duration else 0)]
        label = f"({name}): " if name else ""
        print("  " * depth + f"{label}{type(module).__name__}({', '.join(items)})", file=f)
        for child_name, child in module.named_children():
            self._print_tree(child, child_name, depth + 1, totals, f)

    def print_model_aggregated_profile(self, module_depth=-1, top_modules=1, file=None) -> None:
        """The top `top_modules` module types by params, MACs and latency at each depth."""
        if not hasattr(self.model, "__flops__"):
            print("no profile: call this between start_profile() and end_profile()", file=file)
            return
        info: dict = {}

        def walk(module, depth):
            row = info.setdefault(depth, {}).setdefault(type(module).__name__, [0, 0, 0.0])
            row[0] += get_module_macs(module)
            row[1] += module.__params__
            row[2] += get_module_duration(module)
            for child in module.children():
                walk(child, depth + 1)

        walk(self.model, 0)
        depth = len(info) - 1 if module_depth == -1 else module_depth
        print(f"Top {top_modules} modules in terms of params, MACs or fwd latency at different model depths:",
              file=file)

        def top(rows, i, fmt):
            ranked = sorted(rows.items(), key=lambda kv: kv[1][i], reverse=True)[:top_modules]
            return {name: fmt(values[i]) for name, values in ranked}

        for d in range(min(depth, len(info))):  # as DeepSpeed: the innermost depth is not listed
            print(f"depth {d}:", file=file)
            print(f"    params      - {top(info[d], 1, params_to_string)}", file=file)
            print(f"    MACs        - {top(info[d], 0, macs_to_string)}", file=file)
            print(f"    fwd latency - {top(info[d], 2, duration_to_string)}", file=file)

    # ---- the engine's use ("flops_profiler" section) ---------------------------------------------
    @classmethod
    def for_engine(cls, engine):
        """None unless the config enables it; else a profiler whose hooks on the engine start it at the
        forward of step `profile_step` (rank 0) and stop it when that forward returns; the engine
        calls `after_step()` at the end of each step() to print and end it, as DeepSpeed's does."""
        section = getattr(engine.config, "flops_profiler", None)
        if section is None or not section.enabled:
            return None
        profiler = cls(engine.module, engine, section.recompute_fwd_factor)
        profiler.section = section

        def due():
            return engine.global_steps == section.profile_step and engine.global_rank == 0

        engine.register_forward_pre_hook(lambda module, inputs: profiler.start_profile() if due() else None)
        engine.register_forward_hook(lambda module, inputs, output: profiler.stop_profile() if due() else None)
        return profiler

    def after_step(self) -> None:
        if self.started:
            section = self.section
            self.print_model_profile(profile_step=section.profile_step, module_depth=section.module_depth,
                                     top_modules=section.top_modules, detailed=section.detailed,
                                     output_file=section.output_file)
            self.end_profile()


def get_module_flops(module) -> int:
    return sum(m.__flops__ for m in module.modules())


def get_module_macs(module) -> int:
    return sum(m.__macs__ for m in module.modules())


def get_module_duration(module) -> float:
    """A module's own forward time; for one never called itself (a ModuleList), its children's."""
    if module.__duration__ == 0:
        return sum(get_module_duration(m) for m in module.children())
    return module.__duration__


def number_to_string(num, units=None, precision=DEFAULT_PRECISION) -> str:
    scales = {"T": 1e12, "G": 1e9, "M": 1e6, "K": 1e3, "": 1, "m": 1e-3, "u": 1e-6}
    if units is None:
        units = next((u for u, m in scales.items() if abs(num) >= m), "u") if num else ""
    return f"{round(num / scales.get(units, 1), precision):g} {units}"


def macs_to_string(macs, units=None, precision=DEFAULT_PRECISION) -> str:
    return f"{number_to_string(macs, units, precision)}MACs"


def flops_to_string(flops, units=None, precision=DEFAULT_PRECISION) -> str:
    return f"{number_to_string(flops, units, precision)}FLOPS"


def params_to_string(params, units=None, precision=DEFAULT_PRECISION) -> str:
    units = units.replace("B", "G") if units else units
    return number_to_string(params, units, precision).replace("G", "B").strip()


def duration_to_string(duration, units=None, precision=DEFAULT_PRECISION) -> str:
    return f"{number_to_string(duration, units, precision)}s"


def get_model_profile(model, input_shape=None, args=[], kwargs={}, print_profile=True, detailed=True,  # noqa: B006
                      module_depth=-1, top_modules=1, warm_up=1, as_string=True, output_file=None,
                      ignore_modules=None, mode="forward"):
    """DeepSpeed's get_model_profile: (flops, macs, params) of one forward (or `generate`) after
    `warm_up` unprofiled runs, in eval mode. `input_shape`: the model takes one tensor of that shape
    (the parameters' dtype) as its only argument; else pass `args` / `kwargs`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if mode not in ("forward", "generate"):
        raise ValueError(f"mode {mode!r}: use 'forward' or 'generate'")
    if input_shape is not None:
        if not isinstance(input_shape, tuple) or not input_shape:
            raise ValueError(f"input_shape must be a non-empty tuple, e.g. (batch, features); got {input_shape!r}")
        param = next(model.parameters(), None)
        args = [torch.empty(input_shape, dtype=param.dtype if param is not None else torch.float32,
                            device=param.device if param is not None else "cpu")]
    if not args and not kwargs:
        raise ValueError("give input_shape, or args and/or kwargs for the model's forward")
    model.eval()
    run = model if mode == "forward" else model.generate
    for _ in range(warm_up):
        run(*args, **kwargs)
    prof = FlopsProfiler(model)
    prof.start_profile(ignore_list=ignore_modules)
    run(*args, **kwargs)
    flops, macs, params = prof.get_total_flops(), prof.get_total_macs(), prof.get_total_params()
    if print_profile:
        prof.print_model_profile(profile_step=warm_up, module_depth=module_depth, top_modules=top_modules,
                                 detailed=detailed, output_file=output_file)
    prof.end_profile()
    if as_string:
        return number_to_string(flops), macs_to_string(macs), params_to_string(params)
    return flops, macs, params
