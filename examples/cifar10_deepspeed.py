"""CIFAR-10 classification in the shape of DeepSpeed's CIFAR tutorial (training/cifar/cifar10_deepspeed.py).

The script is written for DeepSpeed and runs on ds_lab with one line changed
(`import deepspeed` -> `import ds_lab as deepspeed`); tests/test_examples.py does that substitution
and checks that both give the same losses. Nothing is downloaded: the 32x32x3 images come from a
seeded generator (ten class templates plus noise), so the task is learnable and identical everywhere.

    torchrun --standalone --nproc-per-node 2 examples/cifar10_deepspeed.py \
        --deepspeed --deepspeed_config examples/cifar10_fp32.json

Each rank prints `LOSS <rank> <micro-step> <loss>` per micro-step (the loss as a Python float repr).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import deepspeed
from deepspeed.accelerator import get_accelerator


def add_argument():
    parser = argparse.ArgumentParser(description="CIFAR")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from distributed launcher")
    parser.add_argument("-e", "--epochs", default=1, type=int, help="number of total epochs")
    parser.add_argument("--num_images", default=768, type=int, help="size of the synthetic training set")
    parser.add_argument("--seed", default=1234, type=int)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class SyntheticCIFAR10(torch.utils.data.Dataset):
    """CIFAR-10's shapes and classes; images = class template + noise, from one seeded generator."""

    def __init__(self, num_images, seed=0):
        generator = torch.Generator().manual_seed(seed)
        templates = torch.randn(10, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 10, (num_images,), generator=generator)
        noise = torch.randn(num_images, 3, 32, 32, generator=generator)
        self.images = templates[self.labels] + 0.8 * noise

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def main():
    args = add_argument()
    deepspeed.init_distributed()
    torch.manual_seed(args.seed)
    trainset = SyntheticCIFAR10(args.num_images, seed=args.seed)
    net = Net()
    parameters = filter(lambda p: p.requires_grad, net.parameters())

    model_engine, optimizer, trainloader, __ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=trainset)

    local_device = get_accelerator().device_name(model_engine.local_rank)
    local_rank = model_engine.local_rank
    rank = model_engine.global_rank

    target_dtype = None
    if model_engine.bfloat16_enabled():
        target_dtype = torch.bfloat16
    elif model_engine.fp16_enabled():
        target_dtype = torch.half

    criterion = nn.CrossEntropyLoss()
    micro_step = 0
    for epoch in range(args.epochs):
        for i, data in enumerate(trainloader):
            inputs, labels = data[0].to(local_device), data[1].to(local_device)
            if target_dtype is not None:
                inputs = inputs.to(target_dtype)
            outputs = model_engine(inputs)
            loss = criterion(outputs, labels)
            model_engine.backward(loss)
            model_engine.step()
            # the loss of the same logits computed in fp32: under bf16 a finer fingerprint of the
            # weights than the bf16 loss itself (which has 8 significant bits)
            fine_loss = criterion(outputs.detach().float(), labels)
            print(f"LOSS {rank} {micro_step} {fine_loss.item()!r}", flush=True)
            micro_step += 1
    if local_rank in (0, -1) and rank == 0:
        print("Finished Training", flush=True)


if __name__ == "__main__":
    main()
