"""The README's library example runs as written."""
import os
import re


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r"## Use it as a library.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    reports = namespace["reports"]
    assert len(reports) == 2 and reports[0]["params"] > 0
    assert (tmp_path / "checkpoints" / "latest").exists()
    assert "all_reduce" in capsys.readouterr().out
