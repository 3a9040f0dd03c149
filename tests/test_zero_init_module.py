"""zero.Init(module=model) partitions a model already built, as if it had been built inside the context.

DeepSpeed's `deepspeed.zero.Init(module=...)`: "If provided, partition the model as if it was
constructed in the context". Checked at world sizes 2 and 3 (uneven chunks): the same chunks on
every rank as the context gives, rank 0's values everywhere, and the same training afterwards.
"""
import pytest
import torch

import ds_lab
from tests import zero_init_module_workers as zw
from tests.zero_workers import make_batches


@pytest.fixture(scope="module", params=[(2, "plain"), (3, "tied_head")])
def runs(request):
    world, kind = request.param
    return world, ds_lab.launch(zw.init_module_worker, world, kind, make_batches(3, 6))


def test_every_parameter_keeps_only_the_chunk_the_context_would_have_left(runs):
    world, results = runs
    for r in results:
        assert r["module_chunks"].keys() == r["context_chunks"].keys()
        for name, (chunk, numel) in r["module_chunks"].items():
            context_chunk, context_numel = r["context_chunks"][name]
            assert numel == context_numel == 0, name  # param.data is empty: only the chunk remains
            assert torch.equal(chunk, context_chunk), name


def test_rank_0s_values_are_partitioned_whatever_each_rank_built(runs):
    world, results = runs
    rank0 = results[0]["whole"]
    assert any(not torch.equal(results[1]["whole"][n], v) for n, v in rank0.items())  # seeds differ by rank
    modules = {}
    for name in rank0:  # a module's own parameters, in registration order, share one flat vector
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    for names in modules.values():
        flat = torch.cat([r["module_chunks"][names[0]][0] for r in results])  # the chunks of every rank
        expected = torch.cat([rank0[n].reshape(-1) for n in names])
        assert torch.equal(flat[:expected.numel()], expected), names
        assert not flat[expected.numel():].any()  # padding is zeros


def test_training_afterwards_equals_training_the_context_built_model(runs):
    world, results = runs
    for r in results:
        assert r["module"]["losses"] == r["context"]["losses"]
        for name, value in r["context"]["weights"].items():
            assert torch.equal(r["module"]["weights"][name], value), name
    assert all(r["module"]["losses"] == results[0]["module"]["losses"] for r in results)


def test_disabled_init_leaves_the_module_whole(runs):
    world, results = runs
    assert all(numel > 0 for r in results for numel in r["untouched_numel"])
