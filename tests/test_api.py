"""DeepSpeed's API shapes: initialize's arguments and 4-tuple, the engine's accessors, topology."""
import json
import subprocess
import sys
import textwrap

import pytest

import ds_lab
from ds_lab.comm.topology import ProcessTopology
from tests import workers


def test_topology_grid_derives_every_axis_group():
    topo = ProcessTopology(pipe=2, data=3, model=2)
    assert topo.world_size == 12
    assert topo.get_coord(7) == {"pipe": 1, "data": 0, "model": 1}
    assert topo.get_rank(pipe=1, data=2, model=0) == 10
    assert topo.axis_groups("model")[:2] == [[0, 1], [2, 3]]        # neighbours: fastest links
    assert topo.axis_groups("data")[0] == [0, 2, 4]
    assert topo.axis_groups("pipe")[0] == [0, 6]
    assert sorted(r for g in topo.axis_groups("data") for r in g) == list(range(12))


def test_process_groups_on_real_ranks_reduce_within_the_data_axis():
    results = ds_lab.launch(workers.topology_worker, 4, 1, 2, 2)
    assert [r["data_ranks"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["data_sum"] for r in results] == [2.0, 4.0, 2.0, 4.0]
    assert [r["dp_rank"] for r in results] == [0, 0, 1, 1] and results[0]["dp_size"] == 2


def test_initialize_honours_args_deepspeed_config_and_returns_deepspeeds_4_tuple(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({
        "train_batch_size": 8, "gradient_accumulation_steps": 2,
        "optimizer": {"type": "Adam", "params": {"lr": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.01, "warmup_num_steps": 10,
                                                      "warmup_type": "linear"}}}))
    r = ds_lab.launch(workers.api_worker, 2, str(path))[0]
    assert (r["tbs"], r["micro"], r["ga"]) == (8, 2, 2) and r["micro_shape"] == (2, 16)
    assert r["loader_batches"] == 32 // 2 // 2          # DistributedSampler: each rank its half
    assert r["scheduler"] == "WarmupLR" and r["optimizer_is_engine_optimizer"]
    assert r["boundaries"] == [False, True, False, True] and r["global_steps"] == 2
    # DeepSpeed: the first step() sets iteration 0, so after 2 steps the warmup is at 1/10
    assert r["lr0"] == [0.0] and r["lr1"] == [pytest.approx(0.01 * 1 / 10)]
    assert r["grad_norm"] > 0 and r["applied"]


def test_config_given_twice_is_an_error():
    import argparse
    with pytest.raises(ds_lab.ConfigError, match="config given twice"):
        ds_lab.initialize(args=argparse.Namespace(deepspeed_config="a.json"),
                          model=object(), config={"train_batch_size": 1}, dist_init_required=False)


def test_a_lone_process_becomes_a_world_of_one(tmp_path):
    script = tmp_path / "lone.py"
    script.write_text(textwrap.dedent("""
        import torch, ds_lab
        from ds_lab.models import GPT, GPTConfig
        engine, *_ = ds_lab.initialize(model=GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=8)),
                                       config={"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {}}})
        x = torch.randint(0, 256, (2, 8))
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        print("WORLD", ds_lab.comm.get_world_size(), "STEPS", engine.global_steps)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WORLD 1 STEPS 1" in proc.stdout


def test_unsupported_deepspeed_feature_fails_clearly():
    with pytest.raises(ds_lab.ConfigError, match="does not support yet"):
        ds_lab.DeepSpeedConfig.from_any({"train_batch_size": 2, "sparse_attention": {}})


def test_csv_monitor_steps_per_print_wall_clock_and_verbose_comms_logger(tmp_path, capfd):
    config = {"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {}}, "steps_per_print": 1,
              "wall_clock_breakdown": True, "comms_logger": {"enabled": True, "verbose": True},
              "csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "job"}}
    assert ds_lab.launch(workers.monitors_worker, 2, config) == [2, 2]
    lines = (tmp_path / "job" / "Train_Samples_train_loss.csv").read_text().splitlines()
    assert lines[0] == "step,Train/Samples/train_loss" and [l.split(",")[0] for l in lines[1:]] == ["4", "8"]
    out = capfd.readouterr().out
    assert "[ds_lab] step=2, skipped=0" in out and "time (ms) per step | forward:" in out
    assert "[ds_lab] comm op: all_reduce" in out
