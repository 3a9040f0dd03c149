"""Rank functions for tests/test_autotp.py: models built as usual, sharded by `initialize` (AutoTP)."""
from __future__ import annotations

import torch

import ds_lab
from ds_lab import comm, parallel
from ds_lab.models import GPT, GPTConfig
from ds_lab.parallel import gather_parameter
from tests.workers import rank_slice

VOCAB, SEQ, BATCH = 64, 16, 8
SGD = dict(lr=0.05, momentum=0.9)  # a gradient off by a constant factor shows (Adam would hide it)


def build(kind: str, dropout: float = 0.0, seed: int = 0, heads: int = 4):
    """The same model on every rank: the same seed, built from a config (no downloads)."""
    torch.manual_seed(seed)
    if kind == "gpt":
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=heads, n_embd=8 * heads,
                             dropout=dropout))
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=8 * heads, n_layer=2,
                                          n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout,
                                          attn_pdrop=dropout, bos_token_id=0, eos_token_id=0))
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
                                            max_position_embeddings=SEQ, tie_word_embeddings=False,
                                            bos_token_id=0, eos_token_id=0, pad_token_id=0))
    raise ValueError(kind)


def batches(steps: int = 3, seed: int = 3):
    return torch.randint(0, VOCAB, (steps, BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def full_weights(model) -> dict:
    """Every parameter whole (shards gathered over the tensor group: all tensor ranks call it)."""
    return {name: gather_parameter(p) for name, p in model.named_parameters()}


def _global_mean(loss, grid) -> float:
    mean = loss.detach().reshape(1).clone()
    comm.all_reduce(mean, group=grid.group("data"))
    return mean.item() / grid.size("data")


def train_worker(kind, autotp, optimizers=("sgd", "adam"), steps=3, clip=0.5, zero_stage=0):
    """For each optimizer: build `kind`, initialize (AutoTP when autotp > 1), train `steps` global batches.
    "sgd" is a client SGD-momentum built over the *unsharded* model's parameters before initialize;
    "adam" comes from the config."""
    results = {}
    for name in optimizers:
        model = build(kind)
        config = {"train_batch_size": BATCH, "gradient_clipping": clip,
                  "zero_optimization": {"stage": zero_stage}}
        if name == "sgd_tp_model_init":  # DeepSpeed's older path: shard first, no config key
            parallel.tp_model_init(model, tp_size=autotp, dtype=torch.float32)
        elif autotp:
            config["tensor_parallel"] = {"autotp_size": autotp}
        client = torch.optim.SGD(model.parameters(), **SGD) if name.startswith("sgd") else None
        if name == "adam":
            config["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3}}
        engine, optimizer, *_ = ds_lab.initialize(model=model, optimizer=client, config=config)
        grid = engine.grid
        data_rank, data_size = grid.rank_in("data"), grid.size("data")
        losses, norms, log = [], [], []
        for step, batch in enumerate(batches(steps)):
            comm.reset_log()
            x = rank_slice(batch, data_rank, data_size, 0, 1)  # tensor partners: the same rows
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            if step == 1:  # a step past the first forward's input check
                log = [(r.op, r.tag, r.bytes) for r in comm.get_log()]
            engine.step()
            losses.append(_global_mean(loss, grid))
            norms.append(engine.get_global_grad_norm())
        results[name] = dict(losses=losses, norms=norms, weights=full_weights(engine.module), log=log,
                             same_optimizer=optimizer is client if client is not None else None,
                             optimizer_shapes=[tuple(p.shape) for g in optimizer.param_groups for p in g["params"]],
                             local_shapes={n: tuple(p.shape) for n, p in engine.module.named_parameters()},
                             coord=dict(grid.coord), train_batch_size=engine.train_batch_size(),
                             stage=engine.zero_optimization_stage(),
                             micro=engine.train_micro_batch_size_per_gpu())
        parallel.destroy_model_parallel()
    return results


def article_example(autotp, save_dir=None, steps=3):
    """tests/workers.py `hf_article_example` (the article's §5.2 loop: GPT-2 with its default dropout
    0.1, a client AdamW over model.parameters()), with the one AutoTP key added when autotp > 1."""
    import ds_lab as deepspeed
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    config = {"train_micro_batch_size_per_gpu": 2}
    if autotp:
        config["tensor_parallel"] = {"autotp_size": autotp}
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), config=config)
    losses = []
    for _ in range(steps):
        input_ids = torch.randint(0, 256, (2, 16))
        attention_mask = torch.ones_like(input_ids)
        outputs = engine(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
        engine.backward(outputs.loss)
        engine.step()
        losses.append(outputs.loss.item())
    reloaded = None
    if save_dir is not None:  # save, then load into a fresh sharded model: the same weights back
        engine.save_checkpoint(save_dir)
        other = GPT2LMHeadModel(model.config)
        fresh, *_ = deepspeed.initialize(model=other, config=config,
                                         optimizer=torch.optim.AdamW(other.parameters(), lr=1e-4))
        fresh.load_checkpoint(save_dir)
        reloaded = max((a - b).abs().max().item() for a, b in zip(fresh.module.parameters(), model.parameters()))
    attention = engine.module.transformer.h[0].attn
    weights = full_weights(engine.module)
    parallel.destroy_model_parallel()
    return dict(losses=losses, weights=weights, steps=engine.global_steps, training=engine.module.training,
                reloaded=reloaded,
                dropout=attention.attn_dropout.p, attention=attention.config._attn_implementation)


def refusal_worker(case):
    """What AutoTP refuses, with its message (every rank raises the same)."""
    config = {"train_batch_size": BATCH, "tensor_parallel": {"autotp_size": 2}}
    try:
        if case == "heads":
            ds_lab.initialize(model=build("gpt2", heads=3), config=config)
        elif case == "partners_see_different_rows":
            engine, *_ = ds_lab.initialize(model=build("gpt"), config=config)
            x = batches(1)[0][comm.get_rank() * 4:(comm.get_rank() + 1) * 4]  # sliced by global rank: wrong
            engine(input_ids=x, labels=x)
        elif case == "no_projections":
            ds_lab.initialize(model=torch.nn.Sequential(torch.nn.Linear(4, 4)), config=config)
        elif case == "world_not_divisible":
            ds_lab.initialize(model=build("gpt"), config={**config, "tensor_parallel": {"autotp_size": 3}})
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        parallel.destroy_model_parallel()
    return None


def refusal_worker_all():
    return [refusal_worker(case) for case in ("heads", "partners_see_different_rows", "no_projections",
                                              "world_not_divisible")]
