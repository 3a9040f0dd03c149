"""`deepspeed.profiling`: the flops profiler (flops_profiler/), counted and timed per module.

    from ds_lab.profiling.flops_profiler import get_model_profile, FlopsProfiler
"""
from ds_lab.profiling import flops_profiler  # noqa: F401  (deepspeed.profiling.flops_profiler as an attribute)
