"""Tensor parallel (Megatron-LM) on real ranks: every layer equals its unsharded self, the GPT split
over T ranks trains exactly like one process, and the wire carries what the formulas say."""
import pytest
import torch

import ds_lab
from tests import tp_workers as tw
from tests import workers

pytestmark = pytest.mark.filterwarnings("ignore:VocabParallelEmbedding")

FP32 = 1e-5


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_layer_matches_the_unsharded_layer_forward_and_backward(world_size):
    """Column, row, column->row (MLP), fused qkv, vocabulary 257 (padded): outputs, input grads and
    the gathered weight grads equal nn.Linear / nn.Embedding; a plain launch (no grid) is enough."""
    for r in ds_lab.launch(tw.layers_worker, world_size):
        bad = {k: v for k, v in r["errs"].items() if v > FP32}
        assert not bad, bad
        # column -> row: one all-reduce forward (g), one backward (f), nothing in between
        assert sorted(r["mlp_ops"]) == [("all_reduce", "tp_allreduce")] * 2
        assert r["padded"] % world_size == 0 and r["padded"] >= 257 and r["per_rank"] == r["padded"] // world_size
        assert len(r["refused"]) == 3 and all("divisible" in m for m in r["refused"])
        assert "n_head 5" in r["refused"][2]


def test_row_parallel_output_is_the_sum_of_partial_products_not_their_concatenation():
    """The article's §4.2 concatenates the pieces of a row-split product; they must be summed."""
    results = ds_lab.launch(tw.row_sum_worker, 2)
    r = results[0]
    total = r["partials"][0] + r["partials"][1]
    torch.testing.assert_close(total, r["full"], rtol=0, atol=FP32)  # C = sum_i A_i B_i
    torch.testing.assert_close(r["y"], r["full"], rtol=0, atol=FP32)
    concatenated = torch.cat(r["partials"], dim=-1)
    assert concatenated.shape != r["full"].shape  # [4, 12]: not even the right shape
    for piece in r["partials"]:  # and no single piece is the answer
        assert (piece - r["full"]).abs().max() > 1e-2


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_cross_entropy_equals_cross_entropy_without_gathering_the_vocabulary(world_size):
    for r in ds_lab.launch(tw.cross_entropy_worker, world_size):
        assert r["loss"] == pytest.approx(r["loss_ref"], rel=FP32)
        assert r["grad_err"] < FP32 and r["pad_grad"] == 0.0
        # three all-reduces of one number per token (max, target logit, sum of exps); no all-gather
        assert [(op, tag) for op, tag, _ in r["log"]] == [("all_reduce", "tp_cross_entropy")] * 3
        assert all(nbytes == 12 * 4 for *_, nbytes in r["log"])


def test_rng_tracker_dropout_differs_inside_a_region_and_agrees_outside():
    a, b = ds_lab.launch(tw.rng_worker, 2)
    torch.testing.assert_close(a["outside"], b["outside"], rtol=0, atol=0)  # replicated regions agree
    assert not torch.equal(a["inside"], b["inside"])  # each rank's shard draws its own mask
    assert not torch.equal(a["mask"], b["mask"])
    torch.testing.assert_close(a["outside"], a["unforked"], rtol=0, atol=0)  # forking never disturbs it


# ---- the GPT, trained through ds_lab.initialize ------------------------------------------------------

BATCH = 8


@pytest.fixture(scope="module")
def batches():
    return workers.make_batches(3, BATCH, tw.TP_MODEL["block_size"], seed=3)


