"""overlap_comm on vs off at stage 0: when the bucket all-reduces start, and that nothing else changes.

One launch per world size trains the same tiny GPT under both schedules (ds_lab/lab/overlap.py),
interleaved, with buckets small enough for several of them. No timing is asserted here: how much
overlap buys is measured in benchmarks/overlap_on_off.py.
"""
import matplotlib
import pytest

import ds_lab
from ds_lab.lab.overlap import draw_overlap, format_summary, overlap_train, step_measures, timeline_summary
from ds_lab.models import GPT, GPTConfig

matplotlib.use("Agg")

MODEL = dict(vocab_size=257, block_size=16, n_layer=2, n_head=5, n_embd=35)
BUCKET = 2_000  # elements: several buckets for the 2-layer GPT
STEPS = 3


@pytest.fixture(scope="module", params=[2, 3], ids=["world_size_2", "world_size_3"])
def timeline(request):
    return ds_lab.launch(overlap_train, request.param, MODEL, steps=STEPS, bucket_size=BUCKET, micro_batch=2)


def psi():
    return sum(p.numel() for p in GPT(GPTConfig(**MODEL)).parameters())


def test_buckets_are_several_and_cover_every_parameter(timeline):
    for rank in timeline:
        assert len(rank["buckets"]) >= 3
        assert sum(rank["buckets"]) == rank["num_parameters"] == psi()


def test_overlap_on_starts_an_allreduce_before_backward_ends_on_every_rank(timeline):
    for rank in timeline:
        for step in rank["modes"]["on"]["steps"]:
            assert any(r["start"] < step["backward_end"] for r in step["allreduces"]), \
                f"rank {rank['rank']}: every bucket left after the last gradient although overlap_comm is on"


def test_overlap_off_starts_no_allreduce_before_backward_ends(timeline):
    for rank in timeline:
        for step in rank["modes"]["off"]["steps"]:
            assert step["allreduces"] and all(r["start"] >= step["backward_end"] for r in step["allreduces"])


def test_each_step_all_reduces_4_psi_bytes_at_fp32_in_both_modes(timeline):
    for rank in timeline:
        for mode in rank["modes"].values():
            for step in mode["steps"]:
                assert len(step["allreduces"]) == len(rank["buckets"])
                assert sum(r["bytes"] for r in step["allreduces"]) == 4 * psi()


def test_losses_and_weights_are_identical_on_vs_off(timeline):
    for rank in timeline:
        assert rank["modes"]["on"]["losses"] == rank["modes"]["off"]["losses"]
        assert rank["weight_max_diff"] == 0.0


def test_summary_measures_overlap_only_with_overlap_on(timeline):
    summary = timeline_summary(timeline)
    assert set(summary) == {"on", "off"}
    assert summary["on"]["bytes_overlapped"] > 0 and summary["off"]["bytes_overlapped"] == 0.0
    assert summary["off"]["overlap_fraction"] == 0.0
    for mode in summary.values():
        assert mode["exposed_s"] >= 0 and mode["step_s"] > 0 and mode["allreduce_bytes"] == 4 * psi()
    assert 0.0 <= summary["on"]["wins"] <= 1.0
    assert "| on |" in format_summary(summary) and "| off |" in format_summary(summary)


def test_step_measures_of_a_made_up_step():
    """Bars 1-3 and 2-6 (union 1-6), backward 0-4: 3 of 5 s inside, both buckets issued inside,
    2 s exposed after the last gradient; issued at 5 instead, the second bucket's bytes are outside."""
    step = dict(forward_start=-1.0, backward_start=0.0, backward_end=4.0, step_end=7.0,
                allreduces=[dict(start=1.0, end=3.0, bytes=10), dict(start=2.0, end=6.0, bytes=30)])
    m = step_measures(step)
    assert m["allreduce_s"] == 5.0 and m["overlap_fraction"] == pytest.approx(0.6)
    assert m["bytes_overlapped"] == 1.0 and m["exposed_s"] == 2.0 and m["step_s"] == 8.0
    step["allreduces"][1]["start"] = 5.0
    assert step_measures(step)["bytes_overlapped"] == 0.25


def test_drawing_has_one_panel_per_mode_and_one_row_per_rank(timeline):
    import matplotlib.pyplot as plt

    fig = draw_overlap(timeline)
    try:
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title().split(":")[0] for ax in panels] == ["overlap_comm on", "overlap_comm off"]
        assert all(len(ax.get_yticks()) == len(timeline) for ax in panels)
    finally:
        plt.close(fig)
