"""Workers for the launcher tests: one small training run (the same under launch, `ds-lab run` and
torchrun), ranks that sleep, abort or report their environment."""
import faulthandler
import os
import time

import torch

import ds_lab
from ds_lab import comm


def train(steps: int = 4, engines: list = None) -> list:
    """A tiny regression trained with ds_lab.initialize; the mean loss over ranks at each step.
    `engines`: a list to keep the engine in (a script that holds it to the end)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    world = comm.get_world_size() if comm.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    config = {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 4,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05}}}
    engine, _, _, _ = ds_lab.initialize(model=model, config=config)
    if engines is not None:
        engines.append(engine)
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(steps, world, 4, 8, generator=generator)  # every rank draws the same, takes its own
    losses = []
    for step in range(steps):
        x = data[step, comm.get_rank()]
        loss = ((engine(x) - x.sum(dim=1, keepdim=True).sin()) ** 2).mean()
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        comm.all_reduce(mean)
        losses.append(mean.item() / comm.get_world_size())
    return losses


def sleep_forever(folder: str) -> None:
    with open(os.path.join(folder, f"{comm.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(1)


def abort_with_a_message(rank_to_abort: int = 1) -> int:
    if comm.get_rank() == rank_to_abort:
        faulthandler.disable()  # pytest's, inherited across the fork: its dump would only be noise here
        print("rank about to be aborted", flush=True)
        os.write(2, b"[E ProcessGroupNCCL.cpp] Watchdog caught collective operation timeout: "
                    b"WorkNCCL(SeqNum=7, OpType=ALLREDUCE) ran for 600000 milliseconds before timing out.\n")
        os.abort()
    time.sleep(60)
    return comm.get_rank()


def master_port() -> str:
    t = torch.ones(1)
    comm.all_reduce(t)
    return os.environ["MASTER_PORT"]


def hang_in_all_reduce(timeout: float) -> None:
    """Rank 1 never joins: rank 0's all_reduce must end with the timeout's name."""
    if comm.get_rank() == 1:
        time.sleep(timeout + 30)
    comm.all_reduce(torch.ones(1))


def gloo_threads_after_destroy(variant: str) -> tuple:
    """Train, then comm.destroy(): the names of the backend's threads (before, after) in this rank.
    variant: "dropped" (the engine is gone), "held" (the script still holds it), "hierarchical" (a
    hierarchical all-reduce ran too), "late_import" (torch.distributed.nn.functional imported while
    the group existed: its defaults hold the world group)."""
    import importlib

    import torch.distributed.nn.functional as dist_nn
    from ds_lab.comm.hierarchical import hierarchical_all_reduce
    engines = []
    train(2, engines if variant == "held" else None)
    if variant == "hierarchical":
        hierarchical_all_reduce(torch.ones(3))
    if variant == "late_import":
        importlib.reload(dist_nn)
        assert dist_nn.all_reduce.__defaults__[-1] is not None  # the world group, pinned
    before = _gloo_threads()
    comm.destroy()
    return before, _gloo_threads()


def _gloo_threads() -> list:
    names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
    return sorted(name for name in names if "gloo" in name)


def done_callbacks_let_go(ops: int = 20) -> tuple:
    """Issue `ops` async all-reduces and wait on them: (callbacks watched, still held after 5 s)."""
    class Counted(set):
        added = 0

        def add(self, ref):
            Counted.added += 1
            super().add(ref)
    comm._live_callbacks = Counted()
    for handle in [comm.all_reduce(torch.ones(1000), async_op=True) for _ in range(ops)]:
        handle.wait()
    deadline = time.monotonic() + 5
    while comm._live_callbacks and time.monotonic() < deadline:
        time.sleep(0.001)
    return Counted.added, len(comm._live_callbacks)
