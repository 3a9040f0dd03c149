"""`ds-lab train`: trains on real processes, prints the ledger and comm table, writes a report."""
import json

from matplotlib.image import imread

from ds_lab.cli import main

SMALL = ["--layers", "1", "--embd", "32", "--heads", "2", "--seq-len", "32", "--micro-batch", "2"]


def test_train_prints_memory_and_comm_and_writes_the_report(tmp_path, capsys):
    assert main(["train", "--world-size", "2", "--steps", "3", *SMALL, "--report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "memory per rank" in out and "model states/Ψ" in out and "all_reduce" in out
    for name in ("dashboard", "memory", "comm", "loss", "timeline"):
        image = imread(tmp_path / f"{name}.png")
        assert image.shape[0] > 300 and image.shape[1] > 500
    report = json.loads((tmp_path / "measurements.json").read_text())
    assert len(report["ranks"]) == 2 and len(report["ranks"][0]["losses"]) == 3
    memory = report["ranks"][0]["memory"]
    psi = report["ranks"][0]["num_parameters"]
    assert memory["params"] + memory["grads"] + memory["optimizer_states"] == 16 * psi
    assert report["theory"]["memory"]["params"] == 4 * psi


def test_train_with_a_bad_config_names_the_fix_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2}))
    assert main(["train", "--world-size", "2", "--config", str(bad)]) == 2
    assert "config error" in capsys.readouterr().err
