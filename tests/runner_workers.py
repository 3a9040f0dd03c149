"""Workers for the launcher tests: one small training run (the same under launch, `ds-lab run` and
torchrun), ranks that sleep, abort or report their environment."""
import faulthandler
import os
import time

import torch

import ds_lab
from ds_lab import comm


def train(steps: int = 4) -> list:
    """A tiny regression trained with ds_lab.initialize; the mean loss over ranks at each step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    world = comm.get_world_size() if comm.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    config = {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 4,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05}}}
    engine, _, _, _ = ds_lab.initialize(model=model, config=config)
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
