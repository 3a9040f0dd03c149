"""Loading stays safe (weights_only) yet takes the client_state DeepSpeed users store: numpy, Namespace, paths."""
import argparse
import pathlib

import numpy as np
import pytest
import torch

import ds_lab
from ds_lab.runtime.safe_load import CheckpointError, safe_load


class NotOnTheList:  # any class of the user's own: data or not, the loader cannot know
    def __init__(self):
        self.value = 1


def client_state():
    return {"rng": np.arange(6, dtype=np.float32).reshape(2, 3), "indices": np.array([3, 1, 2], dtype=np.int64),
            "loss": np.float64(2.5), "position": np.int64(7), "flag": np.bool_(True), "half": np.float16(0.5),
            "args": argparse.Namespace(lr=0.1, name="x", betas=(0.9, 0.99)),
            "nested": [{"epoch": 3, "tags": ("a", "b")}, {"dtype": np.dtype("float32")}],
            "out_dir": pathlib.PurePosixPath("runs/exp1"), "tensor": torch.ones(2)}


def assert_same_client_state(loaded, saved):
    assert set(loaded) == set(saved)
    for key in ("rng", "indices"):
        assert type(loaded[key]) is np.ndarray and loaded[key].dtype == saved[key].dtype
        np.testing.assert_array_equal(loaded[key], saved[key])
    for key in ("loss", "position", "flag", "half"):
        assert type(loaded[key]) is type(saved[key]) and loaded[key] == saved[key]
    assert loaded["args"] == saved["args"] and isinstance(loaded["args"], argparse.Namespace)
    assert loaded["nested"] == saved["nested"] and loaded["out_dir"] == saved["out_dir"]
    assert torch.equal(loaded["tensor"], saved["tensor"])


def test_numpy_arrays_scalars_namespace_and_paths_load_under_weights_only(tmp_path):
    saved = client_state()
    torch.save(saved, tmp_path / "client.pt")
    assert_same_client_state(safe_load(str(tmp_path / "client.pt")), saved)


def test_a_file_written_under_the_other_numpy_major_loads(tmp_path):
    """numpy 2 renamed numpy.core to numpy._core; a pickle names the module it was written with."""
    import io
    buffer = io.BytesIO()  # the legacy format keeps the pickle uncompressed, so its module names can be edited
    torch.save({"rng": np.arange(3), "loss": np.float64(2.5)}, buffer, _use_new_zipfile_serialization=False)
    ours = buffer.getvalue()
    theirs = (ours.replace(b"numpy._core.", b"numpy.core.") if b"numpy._core." in ours
              else ours.replace(b"numpy.core.", b"numpy._core."))
    assert theirs != ours
    (tmp_path / "other.pt").write_bytes(theirs)
    loaded = safe_load(str(tmp_path / "other.pt"))
    np.testing.assert_array_equal(loaded["rng"], np.arange(3))
    assert loaded["loss"] == np.float64(2.5)


def test_a_class_not_on_the_allow_list_is_refused_with_its_name(tmp_path):
    torch.save({"mine": NotOnTheList()}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match=r"weights_only=True\): it holds tests\.test_safe_load\.NotOnTheList, "
                                              r"which is not .*\.add_safe_globals\(\[\.\.\.\]\)"):
        safe_load(str(tmp_path / "custom.pt"))


def test_a_numpy_object_array_is_refused(tmp_path):
    """An object array would carry arbitrary Python objects: not data."""
    torch.save(np.array([NotOnTheList()], dtype=object), tmp_path / "objects.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        safe_load(str(tmp_path / "objects.pt"))


def test_a_pickled_callable_is_refused(tmp_path):
    import os
    import pickle
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(os.system, protocol=2))
    with pytest.raises(CheckpointError, match=r"weights_only=True\): it holds (posix|nt)\.system"):
        safe_load(str(tmp_path / "evil.pt"))


def test_the_allow_list_is_not_left_installed_after_a_load(tmp_path):
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "args.pt")
    assert safe_load(str(tmp_path / "args.pt")) == {"args": argparse.Namespace(lr=0.1)}
    with pytest.raises(Exception, match="GLOBAL argparse.Namespace was not an allowed global"):
        torch.load(tmp_path / "args.pt", weights_only=True)  # torch's own default list is untouched


def test_checkpoint_module_reexports_the_same_names():
    from ds_lab.runtime import checkpoint
    assert checkpoint.safe_load is safe_load and checkpoint.CheckpointError is CheckpointError


def save_then_load_client_state(ckpt_dir):
    config = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    model = torch.nn.Linear(4, 3, bias=False)
    engine, _, _, _ = ds_lab.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.save_checkpoint(ckpt_dir, client_state=client_state())
    fresh = torch.nn.Linear(4, 3, bias=False)
    engine, _, _, _ = ds_lab.initialize(model=fresh, model_parameters=fresh.parameters(), config=config)
    path, loaded = engine.load_checkpoint(ckpt_dir)
    return path, loaded


def test_engine_checkpoint_round_trips_numpy_and_namespace_client_state(tmp_path):
    path, loaded = ds_lab.launch(save_then_load_client_state, 1, str(tmp_path / "ck"))[0]
    assert path is not None
    assert_same_client_state(loaded, client_state())
