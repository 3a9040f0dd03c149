"""AutoTP (`"tensor_parallel": {"autotp_size": T}`): `initialize` shards a model it did not write —
the ds_lab GPT, HF GPT-2 (Conv1D), HF Llama (Linear, its tp_plan) — and it trains like one process."""
import os

import pytest
import torch

import ds_lab
from ds_lab.config import ConfigError, DeepSpeedConfig
from tests import autotp_workers as aw

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")

FP32 = 1e-5


def _cached(run):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = run(kind)
        return cache[kind]
    return get


@pytest.fixture(scope="module")
def tensor_2():
    """T=2 on 2 ranks, both optimizers: every rank's results (computed once per model kind)."""
    return _cached(lambda kind: ds_lab.launch(aw.train_worker, 2, kind, 2))


@pytest.fixture(scope="module")
def reference():
    """One process, the unsharded model, the whole global batch (computed once per model kind)."""
    return _cached(lambda kind: ds_lab.launch(aw.train_worker, 1, kind, 0)[0])


def _assert_same_training(run, one):
    assert one["norms"][0] > 0.5  # clipping (0.5) acted: the global norm over shards was exercised
    assert run["losses"] == pytest.approx(one["losses"], rel=FP32)
    assert run["norms"] == pytest.approx(one["norms"], rel=FP32)
    assert run["weights"].keys() == one["weights"].keys()
    for name, value in one["weights"].items():  # gathered: the unsharded model's names, shapes, layout
        torch.testing.assert_close(run["weights"][name], value, rtol=0, atol=FP32, msg=name)


