"""Pipeline checkpoints in DeepSpeed's layout (layer_XX-model_states.pt + mp_rank_XX_model_states.pt):
a run resumes exactly at the same shape (ZeRO-1 optimizer shards included), and the layer files load
into a pipeline cut differently (PP2 x DP2 -> PP4), weights only, as the refusal says."""
import os

import torch

import ds_lab
from tests import pipe_workers as pw


def test_pipeline_checkpoint_resumes_and_loads_at_another_pipe_size(tmp_path):
    data = pw.make_data(2, 16)
    results = ds_lab.launch(pw.checkpoint_worker, 4, str(tmp_path), data, timeout=60)
    folder = tmp_path / "global_step1"
    files = set(os.listdir(folder))
    assert {f"layer_{i:02d}-model_states.pt" for i in range(8)} <= files
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "pipeline.json", "manifest.json"} <= files
    assert (tmp_path / "latest").read_text() == "global_step1"
    for r in results:
        assert r["resumed"] == r["continued"] and r["steps"] == 2
        assert r["client"] == {"note": "after one batch"}
        for k, v in r["weights_after"].items():
            torch.testing.assert_close(r["weights_resumed"][k], v, rtol=0, atol=0)
        assert "load_optimizer_states=False" in r["refusal"]
    saved = {}
    for r in results[:2] + results[2:]:
        saved.update(r["saved"])
    for r in results:  # PP4 ranks 0..3: each stage got exactly its layers' saved weights
        for k, v in r["reloaded"].items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
