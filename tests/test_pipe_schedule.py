"""Pipeline partitioning and schedules, as data: no processes. Every micro-batch is forwarded and
backwarded once per stage, every send meets its receive in order, and the simulated idle share is
the bubble formula (P-1)/(m+P-1) — smaller for the interleaved schedule, (P-1)/(v m+P-1)."""
import pytest
import torch
from torch import nn

import ds_lab as deepspeed
from ds_lab.pipe import partition_balanced, partition_uniform
from ds_lab.pipe.schedule import (BackwardPass, ForwardPass, OptimizerStep, ReduceGrads, ReduceTiedGrads,
                                  bubble_fraction, make_schedule, messages, theoretical_bubble, timeline)
from tests import pipe_workers as pw


def test_pipe_is_importable_as_deepspeed_pipe():
    assert deepspeed.pipe.PipelineModule is not None
    assert {"LayerSpec", "TiedLayerSpec", "PipelineModule"} <= set(dir(deepspeed.pipe))


def test_uniform_gives_leftover_layers_to_the_first_stages():
    assert partition_uniform(9, 2) == [0, 5, 9]
    assert partition_uniform(10, 4) == [0, 3, 6, 8, 10]
    assert partition_uniform(2, 3) == [0, 1, 2, 2]


def test_balanced_minimises_the_heaviest_stage():
    assert partition_balanced([1, 1, 1, 1], 2) == [0, 2, 4]
    assert partition_balanced([5, 1, 1, 1, 1, 1], 2) == [0, 1, 6]
    parts = partition_balanced([3, 1, 4, 1, 5, 9, 2, 6], 3)
    assert max(sum([3, 1, 4, 1, 5, 9, 2, 6][a:b]) for a, b in zip(parts, parts[1:])) == 14


class Wide(nn.Linear):
    pass


def test_parameters_method_counts_each_tied_occurrence_and_builds_only_the_local_stage():
    layers = [pw.TiedLayerSpec("e", nn.Embedding, 100, 10), pw.LayerSpec(nn.Linear, 10, 10),
              pw.LayerSpec(nn.Linear, 10, 10), pw.TiedLayerSpec("e", nn.Embedding, 100, 10)]
    module = pw.PipelineModule(layers, num_stages=2, partition_method="parameters")
    assert module.parts == [0, 2, 4]  # 1000 + 110 | 110 + 1000
    assert module.stage_id == 0 and set(dict(module.named_children())) == {"tied_modules", "1"}
    assert module.tied_stages == {"e": [0, 1]}


def test_uniform_and_type_regex_methods():
    specs = [pw.LayerSpec(nn.Linear, 4, 4)] + [pw.LayerSpec(Wide, 4, 4) for _ in range(4)] + [pw.LayerSpec(nn.ReLU)] * 4
    assert pw.PipelineModule(specs, num_stages=2, partition_method="uniform").parts == [0, 5, 9]
    parts = pw.PipelineModule(specs, num_stages=2, partition_method="type:wIDE").parts
    assert parts[1] == 3  # two Wide layers per stage (case-insensitive match on the class name)
    with pytest.raises(ValueError, match="use 'parameters', 'uniform' or 'type:REGEX'"):
        pw.PipelineModule(specs, num_stages=2, partition_method="best")


SCHEDULE_CASES = [(name, p, m, v) for name, v in (("afab", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3))
                  for p in (2, 3, 4) for m in (1, 2, 4, 8) if name != "interleaved" or m % p == 0]


@pytest.mark.parametrize("name,p,m,v", SCHEDULE_CASES)
def test_schedule_runs_each_micro_batch_once_matches_messages_and_has_the_formula_bubble(name, p, m, v):
    schedules = [make_schedule(name, m, p, s, v) for s in range(p)]
    for sched in schedules:
        cmds = sched.instructions()
        for kind in (ForwardPass, BackwardPass):
            done = sorted((c.micro_batch, c.chunk) for c in cmds if isinstance(c, kind))
            assert done == sorted((mb, c) for mb in range(m) for c in range(v))
        assert cmds[-3:] == [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]
    sent = messages(schedules)
    assert sent["sent"] == sent["received"]
    slots = timeline(schedules)  # raises on a deadlock
    assert bubble_fraction(slots) == pytest.approx(theoretical_bubble(p, m, v), abs=1e-9)


def test_interleaving_shrinks_the_bubble_and_1f1b_bounds_live_micro_batches():
    flat = [make_schedule("1f1b", 8, 4, s) for s in range(4)]
    inter = [make_schedule("interleaved", 8, 4, s, 2) for s in range(4)]
    assert bubble_fraction(timeline(inter)) < bubble_fraction(timeline(flat))
    for name, bound in (("1f1b", lambda s: 4 - s), ("afab", lambda s: 8)):
        for s in range(4):
            live = peak = 0
            for kind, *_ in make_schedule(name, 8, 4, s).compute_order():
                live += 1 if kind == "F" else -1
                peak = max(peak, live)
            assert peak == bound(s)


def test_schedules_print_and_refuse_what_they_cannot_run():
    text = str(make_schedule("1f1b", 4, 3, 1))
    assert "RecvActivation(0), ForwardPass(0), SendActivation(0)" in text and "OptimizerStep()" in text
    with pytest.raises(ValueError, match="multiple of the stage count"):
        make_schedule("interleaved", 3, 2, 0, 2)
    with pytest.raises(ValueError, match="needs the 'interleaved' schedule"):
        make_schedule("1f1b", 4, 2, 0, 2)


def test_pipeline_config_section_takes_schedule_and_virtual_stages_and_refuses_the_rest():
    from ds_lab.config import ConfigError, DeepSpeedConfig
    batch = {"train_batch_size": 4}
    cfg = DeepSpeedConfig.from_any({**batch, "pipeline": {"stages": 2, "schedule": "interleaved", "virtual_stages": 2}})
    assert (cfg.pipeline.stages, cfg.pipeline.schedule, cfg.pipeline.virtual_stages) == (2, "interleaved", 2)
    assert DeepSpeedConfig.from_any(batch).pipeline.schedule == "1f1b"
    with pytest.raises(ConfigError, match="must be '1f1b', 'afab' or 'interleaved'"):
        DeepSpeedConfig.from_any({**batch, "pipeline": {"schedule": "zigzag"}})
    with pytest.raises(ConfigError, match=r"set PipelineModule\(partition_method=...\) instead"):
        DeepSpeedConfig.from_any({**batch, "pipeline": {"partition": "best"}})


def test_a_pipeline_section_without_a_pipeline_module_is_refused():
    # on a launched rank, not in this process: a process group initialised here would be inherited by
    # every later fork-launched rank, whose copy of it can hang when destroyed (gloo, see the report)
    message = deepspeed.launch(pw.pipeline_section_on_a_plain_model, 1)[0]
    assert "not a ds_lab.pipe.PipelineModule" in message
