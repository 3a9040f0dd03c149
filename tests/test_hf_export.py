"""A ZeRO-3 checkpoint of 2 ranks, exported for Hugging Face, reloads with from_pretrained and gives the same logits."""
import os

import pytest
import torch

import ds_lab
from ds_lab.hf_export import export_hf
from ds_lab.lab.practice import ds_config, gpt2_config, probe_batch, train_gpt2

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 ranks, ZeRO-3, 3 steps, a checkpoint at the end; rank 0's logits on the probe batch."""
    save_dir = str(tmp_path_factory.mktemp("zero3"))
    results = ds_lab.launch(train_gpt2, 2, ds_config(stage=3), 3, save_dir=save_dir, save_every=3,
                            probe=probe_batch())
    return save_dir, results[0]


def test_zero3_export_reloads_with_from_pretrained_and_gives_the_same_logits(trained, tmp_path):
    save_dir, result = trained
    out_dir = export_hf(save_dir, gpt2_config(), str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out_dir))
    model = transformers.GPT2LMHeadModel.from_pretrained(out_dir)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    probe = probe_batch()
    with torch.no_grad():
        reloaded = model(input_ids=probe, labels=probe)
    assert (reloaded.logits - result["logits"]).abs().max().item() <= 1e-5
    assert reloaded.loss.item() == pytest.approx(result["probe_loss"], abs=1e-5)


def test_export_with_another_config_names_the_mismatch(trained, tmp_path):
    save_dir, _ = trained
    with pytest.raises(ValueError, match="does not hold a GPT2LMHeadModel of this config"):
        export_hf(save_dir, gpt2_config(n_layer=3), str(tmp_path / "deeper"))
    with pytest.raises(ValueError, match="shapes differ from the config"):
        export_hf(save_dir, gpt2_config(n_embd=32), str(tmp_path / "narrower"))
