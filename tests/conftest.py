import os

import pytest

# Children of ds_lab.launch are forked; keep the parent's own thread pool small and predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _no_leftover_children():
    """Every test must leave no child process behind (a leaked rank makes CI flaky)."""
    import multiprocessing as mp
    yield
    leftover = mp.active_children()
    assert not leftover, f"processes left running: {leftover}"
