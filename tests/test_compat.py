"""The DeepSpeed config-compatibility table (ds_lab/lab/compat.py, docs/config_compatibility.md)."""
import pathlib
import subprocess
import sys

from ds_lab.lab.compat import (DS_LAB_ONLY, OWN, REFUSED, SUPPORTED, check_rows, compatibility_markdown,
                               compatibility_rows)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_committed_table_is_up_to_date():
    committed = (ROOT / "docs" / "config_compatibility.md").read_text(encoding="utf-8")
    assert committed == compatibility_markdown(), "run: python scripts/config_compat.py"


def test_check_script_agrees():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_compat.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_row_is_what_parsing_that_key_does():
    assert check_rows() == []


def test_table_covers_the_schema_and_every_refusal_has_a_reason():
    rows = compatibility_rows()
    names = {(r.section, r.key) for r in rows}
    assert len(names) == len(rows), "a key is listed twice"
    assert {("", "zero_optimization"), ("zero_optimization", "stage"), ("optimizer.type", "OneBitAdam"),
            ("zero_optimization", "offload_optimizer"), ("", "bfloat16")} <= names
    assert set(DS_LAB_ONLY) <= {(r.section, r.key) for r in rows if r.status == OWN}
    assert all(r.note for r in rows if r.status == REFUSED)
    assert sum(r.status == SUPPORTED for r in rows) > 40
