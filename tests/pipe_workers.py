"""Rank functions and the one-process reference for the pipeline tests: a tiny GPT as PipelineModule layers
(tied embedding on the first and last stage, position embedding, blocks, final norm, tied head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ds_lab
from ds_lab import comm
from ds_lab.comm.topology import ProcessTopology
from ds_lab.models.gpt import Block, Embedding, GPTConfig
from ds_lab.parallel import (ColumnParallelLinear, RowParallelLinear, destroy_model_parallel, gather_parameter,
                             initialize_model_parallel)
from ds_lab.lab.model_parallel import Positions, lm_head, lm_loss  # noqa: F401  (the chapter's layers)
from ds_lab.pipe import LayerSpec, PipelineModule, TiedLayerSpec

SMALL = dict(vocab_size=37, block_size=8, n_layer=4, n_head=2, n_embd=12)


def gpt_layers():
    cfg = GPTConfig(**SMALL)
    return [TiedLayerSpec("embed", Embedding, cfg.vocab_size, cfg.n_embd),
            LayerSpec(Positions, cfg.block_size, cfg.n_embd),
            *[LayerSpec(Block, cfg) for _ in range(cfg.n_layer)], LayerSpec(nn.LayerNorm, cfg.n_embd),
            TiedLayerSpec("embed", Embedding, cfg.vocab_size, cfg.n_embd, forward_fn=lm_head)]


class ParallelMLP(nn.Module):
    """x + W2 gelu(W1 LN(x)), W1 split by columns and W2 by rows over the grid's model axis (Megatron)."""

    def __init__(self, n_embd):
        super().__init__()
        self.ln = nn.LayerNorm(n_embd)
        self.fc = ColumnParallelLinear(n_embd, 4 * n_embd)
        self.proj = RowParallelLinear(4 * n_embd, n_embd)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


def tp_layers():
    """Pipeline stages with tensor-parallel layers inside: the 3D grid (pipe, data, model)."""
    cfg = GPTConfig(**SMALL)
    layers = gpt_layers()
    return layers[:2] + [LayerSpec(ParallelMLP, cfg.n_embd), layers[2], LayerSpec(ParallelMLP, cfg.n_embd),
                         layers[3]] + layers[-2:]


def pipe_model(stages, virtual_stages=1, checkpoint_interval=0, model_axis=1, tensor_parallel=False):
    """model_axis > 1: the grid (pipe, data, model) with replicated (not tensor-parallel) layers on the
    model axis: every model rank computes the same, which checks the pipeline's plumbing on a 3D grid."""
    topology = None
    if model_axis > 1:
        topology = ProcessTopology(pipe=stages, data=comm.get_world_size() // (stages * model_axis), model=model_axis)
    layers = tp_layers() if tensor_parallel else gpt_layers()
    return PipelineModule(layers, num_stages=stages, topology=topology, loss_fn=lm_loss, seed_layers=True,
                          virtual_stages=virtual_stages, activation_checkpoint_interval=checkpoint_interval)


def make_data(steps, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SMALL["vocab_size"], (rows, SMALL["block_size"] + 1), generator=g) for _ in range(steps)]


def micro_batches(batch, m, dp, d, micro):
    """Replica d's m micro-batches of one global batch: rows ((j dp + d) micro ...) for micro-batch j."""
    for j in range(m):
        rows = batch[(j * dp + d) * micro:(j * dp + d + 1) * micro]
        yield rows[:, :-1], rows[:, 1:]


def optimizer_for(kind):
    if kind == "sgd":
        return lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)
    # eps 1e-6: Adam divides by sqrt(v) + eps, which turns fp32 rounding noise in near-zero gradients
    # into visible update differences at eps 1e-8; the comparison is about the pipeline, not that
    return lambda params: torch.optim.Adam(params, lr=0.01, eps=1e-6)


def config_for(case):
    cfg = {"train_micro_batch_size_per_gpu": case["micro"], "gradient_accumulation_steps": case["m"],
           "gradient_clipping": case.get("clip", 0.3), "zero_optimization": {"stage": case.get("zero", 0)}}
    if "schedule" in case:
        cfg["pipeline"] = {"schedule": case["schedule"], **case.get("pipeline", {})}
    return cfg


