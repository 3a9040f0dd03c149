"""`deepspeed.profiling.flops_profiler`: per-module parameters, MACs, FLOPs and latency of a forward.

How the counting works: flops_profiler/counting.py; the profiler, its report and the engine's use of
it: flops_profiler/profiler.py.
"""
from ds_lab.profiling.flops_profiler.profiler import (FlopsProfiler, duration_to_string, flops_to_string,
                                                      get_model_profile, macs_to_string, measured_peak_flops,
                                                      number_to_string, params_to_string)

__all__ = ["FlopsProfiler", "duration_to_string", "flops_to_string", "get_model_profile", "macs_to_string",
           "measured_peak_flops", "number_to_string", "params_to_string"]
