"""The dashboard, fed synthetic events (no processes): it stores, bounds, throttles and draws."""
import time
import warnings

import pytest

pytest.importorskip("matplotlib")

from ds_lab.monitor import Dashboard, EventStore, plots  # noqa: E402

PARAMS = 1_000_003  # parameters, deliberately odd


def synthetic_run(world_size=4, steps=5, t0=1_700_000_000.0):
    """The events of a data-parallel run: per step a forward, a backward whose gradient buckets are
    all-reduced while it still runs, an optimizer step; memory after each phase; a loss."""
    model_bytes = 4 * PARAMS
    ring = 2 * (world_size - 1) / world_size  # bytes a rank sends per byte all-reduced
    events = [(0, "theory", {
        "memory": {"params": model_bytes, "grads": model_bytes, "optimizer_states": 2 * model_bytes},
        "comm": {"per_step_bytes": ring * model_bytes, "label": "all-reduce 2(N-1)/N x 4 B x params"}})]
    for rank in range(world_size):
        events.append((rank, "comm", {"op": "broadcast", "bytes": model_bytes, "group_size": world_size,
                                      "wire_bytes": model_bytes / world_size, "start": t0, "seconds": 0.01,
                                      "tag": "init"}))
    buckets = [model_bytes // 3, model_bytes // 3, model_bytes - 2 * (model_bytes // 3)]
    for step in range(1, steps + 1):
        for rank in range(world_size):
            t = t0 + 0.02 + (step - 1) * 0.13 + rank * 0.002

            def span(name, start, end, category="compute"):
                return (rank, "span", {"name": name, "category": category, "start": start, "end": end,
                                       "step": step})

            def memory(phase, when, **held):
                held = {"params": model_bytes, "grads": 0, "master_params": 0, "buffers": 4096,
                        "optimizer_states": 2 * model_bytes * (step > 1), "activations": 0, **held}
                return (rank, "memory", {"step": step, "phase": phase, "time": when, "bytes": held})

            events += [span("forward", t, t + 0.03), memory("forward", t + 0.03, activations=3_000_000),
                       span("backward", t + 0.03, t + 0.09)]
            for i, nbytes in enumerate(buckets):
                start, seconds = t + 0.05 + i * 0.02, 0.015 + 0.003 * rank
                events.append(span("all_reduce", start, start + seconds, category="comm"))
                events.append((rank, "comm", {"op": "all_reduce", "bytes": nbytes, "wire_bytes": ring * nbytes,
                                              "group_size": world_size, "start": start, "seconds": seconds,
                                              "tag": f"bucket {i}"}))
            events += [memory("backward", t + 0.09, grads=model_bytes), span("step", t + 0.11, t + 0.12),
                       memory("step", t + 0.12, grads=model_bytes, optimizer_states=2 * model_bytes),
                       (rank, "loss", {"step": step, "loss": 4.0 / step + 0.05 * rank})]
    return events


def test_dashboard_saves_a_png_with_four_titled_non_empty_panels(tmp_path):
    from matplotlib.image import imread

    dash = Dashboard("data parallel, 4 ranks", live=False)
    for event in synthetic_run():
        dash(*event)
    dash.finish()
    path = dash.save_png(tmp_path / "dash.png")

    pixels = imread(path)  # raises unless it is a valid PNG
    height, width = pixels.shape[:2]
    assert width >= 800 and height >= 500
    axes = dash.figure().axes
    titles = [ax.get_title().lower() for ax in axes]
    assert len(axes) == 4
    for word, title in zip(("memory", "bytes sent", "loss", "timeline"), titles):
        assert word in title
    for ax in axes:
        assert ax.patches or ax.lines or ax.collections, f"panel {ax.get_title()!r} is empty"
    memory_ax, comm_ax, loss_ax, timeline_ax = axes
    assert len(loss_ax.lines) == 4
    assert "theory" in [t.get_text() for t in memory_ax.get_legend().get_texts()]
    assert any("theory" in t.get_text() for t in comm_ax.get_legend().get_texts())
    assert len(timeline_ax.collections) >= 4 * 4  # per rank: forward, backward, step, all_reduce


def test_comm_totals_count_every_collective_even_when_the_records_are_dropped():
    store = EventStore(max_records=10)
    for event in synthetic_run(world_size=2, steps=5):
        store.add(*event)
    assert len(store.comm[0]) == 10 and len(store.spans[0]) == 10 and len(store.memory[0]) == 10
    # per rank: 1 broadcast + 5 steps x 3 buckets = 16 comm records; 5 x 6 = 30 spans; 15 snapshots
    assert store.dropped == {"comm": 2 * 6, "span": 2 * 20, "memory": 2 * 5}
    assert store.comm_totals[0]["all_reduce"]["calls"] == 15
    assert store.comm_totals[0]["all_reduce"]["bytes"] == 5 * 4 * PARAMS
    assert store.steps_done(1) == 5
    assert store.ranks == [0, 1]


def test_event_store_rejects_a_malformed_payload_and_records_nothing():
    store = EventStore()
    with pytest.raises(ValueError, match="malformed 'span' event from rank 1"):
        store.add(1, "span", {"name": "forward", "category": "compute", "start": 0.0})
    with pytest.raises(ValueError, match="neither 'compute' nor 'comm'"):
        store.add(1, "span", {"name": "forward", "category": "io", "start": 0.0, "end": 1.0, "step": 0})
    store.add(0, "gpu_temperature", {"celsius": 60})
    assert store.events == 0 and not store.spans and store.ignored == {"gpu_temperature": 1}


def test_events_a_rank_dropped_are_counted_and_shown():
    store = EventStore()
    for event in synthetic_run(world_size=2, steps=1) + [(1, "dropped", {"count": 7})]:
        store.add(*event)
    assert store.lost == {1: 7}
    assert "7 events lost" in plots.figure(store).get_suptitle()


def test_live_redraws_are_throttled_to_refresh_hz():
    dash = Dashboard(refresh_hz=20.0, live=True)
    events = synthetic_run(world_size=2, steps=20)
    start = time.monotonic()
    for event in events:
        dash(*event)
        time.sleep(0.001)  # events arrive over about a second
    elapsed = time.monotonic() - start
    assert 1 <= dash.redraws <= 20.0 * elapsed + 1  # live, but never faster than refresh_hz
    assert dash.store.events == len(events)


def test_redrawing_reuses_one_figure_and_accumulates_nothing():
    store = EventStore()
    for event in synthetic_run(world_size=3, steps=3):
        store.add(*event)
    fig = plots.figure(store)
    counts = [len(ax.get_children()) for ax in fig.axes]
    for _ in range(10):
        assert plots.figure(store, fig=fig) is fig
    assert len(fig.axes) == 4
    assert [len(ax.get_children()) for ax in fig.axes] == counts


def test_headless_dashboard_never_raises(tmp_path):
    dash = Dashboard()  # no IPython kernel here: collect only, draw on finish
    assert not dash.live
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dash.finish()  # nothing received yet: empty panels, no error
        dash(0, "loss", {"step": "not a number"})
        dash(0, "loss", {"step": 1})
        dash(3, "unknown_kind", {})
        for event in synthetic_run(world_size=2, steps=2):
            dash(*event)
        dash.finish()
    assert dash.bad_events == 2
    assert len(caught) == 1 and "malformed 'loss' event" in str(caught[0].message)
    assert dash.redraws == 2
    dash.save_png(tmp_path / "headless.png")


def test_human_bytes_uses_decimal_units_like_the_paper_without_scientific_notation():
    assert plots.human_bytes(512) == "512 B"
    assert plots.human_bytes(999_000) == "999 KB"
    assert plots.human_bytes(1.5e6) == "1.50 MB"
    assert plots.human_bytes(31.4e9) == "31.4 GB"


def test_importing_the_monitor_package_does_not_import_matplotlib():
    import subprocess
    import sys

    code = ("import sys, ds_lab.monitor as m; m.EventStore().add(0, 'loss', {'step': 1, 'loss': 1.0}); "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
