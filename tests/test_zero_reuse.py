"""ZeRO-3's `stage3_max_reuse_distance`: DeepSpeed's rule, traffic measured == predicted, and
training equal to one process whatever the distance."""
import warnings

import pytest
import torch

import ds_lab
from ds_lab.config import ConfigError, DeepSpeedConfig
from ds_lab.lab.measure import padded
from ds_lab.lab.zero_reuse import last_block_distance, predict_allgather_bytes, traffic_by_reuse_distance
from ds_lab.models import GPT, GPTConfig
from ds_lab.zero.reuse import used_again_within
from tests import zero_workers

# untied, n_embd 35: no unit is a multiple of 2 or 3 (padding on purpose)
MODEL = dict(vocab_size=257, block_size=16, n_layer=2, n_head=5, n_embd=35, tie_weights=False)
BF16 = 2


class _Unit:
    def __init__(self, numel):
        self.numel = numel


def test_a_unit_is_kept_when_fewer_than_the_distance_elements_lie_before_its_next_use():
    """As DeepSpeed 0.19.8 measured (4 x Linear(16, 16), 2 ranks, prefetch 0): 512 elements lie
    between the third Linear's forward and its backward (the fourth's forward and backward), so
    D = 512 keeps only the last Linear (512 < 512 fails) and D = 513 the last two; D = 0 none."""
    units = [_Unit(256) for _ in range(4)]
    trace = [[u] for u in units] + [[u] for u in reversed(units)]
    kept = {d: [used_again_within(trace, i + 1, u, d) for i, u in enumerate(units)] for d in (0, 1, 512, 513, 10**9)}
    assert kept == {0: [False] * 4, 1: [False, False, False, True], 512: [False, False, False, True],
                    513: [False, False, True, True], 10**9: [True] * 4}


def test_the_key_has_deepspeeds_default_is_enforced_and_refuses_negatives():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "accepted but not enforced" warning any more
        zero = DeepSpeedConfig.from_any({"train_batch_size": 1, "zero_optimization": {
            "stage": 3, "stage3_max_reuse_distance": 5e3}}).zero_optimization
    assert zero.stage3_max_reuse_distance == 5000
    assert DeepSpeedConfig.from_any({"train_batch_size": 1}).zero_optimization.stage3_max_reuse_distance == 10**9
    with pytest.raises(ConfigError, match="stage3_max_reuse_distance must be an integer >= 0"):
        DeepSpeedConfig.from_any({"train_batch_size": 1, "zero_optimization": {"stage": 3,
                                                                               "stage3_max_reuse_distance": -1}})


@pytest.mark.parametrize("world_size", [2, 3])
def test_allgather_bytes_per_step_equal_the_prediction_for_each_distance(world_size):
    gpt = GPT(GPTConfig(**MODEL))
    last = last_block_distance(MODEL)
    distances = [0, last, last + 1, 10**9]
    table = traffic_by_reuse_distance(distances, world_size, MODEL, steps=2)
    # independent of the prediction: units by module, padded to N, bf16
    sizes = {name: padded(sum(p.numel() for p in m.parameters(recurse=False)), world_size)
             for name, m in gpt.named_modules() if any(True for _ in m.parameters(recurse=False))}
    everything = BF16 * sum(sizes.values())
    tail = ("blocks.1.", "ln_f", "lm_head")
    before_last_block = BF16 * sum(n for name, n in sizes.items() if not name.startswith(tail))
    expected = {0: 2 * everything, last: everything + before_last_block,
                10**9: everything}  # D = 0: the paper's forward + backward; 1e9: forward only
    for d in distances:
        row = table[d]
        assert row["allgather_bytes"] == row["predicted_allgather_bytes"], (d, row)
        assert row["per_rank_allgather_bytes"] == [row["allgather_bytes"]] * world_size
        assert row["first_step_allgather_bytes"] == 2 * everything  # the recording step keeps nothing
        if d in expected:
            assert row["allgather_bytes"] == expected[d], (d, row["allgather_bytes"], expected[d])
        assert row["losses"] == table[0]["losses"]  # the same values arrive, gathered once or twice
    # one more element also keeps block 0's last module (its mlp.c_proj), and nothing else
    assert table[last]["allgather_bytes"] - table[last + 1]["allgather_bytes"] == BF16 * sizes["blocks.0.mlp.c_proj"]
    psi = gpt.num_parameters()
    assert table[0]["ratio_to_dp"] == pytest.approx(1.5 * everything / (BF16 * psi), abs=1e-12)
    assert table[10**9]["ratio_to_dp"] == pytest.approx(everything / (BF16 * psi), abs=1e-12)


def test_prediction_for_the_chapter_model_at_the_default_is_one_times_data_parallel():
    psi = GPT(GPTConfig(**dict(n_layer=4, n_head=4, n_embd=192, block_size=64, tie_weights=False))).num_parameters()
    assert predict_allgather_bytes(10**9, 2) == dict(forward=BF16 * psi, backward=0, total=BF16 * psi)
    assert predict_allgather_bytes(0, 2)["total"] == 2 * BF16 * psi
    assert predict_allgather_bytes(10**9, 2, recorded=False)["total"] == 2 * BF16 * psi


def _config(distance, accumulation=1, **zero):
    return {"train_batch_size": 12, "gradient_accumulation_steps": accumulation, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 3, "reduce_bucket_size": 200, "stage3_param_persistence_threshold": 0,
                                  "stage3_max_reuse_distance": distance, **zero}}


@pytest.mark.parametrize("world_size", [2, 3])
def test_zero3_trains_like_one_process_at_every_distance(world_size):
    """Adam and SGD with momentum; odd sizes (padding); a tied head read by the parent; recomputed
    segments; accumulation; the default prefetch and none."""
    batches = zero_workers.make_batches(3, 12)
    cases = [(kind, _config(d), opt) for d in (0, 10**9) for kind in ("plain", "tied_head") for opt in ("adam", "sgd")]
    cases += [("plain", _config(10**9, accumulation=2), "sgd"), ("checkpointed", _config(10**9), "adam"),
              ("plain", _config(10**9, stage3_prefetch_bucket_size=0), "adam"), ("plain", _config(300), "sgd")]
    results = ds_lab.launch(zero_workers.cases_worker, world_size, cases, batches)
    references = {}
    for rank_results in results:
        for (kind, _, optimizer), r in zip(cases, rank_results):
            if (kind, optimizer) not in references:
                references[kind, optimizer] = zero_workers.reference_train(kind, batches, optimizer)
            reference = references[kind, optimizer]
            losses = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], reference["losses"]))
            weights = max((r["weights"][k].float() - v).abs().max().item() for k, v in reference["weights"].items())
            assert losses <= 1e-5 and weights <= 1e-4, (kind, optimizer, losses, weights)
    assert sum(p.numel() for p in zero_workers.Net("plain").parameters()) % world_size != 0
