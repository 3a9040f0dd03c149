"""What chapter 3 imports from ds_lab.lab: ZeRO-1 by hand (zero_by_hand) against the engine's stage 1
and a one-process run, and zero_train's record of every collective a ZeRO step issues."""
import torch

import ds_lab
from ds_lab.data import DistributedLoader, corpus_tokens
from ds_lab.lab import zero_train
from ds_lab.lab.zero_by_hand import engine_stage1, one_process, zero1_by_hand
from ds_lab.models import GPT, GPTConfig

MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=17)  # Ψ = 34,208: not a multiple of 3


def _batches(steps=3, global_batch=6):
    loader = DistributedLoader(corpus_tokens(), MODEL["block_size"], global_batch, seed=0)
    return [loader.batch(i)["input_ids"] for i in range(steps)]


def test_zero1_by_hand_equals_the_engine_and_one_process():
    batches = _batches()
    psi = GPT(GPTConfig(**MODEL)).num_parameters()
    single = one_process(batches, MODEL)
    assert not torch.equal(single["weights"], one_process(batches[:0], MODEL)["weights"])  # training moved them
    for world_size in (2, 3):
        hand = ds_lab.launch(zero1_by_hand, world_size, batches, MODEL)
        engine = ds_lab.launch(engine_stage1, world_size, batches, MODEL)
        chunk = -(-psi // world_size)  # at 3 ranks the flat vector is padded (Ψ is not a multiple of 3)
        for h, e in zip(hand, engine):
            assert torch.equal(h["weights"], hand[0]["weights"]) and h["weights"].numel() == psi
            assert h["losses"] == e["losses"]
            if world_size == 2:  # the same arithmetic as the engine's stage 1, bit for bit
                assert torch.equal(h["weights"], e["weights"])
            else:  # dividing by 3 rounds: the engine's average may differ in the last bit
                assert (h["weights"] - e["weights"]).abs().max() < 1e-5
            assert h["chunk"] == chunk and h["adam_state_elements"] == 2 * chunk  # m and v of 1/N only
            # per step one reduce-scatter and one all-gather of the padded fp32 vector, 4 x N x chunk bytes
            assert h["records"] == [("reduce_scatter", 4 * world_size * chunk),
                                    ("all_gather", 4 * world_size * chunk)] * len(batches)
        assert (hand[0]["weights"] - single["weights"]).abs().max() < 1e-5


def test_zero_train_keeps_every_record_and_what_is_untagged_is_scalars():
    batches = _batches(steps=2, global_batch=4)
    for stage in (1, 3):
        config = {"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                  "bf16": {"enabled": True},
                  "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                        "stage3_max_reuse_distance": 0}}
        results = ds_lab.launch(zero_train, 2, config, batches, MODEL)
        psi = GPT(GPTConfig(**MODEL)).num_parameters()
        for r in results:
            for step, messages, others in zip(range(len(batches)), r["messages"], r["others"]):
                total = sum(sum(sizes) for sizes in messages.values())
                # stage 1: reduce-scatter + all-gather of 2Ψ bytes (bf16). Stage 3: 3 x 2Ψ, plus one more
                # forward gather of the embedding, which the tied head reads (vocab x n_embd elements)
                tied_extra = 2 * GPTConfig(**MODEL).vocab_size * MODEL["n_embd"] if stage == 3 else 0
                assert total == 2 * psi * (2 if stage == 1 else 3) + tied_extra, (stage, step, messages)
                # what is left beside the tagged collectives: the global norm, one float64 scalar
                assert others == [("all_reduce", "grad_norm", 8)], others
                assert r["all_bytes"][step] == total + 8