def _config(optimizer):
    config = {"train_batch_size": BATCH, "gradient_clipping": 0.5}
    if optimizer == "adam":
        config["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3}}
    return config


SGD = (0.05, 0.9)  # lr, momentum: a gradient off by a constant factor shows (Adam would hide it)


@pytest.fixture(scope="module")
def reference(batches):
    """One process, the plain GPT, the whole global batch."""
    return {opt: ds_lab.launch(tw.train_worker, 1, 0, _config(opt), batches, SGD if opt == "sgd" else None)[0]
            for opt in ("sgd", "adam")}


def _assert_same_training(results, one):
    assert one["norms"][0] > 0.5  # clipping acted: the global norm across shards was exercised
    for r in results:
        assert r["losses"] == pytest.approx(one["losses"], rel=FP32)
        assert r["norms"] == pytest.approx(one["norms"], rel=FP32)
        assert r["weights"].keys() == one["weights"].keys()
        for k, v in one["weights"].items():
            torch.testing.assert_close(r["weights"][k], v, rtol=0, atol=FP32, msg=k)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("world_size, tensor_size", [(2, 2), (4, 4), (4, 2)])
def test_tensor_parallel_gpt_trains_like_one_process(world_size, tensor_size, optimizer, batches, reference):
    """T=2, T=4, and T=2 x data 2: the same losses, global norms and (gathered) weights."""
    results = ds_lab.launch(tw.train_worker, world_size, tensor_size, _config(optimizer), batches,
                            SGD if optimizer == "sgd" else None)
    if world_size // tensor_size > 1:  # tensor partners are neighbours, sharing a data index
        assert [r["coord"]["data"] for r in results] == [0, 0, 1, 1]
    _assert_same_training(results, reference[optimizer])


@pytest.mark.parametrize("world_size, tensor_size", [(2, 2), (4, 2)])
def test_sequence_parallel_gpt_trains_like_one_process(world_size, tensor_size, batches, reference):
    results = ds_lab.launch(tw.train_worker, world_size, tensor_size, _config("sgd"), batches, SGD, True)
    _assert_same_training(results, reference["sgd"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_shards_over_the_data_axis_only_with_tensor_parallel(stage, batches, reference):
    """T=2 x data 2 with ZeRO-1/2/3 (optimizer state, gradients, parameters split over the data group)."""
    config = {**_config("sgd"), "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000}}
    results = ds_lab.launch(tw.train_worker, 4, 2, config, batches, SGD)
    _assert_same_training(results, reference["sgd"])


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_dropout_masks_agree_where_tensor_partners_hold_the_same_tensor(sequence_parallel, batches):
    """Dropout 0.1 everywhere (embedding, attention, residual): tensor partners keep identical
    replicated weights (LayerNorms, row-parallel biases, positions), which needs one residual stream
    on both (the same mask where the tensor is replicated; heads and sequence shards draw their own)."""
    model = dict(tw.TP_MODEL, dropout=0.1)
    a, b = ds_lab.launch(tw.train_worker, 2, 2, _config("sgd"), batches[:2], SGD, sequence_parallel, model)
    assert a["losses"] == b["losses"]
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    plain = ds_lab.launch(tw.train_worker, 2, 2, _config("sgd"), batches[:2], SGD, sequence_parallel)[0]
    assert a["losses"][0] != pytest.approx(plain["losses"][0], rel=1e-4)


# ---- what crosses the wire, and what stays in memory ---------------------------------------------------

@pytest.mark.parametrize("tensor_size", [2, 4])
def test_traffic_two_all_reduces_forward_and_two_backward_per_layer(tensor_size):
    """Per transformer layer 2 + 2 all-reduces of b*s*h elements (Megatron); +1 each way for the
    embedding (g) and the head (f). Sequence parallel: as many all-gathers and reduce-scatters of the
    same size, the same bytes on the wire; the LayerNorms save 1/T of the activations."""
    b, s, h, layers = 2, 16, tw.TP_MODEL["n_embd"], tw.TP_MODEL["n_layer"]
    bsh = b * s * h * 4
    plain = ds_lab.launch(tw.traffic_worker, tensor_size, tensor_size, False, b, s)[0]
    seq = ds_lab.launch(tw.traffic_worker, tensor_size, tensor_size, True, b, s)[0]
    assert seq["loss"] == pytest.approx(plain["loss"], rel=FP32)

    def ops(run, tag):
        return [(op, nbytes) for op, t, nbytes, _ in run["log"] if t == tag]

    assert ops(plain, "tp_allreduce") == [("all_reduce", bsh)] * (4 * layers + 2)
    assert not ops(plain, "tp_allgather") and not ops(plain, "tp_reduce_scatter")
    assert ops(seq, "tp_reduce_scatter") == [("reduce_scatter", bsh)] * (4 * layers + 2)
    gathers = ops(seq, "tp_allgather")
    assert gathers.count(("all_gather", bsh)) == 4 * layers + 2
    assert len(gathers) == 4 * layers + 3  # + the position embedding's gradient (s*h, once)
    assert not ops(seq, "tp_allreduce")

    def wire(run, tags):
        return sum(w for op, t, nbytes, w in run["log"] if t in tags and nbytes == bsh)

    assert wire(seq, {"tp_allgather", "tp_reduce_scatter"}) == pytest.approx(wire(plain, {"tp_allreduce"}))
    # saved activations in the LayerNorm regions: 1/T of the sequence on each rank
    assert seq["layernorm_bytes"] * tensor_size == plain["layernorm_bytes"]
    assert seq["activations_peak"] < plain["activations_peak"]


ODD = dict(tw.TP_MODEL, n_head=3)  # T = 3: heads 3, hidden 36 and the padded vocabulary 257 -> 258 split 3 ways


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_tensor_parallel_at_world_size_3_trains_like_one_process(optimizer, batches):
    opt = SGD if optimizer == "sgd" else None
    one = ds_lab.launch(tw.train_worker, 1, 0, _config(optimizer), batches, opt, False, ODD)[0]
    three = ds_lab.launch(tw.train_worker, 3, 3, _config(optimizer), batches, opt, False, ODD)
    _assert_same_training(three, one)
