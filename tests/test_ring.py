"""The ring all-reduce built from send/recv sums like gloo's and sends 2(N-1)/N of the message, measured.

The byte counts come from the send records the ring left in the comm log, never from multiplying
the message by the ring factor: these tests are the proof of the factor trace.py's `wire_bytes` uses.
"""
import pytest

import ds_lab
from ds_lab.comm.ring import chunk_bounds
from tests import ring_workers

SIZES = (1, 7, 1001, 12)  # 1 < N (empty chunks), 7 and 1001 not divisible by 2, 3 or 4; 12 divisible by all


@pytest.fixture(scope="module", params=(2, 3, 4))
def ring_run(request):
    return request.param, ds_lab.launch(ring_workers.ring_worker, request.param, SIZES)


def test_chunks_cover_the_tensor_and_differ_by_at_most_one_element():
    for numel in SIZES:
        for world in (2, 3, 4):
            bounds = chunk_bounds(numel, world)
            sizes = [stop - start for start, stop in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == numel and sum(sizes) == numel
            assert max(sizes) - min(sizes) <= 1


def test_ring_sum_equals_gloo_all_reduce_bitwise_on_integers(ring_run):
    world, results = ring_run
    for rank, out in enumerate(results):
        for n in SIZES:
            assert out[n]["ints_equal"], (world, rank, n)
            assert out[n]["floats_close"], (world, rank, n)


def test_bytes_really_sent_equal_two_n_minus_one_over_n_of_the_message_when_divisible(ring_run):
    world, results = ring_run
    n = 12
    for out in results:
        assert out[n]["sent_ints"] == 2 * (world - 1) * (n * 8) // world  # int64
        assert out[n]["sent_floats"] == 2 * (world - 1) * (n * 4) // world  # float32


def test_bytes_really_sent_equal_the_chunked_count_when_not_divisible(ring_run):
    world, results = ring_run
    for rank, out in enumerate(results):
        for n in SIZES:
            base, extra = divmod(n, world)
            size = [base + (1 if i < extra else 0) for i in range(world)]
            # each pass sends every chunk but one: reduce-scatter skips chunk r+1, all-gather chunk r+2
            elements = 2 * n - size[(rank + 1) % world] - size[(rank + 2) % world]
            assert out[n]["sent_ints"] == elements * 8, (world, rank, n)
            assert out[n]["sent_floats"] == elements * 4, (world, rank, n)


def test_the_ring_leaves_only_tagged_sends_and_receives_in_the_log(ring_run):
    world, results = ring_run
    for out in results:
        for n in SIZES:
            records = out[n]["records"]
            assert {op for op, _, _ in records} <= {"send", "recv"} and all(t == "ring_all_reduce" for *_, t in records)
            assert sum(b for op, b, _ in records if op == "send") == out[n]["sent_ints"]
    # what one rank sends, the next receives: over the whole ring, receives balance sends
    sent = sum(out[n]["sent_ints"] for out in results for n in SIZES)
    received = sum(b for out in results for n in SIZES for op, b, _ in out[n]["records"] if op == "recv")
    assert sent == received


def test_ring_runs_over_a_subgroup_with_global_peers():
    results = ds_lab.launch(ring_workers.ring_in_subgroup_worker, 4, 5)
    assert results[0] is None and results[2] is None
    for tensor, sent in (results[1], results[3]):
        assert tensor == [i * (2 + 4) for i in range(5)]
        assert sent == 5 * 8  # N = 2: chunks of 3 and 2; each rank sends one in each pass, 5 int64 in all
