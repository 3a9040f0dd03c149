"""The bubble measured from the ranks' own timestamps agrees with (P-1)/(m+P-1), and interleaving
shrinks it. Layers wait (sleep) instead of computing, so 2 shared CPU cores do not blur the picture;
what remains above the formula is the per-instruction overhead (send/recv, Python), a few percent."""
import pytest

import ds_lab
from ds_lab.pipe import theoretical_bubble
from ds_lab.pipe.bubble import bubble_worker, measured_bubble

P = 4


@pytest.fixture(scope="module")
def measured():
    flat = ds_lab.launch(bubble_worker, P, [1, 2, 4, 8], "1f1b", repeats=2, timeout=60)
    # chunks of 10 + 20 ms: a per-instruction overhead of a few ms, twice as many instructions when interleaved
    inter = ds_lab.launch(bubble_worker, P, [8], "interleaved", 2, 0.02, 0.04, repeats=2, timeout=60)

    def least_idle(results, i):  # other processes on the machine only ever add idle time
        return min(measured_bubble([r[i][k] for r in results]) for k in range(2))
    return ({m: least_idle(flat, i) for i, m in enumerate([1, 2, 4, 8])},
            {m: least_idle(inter, i) for i, m in enumerate([8])})


def test_measured_bubble_follows_the_formula(measured):
    flat, _ = measured
    for m, idle in flat.items():
        theory = theoretical_bubble(P, m)
        assert theory - 0.02 <= idle <= theory + 0.08, (m, idle, theory)
    assert flat[1] > flat[2] > flat[4] > flat[8]


def test_interleaving_measures_a_smaller_bubble(measured):
    flat, inter = measured
    for m, idle in inter.items():  # below what 1F1B reaches even without any overhead
        assert idle < theoretical_bubble(P, m)
        assert theoretical_bubble(P, m, 2) - 0.02 <= idle <= theoretical_bubble(P, m, 2) + 0.1
