"""The event stream: every rank's events reach the parent, watching is cheap, a slow parent never blocks."""
import threading
import time

import ds_lab
from ds_lab.monitor import events
from ds_lab.train import train_worker

SMALL = dict(n_layer=2, n_embd=64, n_head=4, block_size=64)


def test_every_rank_delivers_memory_comm_loss_and_span_events():
    got = []
    results = ds_lab.launch(train_worker, 3, model=SMALL, steps=4, progress=False,
                            on_event=lambda rank, kind, payload: got.append((rank, kind, payload)))
    for rank in range(3):
        kinds = [k for r, k, _ in got if r == rank]
        assert kinds.count("loss") == 4
        assert kinds.count("memory") == 3 * 4  # after forward, backward, step
        losses = [p["loss"] for r, k, p in got if r == rank and k == "loss"]
        assert losses == results[rank]["losses"]  # the stream carries the real numbers
        spans = {p["name"] for r, k, p in got if r == rank and k == "span"}
        assert {"forward", "backward", "step", "all_reduce"} <= spans
        grad_events = [p for r, k, p in got if r == rank and k == "comm" and p["tag"] == "grad_allreduce"]
        assert len(grad_events) == 4 and all(e["wire_bytes"] == e["bytes"] * 2 * 2 / 3 for e in grad_events)
        memory = [p for r, k, p in got if r == rank and k == "memory"][-1]["bytes"]
        assert memory["params"] == results[rank]["memory"]["params"]


def test_publishing_costs_less_than_5_percent_of_step_time():
    results = ds_lab.launch(train_worker, 2, steps=6, progress=False, on_event=lambda *a: None)
    for r in results:
        share = r["watch_seconds"] / r["seconds"]
        print(f"rank {r['rank']}: watching cost {100 * share:.2f}% of training time")
        assert share < 0.05


class _SlowChannel:
    def __init__(self):
        self.batches, self.gate = [], threading.Event()

    def send(self, kind, payload):
        self.gate.wait()  # the parent is busy: the pipe does not drain
        self.batches.append(payload)


def test_a_slow_parent_never_blocks_the_rank_and_drops_are_counted():
    channel = _SlowChannel()
    sender = events._Sender(channel, max_pending=100)
    t0 = time.perf_counter()
    for i in range(1000):
        sender.put("loss", {"step": i, "loss": 0.0})
    assert time.perf_counter() - t0 < 1.0  # never waited for the parent
    channel.gate.set()
    sender.close()
    delivered = [e for batch in channel.batches for e in batch]
    dropped = [p["count"] for k, p in delivered if k == "dropped"]
    losses = [p["step"] for k, p in delivered if k == "loss"]
    assert dropped and dropped[0] + len(losses) == 1000
    assert losses[-1] == 999  # drop-oldest: the newest survive