def train_cases(cases, data):
    """Run each case (stages, m, micro, schedule, v, zero, opt) on this rank; return per case the
    losses, grad norms, this stage's weights (data rank 0 only) and the pipeline traffic."""
    results = []
    for case in cases:
        if case.get("tp"):  # Megatron's set-up: the grid first, then the model's tensor-parallel layers
            initialize_model_parallel(case["tp"], case["stages"])
        model = pipe_model(case["stages"], case.get("v", 1), case.get("ckpt", 0), case.get("model_axis", 1),
                           tensor_parallel=bool(case.get("tp")))
        try:
            engine, *_ = ds_lab.initialize(model=model, config=config_for(case), optimizer=optimizer_for(case["opt"]))
        except Exception as err:  # a refused configuration: its message is the result
            results.append({"error": f"{type(err).__name__}: {err}"})
            continue
        dp, d = engine.dp_world_size, engine.dp_rank
        losses, norms = [], []
        comm.reset_log()
        for batch in data[:case.get("steps", 2)]:
            loss = engine.train_batch(micro_batches(batch, case["m"], dp, d, case["micro"]))
            losses.append(loss.item())
            norms.append(engine.get_global_grad_norm())
        live, activation_peak = engine.peak_live_micro_batches, engine.memory_report()["activations_peak"]
        traffic = {}
        for rec in comm.get_log():
            if rec.tag and rec.tag.startswith("pipe_") and rec.op == "send":
                traffic[rec.tag] = traffic.get(rec.tag, 0) + rec.bytes
        eval_loss = engine.eval_batch(micro_batches(data[0], case["m"], dp, d, case["micro"])).item()
        try:
            engine.backward(None)
        except Exception as err:
            refusal = str(err)
        first_copy = d == 0 and engine.grid.rank_in("model") == 0
        whole = {k: gather_parameter(v) for k, v in model.state_dict(keep_vars=True).items()}  # tensor shards joined
        state = whole if first_copy else {}
        destroy_model_parallel()
        results.append(dict(losses=losses, norms=norms, state=state, traffic=traffic, eval=eval_loss,
                            stage=engine.stage_id, parts=model.parts, timeline=engine.timeline, refusal=refusal,
                            activation_peak=activation_peak, live=live))
    return results


def reference(case, data):
    """The same layers in one process, plain torch: losses, norms and final weights."""
    model = pipe_model(1, tensor_parallel=bool(case.get("tp")))
    opt = optimizer_for(case["opt"])(list(model.parameters()))
    m, micro, dp = case["m"], case["micro"], case.get("dp", 1)
    losses, norms = [], []
    for batch in data[:case.get("steps", 2)]:
        opt.zero_grad()
        total = 0.0
        for j in range(m):
            rows = batch[j * dp * micro:(j + 1) * dp * micro]
            loss = lm_loss(model(rows[:, :-1]), rows[:, 1:])
            (loss / m).backward()
            total += loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), case.get("clip", 0.3)).item())
        opt.step()
        losses.append(total / m)
    with torch.no_grad():  # eval_batch on the first batch, after training
        rows = [data[0][j * dp * micro:(j + 1) * dp * micro] for j in range(m)]
        evaluated = sum(lm_loss(model.eval()(r[:, :-1]), r[:, 1:]).item() for r in rows) / m
    return dict(losses=losses, norms=norms, state=model.state_dict(), eval=evaluated)


def checkpoint_worker(folder, data):
    """PP2 x DP2: one batch, save, one more batch (the continuation). A fresh PP2 x DP2 engine loads and
    runs the second batch (must match); a PP4 engine loads the weights only (from the layer files)."""
    def engine_for(stages, zero=0):
        cfg = config_for(dict(micro=2, m=4, zero=zero, schedule="1f1b"))
        return ds_lab.initialize(model=pipe_model(stages), config=cfg, optimizer=optimizer_for("sgd"))[0]

    def batch(engine, step):
        return micro_batches(data[step], 4, engine.dp_world_size, engine.dp_rank, 2)

    first = engine_for(2, zero=1)
    first.train_batch(batch(first, 0))
    first.save_checkpoint(folder, client_state={"note": "after one batch"})
    saved = {k: v.clone() for k, v in first.module.state_dict().items()}
    continued = first.train_batch(batch(first, 1)).item()
    second = engine_for(2, zero=1)
    _, client = second.load_checkpoint(folder)
    resumed = second.train_batch(batch(second, 1)).item()
    third = engine_for(4)
    try:
        third.load_checkpoint(folder)
        refusal = None
    except Exception as err:
        refusal = str(err)
    third.load_checkpoint(folder, load_optimizer_states=False)
    return dict(continued=continued, resumed=resumed, client=client, refusal=refusal, saved=saved,
                steps=second.global_steps, reloaded={k: v.clone() for k, v in third.module.state_dict().items()},
                weights_after={k: v.clone() for k, v in first.module.state_dict().items()},
                weights_resumed={k: v.clone() for k, v in second.module.state_dict().items()})


def pipeline_section_on_a_plain_model():
    try:
        ds_lab.initialize(model=nn.Linear(2, 2), config={"train_batch_size": 1, "pipeline": {"schedule": "afab"}})
    except Exception as err:
        return str(err)
    return "accepted"
