"""A training loop that saves and resumes, driven by `deepspeed.add_config_arguments` and
`--deepspeed_config`, in the shape DeepSpeed's getting-started tutorial teaches: the loop's own
position travels in the checkpoint as `client_state`, and `load_checkpoint` hands it back.

Run it once through (saving at `--save_at`), then again with `--resume`: the resumed run's losses
equal the uninterrupted run's from that step on. Written for DeepSpeed; runs on ds_lab with the
imports changed (`import deepspeed` -> `import ds_lab as deepspeed`).

    torchrun --standalone --nproc-per-node 2 examples/checkpoint_resume_deepspeed.py \
        --deepspeed --deepspeed_config examples/checkpoint_zero1.json --checkpoint_dir checkpoints
    torchrun ... (the same) --resume

Each rank prints `LOSS <rank> <micro-step> <loss>` per micro-step.
"""
import argparse

import torch
import torch.nn as nn

import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import RepeatingLoader


def get_args():
    parser = argparse.ArgumentParser(description="checkpoint and resume")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from distributed launcher")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps in all")
    parser.add_argument("--save_at", type=int, default=6, help="save a checkpoint after this many steps")
    parser.add_argument("--checkpoint_dir", type=str, default="checkpoints")
    parser.add_argument("--resume", action="store_true", help="load the latest checkpoint and continue")
    parser.add_argument("--seed", type=int, default=7)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class Regression(torch.utils.data.Dataset):
    """y = tanh(x W) + noise, from one seeded generator."""

    def __init__(self, num_samples, seed):
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(16, 4, generator=generator)
        self.x = torch.randn(num_samples, 16, generator=generator)
        self.y = torch.tanh(self.x @ weight) + 0.05 * torch.randn(num_samples, 4, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


def main():
    args = get_args()
    deepspeed.init_distributed()
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    model_engine, optimizer, trainloader, lr_scheduler = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters(), training_data=Regression(256, args.seed))
    device = get_accelerator().device_name(model_engine.local_rank)
    rank = model_engine.global_rank
    gas = model_engine.gradient_accumulation_steps()

    start = 0
    data_iter = iter(RepeatingLoader(trainloader))
    if args.resume:
        load_path, client_state = model_engine.load_checkpoint(args.checkpoint_dir)
        assert load_path is not None, f"no checkpoint in {args.checkpoint_dir}"
        start = client_state["step"]
        for _ in range(start * gas):  # the batches the saved run had consumed
            next(data_iter)

    for step in range(start, args.steps):
        for micro in range(gas):
            x, y = (t.to(device) for t in next(data_iter))
            loss = nn.functional.mse_loss(model_engine(x), y)
            model_engine.backward(loss)
            model_engine.step()
            print(f"LOSS {rank} {step * gas + micro} {loss.float().item()!r}", flush=True)
        if step + 1 == args.save_at and not args.resume:
            model_engine.save_checkpoint(args.checkpoint_dir, client_state={"step": step + 1})


if __name__ == "__main__":
    main()