@pytest.mark.parametrize("kind, world_size", [("gpt", 2), ("gpt2", 2), ("gpt2", 4), ("llama", 2), ("llama", 4)])
def test_autotp_trains_like_one_process(kind, world_size, reference, tensor_2):
    """T=2 (and T=2 x data 2 for GPT-2): the same losses, global norms and gathered weights, with a
    client SGD-momentum built over the unsharded model before initialize, and with the config's Adam."""
    results = tensor_2(kind) if world_size == 2 else ds_lab.launch(aw.train_worker, world_size, kind, 2)
    one = reference(kind)
    for r in results:
        for optimizer in ("sgd", "adam"):
            _assert_same_training(r[optimizer], one[optimizer])
        sgd = r["sgd"]
        assert sgd["same_optimizer"]  # the client's optimizer, now stepping the shards
        assert sgd["optimizer_shapes"] == list(sgd["local_shapes"].values())
    # tensor partners are consecutive ranks sharing a data index; the batch rule counts data ranks only
    assert [r["sgd"]["coord"]["model"] for r in results] == [0, 1] * (world_size // 2)
    assert [r["sgd"]["coord"]["data"] for r in results] == [i // 2 for i in range(world_size)]
    assert all(r["sgd"]["train_batch_size"] == aw.BATCH for r in results)
    assert results[0]["sgd"]["micro"] == aw.BATCH // (world_size // 2)


def test_shards_keep_each_layers_layout_column_then_row(tensor_2):
    """Column: output features split (q|k|v block by block); row: input features split, bias whole.
    GPT-2's Conv1D keeps its [in, out] layout, nn.Linear its [out, in]."""
    gpt, gpt2, llama = (tensor_2(kind)[0]["sgd"]["local_shapes"] for kind in ("gpt", "gpt2", "llama"))
    h = 32
    assert gpt["blocks.0.attn.c_attn.weight"] == (3 * h // 2, h) and gpt["blocks.0.attn.c_proj.weight"] == (h, h // 2)
    assert gpt["blocks.0.mlp.c_fc.weight"] == (2 * h, h) and gpt["blocks.0.mlp.c_proj.bias"] == (h,)
    assert gpt["wte.weight"] == (aw.VOCAB, h)  # embeddings (and the tied head) stay replicated
    assert gpt2["transformer.h.0.attn.c_attn.weight"] == (h, 3 * h // 2)  # Conv1D: [in, out/T]
    assert gpt2["transformer.h.0.attn.c_proj.weight"] == (h // 2, h)  # Conv1D: [in/T, out]
    assert gpt2["transformer.h.0.mlp.c_fc.bias"] == (2 * h,) and gpt2["transformer.h.0.mlp.c_proj.bias"] == (h,)
    assert llama["model.layers.0.self_attn.q_proj.weight"] == (h // 2, h)
    assert llama["model.layers.0.self_attn.k_proj.weight"] == (8, h)  # 2 key-value heads of 8: one each
    assert llama["model.layers.0.mlp.down_proj.weight"] == (h, 24)
    assert llama["lm_head.weight"] == (aw.VOCAB // 2, h)  # its tp_plan: colwise, output gathered


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_autotp_with_zero_shards_over_the_data_axis(zero_stage, reference):
    results = ds_lab.launch(aw.train_worker, 4, "gpt2", 2, ("sgd",), 3, 0.5, zero_stage)
    for r in results:
        assert r["sgd"]["stage"] == zero_stage
        _assert_same_training(r["sgd"], reference("gpt2")["sgd"])


def test_tp_model_init_then_initialize_without_the_config_key(reference):
    """DeepSpeed's `tp_model_init(model, tp_size, dtype)`: shard first; initialize takes its grid."""
    for r in ds_lab.launch(aw.train_worker, 2, "gpt", 2, ("sgd_tp_model_init",)):
        _assert_same_training(r["sgd_tp_model_init"], reference("gpt")["sgd"])


def test_article_gpt2_example_with_autotp_trains_like_one_process(tmp_path):
    """The article's §5.2 loop (GPT-2 with its default dropout 0.1, a client AdamW built before
    initialize, micro-batch 2) with `"tensor_parallel": {"autotp_size": 2}` added: the same losses and
    weights as one process — attention dropout on a rank's heads draws the one process's mask (drawing
    only its own heads would shift the random stream: losses then differ at 1e-3). One checkpoint
    file per tensor rank, DeepSpeed's `mp_rank_XX` layout."""
    one = ds_lab.launch(aw.article_example, 1, 0)[0]
    for r in ds_lab.launch(aw.article_example, 2, 2, str(tmp_path)):
        assert r["steps"] == 3 and r["training"] and r["dropout"] == 0.1 and r["attention"] == "ds_lab_autotp"
        assert r["losses"] == pytest.approx(one["losses"], rel=FP32)
        for name, value in one["weights"].items():
            torch.testing.assert_close(r["weights"][name], value, rtol=0, atol=FP32, msg=name)
        assert r["reloaded"] == 0.0  # load_checkpoint into a freshly sharded model restores every shard
    saved = os.listdir(tmp_path / "global_step3")
    assert sorted(f for f in saved if f.startswith("mp_rank")) == ["mp_rank_00_model_states.pt",
                                                                    "mp_rank_01_model_states.pt"]


@pytest.mark.parametrize("kind, head", [("gpt", 0), ("gpt2", 0), ("llama", 1)])
def test_comm_log_two_all_reduces_forward_and_two_backward_per_block(kind, head, tensor_2):
    """Megatron's count: f and g around attention and MLP, b*s*h elements each — Llama's separate
    q/k/v (and gate/up) enter the region once. Llama's gathered lm_head adds its f (b*s*h) and one
    all-gather of the logits (b*s*V); nothing else on the tensor axis."""
    r = tensor_2(kind)[0]["sgd"]
    bsh = aw.BATCH * aw.SEQ * 32 * 4
    tensor_ops = [(op, tag, nbytes) for op, tag, nbytes in r["log"] if tag.startswith("tp_")]
    assert sorted(tensor_ops) == ([("all_gather", "tp_allgather", aw.BATCH * aw.SEQ * aw.VOCAB * 4)] * head
                                  + [("all_reduce", "tp_allreduce", bsh)] * (4 * 2 + head))


def test_autotp_refuses_with_a_message():
    messages = dict(zip(["heads", "partners_see_different_rows", "no_projections", "world_not_divisible"],
                        ds_lab.launch(aw.refusal_worker_all, 2)[0]))
    assert "heads 3 is not divisible by tensor_parallel.autotp_size 2" in messages["heads"]
    assert "same micro-batch" in messages["partners_see_different_rows"]
    assert "found no attention/MLP projections" in messages["no_projections"]
    assert "not divisible by tensor_model_parallel_size 3" in messages["world_not_divisible"]


def test_tensor_parallel_config_section():
    config = DeepSpeedConfig.from_any({"train_batch_size": 8, "tensor_parallel": {"autotp_size": 2}}, world_size=2)
    assert config.tensor_parallel.autotp_size == 2 and config.train_micro_batch_size_per_gpu == 4
    assert DeepSpeedConfig.from_any({"train_batch_size": 8}).tensor_parallel.autotp_size == 0
    for section, words in [({"autotp_size": 2, "tp_overlap_comm": True}, "synchronous"),
                           ({"autotp_size": 2, "partition_config": {}}, "does not support yet"),
                           ({"autotp_size": 2, "dtype": "bf16"}, "'bf16' / 'fp16'"),
                           ({"autotp_size": -1}, "integer >= 0"), ({"autotp": 2}, "did you mean 'autotp_size'")]:
        with pytest.raises(ConfigError, match=words):
            DeepSpeedConfig.from_any({"train_batch_size": 8, "tensor_parallel": section})
