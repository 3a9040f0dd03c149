"""BERT-style masked language modelling from a config, in the shape of DeepSpeed's BERT examples.

A tiny `BertForMaskedLM` is built from a `BertConfig` (no weights are downloaded) and trained on
synthetic token sequences (a seeded generator, with a learnable pattern) masked the BERT way: 15% of
the positions are chosen, their labels kept and their inputs replaced by [MASK]. The data loader is the
script's own (a DistributedSampler over the data-parallel ranks), wrapped in
`deepspeed.utils.RepeatingLoader`. Written for DeepSpeed; runs on ds_lab with the imports changed
(`import deepspeed` -> `import ds_lab as deepspeed`).

    torchrun --standalone --nproc-per-node 2 examples/bert_mlm_deepspeed.py \
        --deepspeed --deepspeed_config examples/bert_zero2.json

Each rank prints `LOSS <rank> <micro-step> <loss>` per micro-step.
"""
import argparse

import torch
from transformers import BertConfig, BertForMaskedLM

import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import RepeatingLoader

VOCAB, SEQ, MASK_ID = 96, 32, 3


def get_args():
    parser = argparse.ArgumentParser(description="BERT masked LM")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from distributed launcher")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=42)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class MaskedTokens(torch.utils.data.Dataset):
    """Sequences that count upwards from a random start (mod the vocabulary), 15% masked."""

    def __init__(self, num_sequences, seed):
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(4, VOCAB, (num_sequences, 1), generator=generator)
        tokens = 4 + (start - 4 + torch.arange(SEQ)) % (VOCAB - 4)
        masked = torch.rand(num_sequences, SEQ, generator=generator) < 0.15
        masked[:, 0] = True  # at least one label per sequence
        self.labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
        self.input_ids = torch.where(masked, torch.full_like(tokens, MASK_ID), tokens)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.labels[index]}


def main():
    args = get_args()
    deepspeed.init_distributed()
    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config)

    model_engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model,
                                                         model_parameters=model.parameters())
    device = get_accelerator().device_name(model_engine.local_rank)
    rank, world_size = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()

    micro_batch = model_engine.train_micro_batch_size_per_gpu()
    dataset = MaskedTokens(micro_batch * world_size * 8, seed=args.seed)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    loader = RepeatingLoader(torch.utils.data.DataLoader(dataset, batch_size=micro_batch, sampler=sampler))
    data_iter = iter(loader)

    for micro_step in range(args.steps * model_engine.gradient_accumulation_steps()):
        batch = {k: v.to(device) for k, v in next(data_iter).items()}
        loss = model_engine(**batch).loss
        model_engine.backward(loss)
        model_engine.step()
        print(f"LOSS {rank} {micro_step} {loss.float().item()!r}", flush=True)


if __name__ == "__main__":
    main()
