"""Pipeline parallelism, importable as `deepspeed.pipe` after `import ds_lab as deepspeed`.

    from ds_lab.pipe import PipelineModule, LayerSpec, TiedLayerSpec

The model is a list of layers cut into P stages (module.py, partition.py); one batch of m
micro-batches runs through them by a schedule decided in advance (schedule.py: AFAB, 1F1B,
interleaved 1F1B), activations and gradients crossing between stages by send/recv (p2p.py), and
the engine (engine.py) executes the schedule and steps. Each stage idles (P-1)/(m+P-1) of the time.
"""
from ds_lab.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from ds_lab.pipe.partition import partition_balanced, partition_uniform
from ds_lab.pipe.schedule import (GPipeSchedule, InferenceSchedule, InterleavedSchedule, TrainSchedule, bubble_fraction,
                                  make_schedule, theoretical_bubble, timeline)

__all__ = ["PipelineModule", "LayerSpec", "TiedLayerSpec", "partition_uniform", "partition_balanced",
           "TrainSchedule", "GPipeSchedule", "InterleavedSchedule", "InferenceSchedule", "make_schedule",
           "timeline", "bubble_fraction", "theoretical_bubble", "PipelineEngine"]


def __getattr__(name):
    if name == "PipelineEngine":  # the engine pulls in the runtime; the module and schedules do not need it
        from ds_lab.pipe.engine import PipelineEngine
        return PipelineEngine
    raise AttributeError(f"module 'ds_lab.pipe' has no attribute {name!r}")
