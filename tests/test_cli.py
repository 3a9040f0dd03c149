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


def test_train_progress_in_a_log_is_whole_lines_and_sparse(tmp_path, capsys):
    assert main(["train", "--world-size", "2", "--steps", "3", *SMALL]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: lines, not a redrawn bar
    bars = [line for line in err.splitlines() if "/3 [" in line]
    assert 1 <= len(bars) <= 3 and "3/3" in bars[-1] and "tok/s" in bars[-1]  # 3 steps in < 10 s: start and end


def test_progress_bar_redraws_one_line_in_a_terminal(monkeypatch):
    import io

    from ds_lab.train import progress_bar

    terminal = io.StringIO()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = progress_bar(5, tty=True)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert "\r" in terminal.getvalue() and terminal.getvalue().count("\n") == 1 and "5/5" in terminal.getvalue()
