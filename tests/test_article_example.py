"""The article's §5.2 example runs with only the import changed: `import ds_lab as deepspeed`."""
import os

import ds_lab
from tests import workers


def test_article_gpt2_example_runs_on_two_ranks(tmp_path):
    results = ds_lab.launch(workers.hf_article_example, 2, str(tmp_path))
    assert [r["steps"] for r in results] == [3, 3]
    assert all(0 < loss < 10 for r in results for loss in r["losses"])
    assert open(tmp_path / "latest").read() == "global_step3"
    assert os.path.exists(tmp_path / "global_step3" / "mp_rank_00_model_states.pt")
