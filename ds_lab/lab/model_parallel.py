"""Rank functions for model parallelism (chapter 4): tensor parallel on T ranks, pipeline on P stages.

Each runs on every rank under `ds_lab.launch(fn, world_size, ...)` and returns plain data: errors
against the unsharded computation, the collectives the comm log recorded, losses, weights, spans.

    ds_lab.launch(split_matmul, 2, A, B)                       # C = A B from shards: sum vs concatenation
    ds_lab.launch(tensor_parallel_mlp, 2, 16, 2, 8)            # Megatron's column -> row pair vs nn.Linear
    ds_lab.launch(tensor_parallel_train, 2, 2, config, batches, MODEL)     # the GPT split over 2 ranks
    ds_lab.launch(tensor_parallel_traffic, 2, 2, False, MODEL, x)          # one step's collectives
    ds_lab.launch(pipeline_train, 2, "1f1b", 4, config, batches, MODEL, (0.1, 0.9))  # the GPT on 2 stages

The pipelined GPT (`gpt_pipeline_layers`) is the ds_lab GPT written as a list of layers: the token
embedding (tied with the LM head, so it lives on the first *and* the last stage), positions, blocks,
the final LayerNorm, the head. `pipeline_reference` trains the same layers in one process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ds_lab
from ds_lab import comm, parallel
from ds_lab.models import GPT, GPTConfig
from ds_lab.models.gpt import Block, Embedding
from ds_lab.models.gpt_tp import GPTTP
from ds_lab.monitor.memory import ActivationTracker
from ds_lab.parallel import ColumnParallelLinear, RowParallelLinear, gather_parameter
from ds_lab.pipe import LayerSpec, PipelineModule, TiedLayerSpec


def _records(mark) -> list:
    """The collectives since `mark` as (op, tag, message bytes, bytes this rank sent)."""
    return [(r.op, r.tag, r.bytes, r.wire_bytes) for r in comm.get_log(since=mark)]


def _max_error(a, b) -> float:
    return (a.detach() - b.detach()).abs().max().item()


# ---- tensor parallel -----------------------------------------------------------------------------

@torch.no_grad()
def split_matmul(A, B):
    """C = A B on T ranks, both ways Megatron splits a matmul, with the engine's operators:

        row split     rank i holds A_i (columns of A) and B_i (rows of B): C = sum_i A_i B_i   (all-reduce)
        column split  rank i holds all of A and B's columns B^(i):        C = [A B^(1) | ...]  (all-gather)

    Also the article's §4.2 recipe: the row split's partial products A_i B_i, concatenated."""
    rank = parallel.model_parallel_rank()
    A_i = parallel.scatter_to_region(A)                                 # this rank's columns of A
    B_i = B.chunk(parallel.model_parallel_world_size(), dim=0)[rank]    # ... and the matching rows of B
    partial = A_i @ B_i
    mark = comm.record_count()
    row_split = parallel.reduce_from_region(partial)                    # g: the sum over ranks
    row_log = _records(mark)
    mark = comm.record_count()
    column_split = parallel.gather_from_region(A @ parallel.scatter_to_region(B))  # concatenate the columns
    column_log = _records(mark)
    article = parallel.gather_from_region(partial)                      # [A_1 B_1 | A_2 B_2 | ...]
    return dict(partial=partial, row_split=row_split, column_split=column_split, article=article,
                row_log=row_log, column_log=column_log, shapes=dict(A_i=tuple(A_i.shape), B_i=tuple(B_i.shape)))


def tensor_parallel_mlp(hidden, batch, seq, seed=0):
    """Megatron's MLP, Y = GeLU(X A) B with A split by columns and B by rows, against the same two
    nn.Linear in one process: forward output, input gradient and (gathered) weight gradients, and the
    collectives of forward and of backward."""
    torch.manual_seed(seed)  # the same on every rank: the same full layers, input and output gradient
    fc, proj = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
    x, dy = torch.randn(batch, seq, hidden), torch.randn(batch, seq, hidden)
    pair = nn.Sequential(ColumnParallelLinear.from_full(fc), nn.GELU(), RowParallelLinear.from_full(proj))
    one = nn.Sequential(fc, nn.GELU(), proj)
    x_tp, x_one = x.clone().requires_grad_(), x.clone().requires_grad_()
    mark = comm.record_count()
    y = pair(x_tp)
    forward = _records(mark)
    mark = comm.record_count()
    y.backward(dy)
    backward = _records(mark)
    y_one = one(x_one)
    y_one.backward(dy)
    errors = {"output": _max_error(y, y_one), "input grad": _max_error(x_tp.grad, x_one.grad),
              "A grad": _max_error(gather_parameter(pair[0].weight, pair[0].weight.grad), fc.weight.grad),
              "B grad": _max_error(gather_parameter(pair[2].weight, pair[2].weight.grad), proj.weight.grad)}
    return dict(errors=errors, forward=forward, backward=backward,
                shards={"A (column)": tuple(pair[0].weight.shape), "B (row)": tuple(pair[2].weight.shape)})


def sgd(lr, momentum):
    """An optimizer factory for `initialize(optimizer=...)`: SGD with momentum. Unlike Adam, it shows a
    gradient off by a constant factor, so an equivalence under SGD checks the gradients themselves."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def tensor_parallel_train(tensor_size, config, batches, model, sequence_parallel=False, momentum_sgd=None):
    """Train the GPT through `ds_lab.initialize`, one optimizer step per global batch. tensor_size 0:
    the plain GPT (run it on 1 rank: the reference); T: GPTTP over a tensor group of T (world = T).
    momentum_sgd: (lr, momentum) to train with SGD (default: the config's optimizer). Tensor partners see the
    same rows (the whole batch here: one data-parallel replica). Returns losses and whole weights."""
    if tensor_size:
        parallel.initialize_model_parallel(tensor_model_parallel_size=tensor_size)
        parallel.model_parallel_manual_seed(0)
        net = GPTTP(GPTConfig(**model), sequence_parallel=sequence_parallel)
    else:
        torch.manual_seed(0)
        net = GPT(GPTConfig(**model))
    kwargs = {"optimizer": sgd(*momentum_sgd)} if momentum_sgd else {}
    engine, *_ = ds_lab.initialize(model=net, config=config, **kwargs)
    losses, step_traffic = [], []
    for batch in batches:
        mark = comm.record_count()
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        step_traffic.append(_records(mark))
    weights = net.full_state_dict() if tensor_size else {k: v.detach().clone() for k, v in net.state_dict().items()}
    parallel.destroy_model_parallel()
    return dict(losses=losses, weights=weights, traffic=step_traffic, num_parameters=engine.num_parameters())


def _saved_inside(tracker, model, kinds=(nn.LayerNorm,)):
    """Bytes `tracker` sees saved for backward while a module of `kinds` runs its forward."""
    counted, before, handles = [0], [], []
    for m in model.modules():
        if isinstance(m, kinds):
            handles.append(m.register_forward_pre_hook(lambda mod, args: before.append(tracker.live)))
            handles.append(m.register_forward_hook(
                lambda mod, args, out: counted.__setitem__(0, counted[0] + tracker.live - before.pop())))
    return counted, handles


def tensor_parallel_traffic(tensor_size, sequence_parallel, model, input_ids):
    """One forward and backward of GPTTP on `input_ids` (every tensor rank the same rows): the comm log
    of each, the activations saved for backward (peak), and those saved inside the LayerNorms, the
    region that sequence parallel splits over the sequence (counted by our own hooks)."""
    parallel.initialize_model_parallel(tensor_model_parallel_size=tensor_size)
    parallel.model_parallel_manual_seed(0)
    net = GPTTP(GPTConfig(**model), sequence_parallel=sequence_parallel)
    tracker = ActivationTracker(exclude=list(net.parameters()))
    layernorm_bytes, handles = _saved_inside(tracker, net)
    mark = comm.record_count()
    with tracker.track():
        loss = net(input_ids=input_ids, labels=input_ids).loss
    forward = _records(mark)
    for h in handles:
        h.remove()
    mark = comm.record_count()
    loss.backward()
    backward = _records(mark)
    parallel.destroy_model_parallel()
    return dict(loss=loss.item(), forward=forward, backward=backward, layernorm_bytes=layernorm_bytes[0],
                activations_peak=tracker.peak)


# ---- pipeline parallel ---------------------------------------------------------------------------

class Positions(nn.Module):
    """x + the position embedding of x's positions."""

    def __init__(self, block_size, n_embd):
        super().__init__()
        self.wpe = Embedding(block_size, n_embd)

    def forward(self, x):
        return x + self.wpe(torch.arange(x.shape[1], device=x.device))


def lm_head(embedding, x):
    """The tied LM head: scores against the token embedding's own matrix."""
    return x @ embedding.weight.T


def lm_loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def gpt_pipeline_layers(model: dict) -> list:
    """The GPT as pipeline layers (DeepSpeed's PipelineModule style): tied embedding, positions, blocks,
    final LayerNorm, tied head. Built only on the stage that owns each layer."""
    cfg = GPTConfig(**model)
    return [TiedLayerSpec("embed", Embedding, cfg.vocab_size, cfg.n_embd),
            LayerSpec(Positions, cfg.block_size, cfg.n_embd),
            *[LayerSpec(Block, cfg) for _ in range(cfg.n_layer)],
            LayerSpec(nn.LayerNorm, cfg.n_embd),
            TiedLayerSpec("embed", Embedding, cfg.vocab_size, cfg.n_embd, forward_fn=lm_head)]


def pipeline_module(model: dict, stages: int, virtual_stages: int = 1, checkpoint_interval: int = 0) -> PipelineModule:
    # seed_layers: layer i is built from seed base + i on whichever stage owns it, so any P (and one
    # process) starts from the same weights
    return PipelineModule(gpt_pipeline_layers(model), num_stages=stages, loss_fn=lm_loss, seed_layers=True,
                          virtual_stages=virtual_stages, activation_checkpoint_interval=checkpoint_interval)


def next_token_pairs(batch, micro_batches: int):
    """(inputs, labels) for each of the m micro-batches of one global batch of rows of s+1 tokens."""
    for rows in batch.chunk(micro_batches):
        yield rows[:, :-1], rows[:, 1:]


def pipeline_train(schedule, micro_batches, config, batches, model, momentum_sgd, virtual_stages=1,
                   checkpoint_interval=0):
    """On every rank of a P-stage pipeline (P = world size): `engine.train_batch` once per global batch.
    checkpoint_interval: recompute the activations of every k layers in backward (0: keep them).

    Returns the loss every rank got, this stage's weights, its compute spans per batch (the engine's
    timeline), the saved-activation peak of the first batch (the ledger), the most micro-batches alive
    at once, and the bytes this stage sent to its neighbours (activations forward, gradients back)."""
    config = {**config, "gradient_accumulation_steps": micro_batches,
              "pipeline": {"schedule": schedule, **({"virtual_stages": virtual_stages} if virtual_stages > 1 else {})}}
    module = pipeline_module(model, comm.get_world_size(), virtual_stages, checkpoint_interval)
    engine, *_ = ds_lab.initialize(model=module, config=config, optimizer=sgd(*momentum_sgd))
    losses, spans, sent = [], [], {}
    mark = comm.record_count()
    for batch in batches:
        losses.append(engine.train_batch(next_token_pairs(batch, micro_batches)).item())
        spans.append(list(engine.timeline))
    for r in comm.get_log(since=mark):
        if r.op == "send":
            sent[r.tag] = sent.get(r.tag, 0) + r.bytes
    return dict(losses=losses, stage=engine.stage_id, parts=module.parts, spans=spans, sent=sent,
                state={k: v.detach().clone() for k, v in module.state_dict().items()},
                activations_peak=engine.memory_report()["activations_peak"],
                live_micro_batches=engine.peak_live_micro_batches)


def pipeline_reference(config, batches, model, micro_batches, momentum_sgd):
    """The same layers in one process, plain torch: m micro-batches' gradients summed (loss / m), clipped
    as the config says, one SGD step per batch."""
    module = pipeline_module(model, 1)
    opt = sgd(*momentum_sgd)(list(module.parameters()))
    losses = []
    for batch in batches:
        opt.zero_grad()
        total = 0.0
        for inputs, labels in next_token_pairs(batch, micro_batches):
            loss = lm_loss(module(inputs), labels)
            (loss / micro_batches).backward()
            total += loss.item()
        if config.get("gradient_clipping"):
            torch.nn.utils.clip_grad_norm_(module.parameters(), config["gradient_clipping"])
        opt.step()
        losses.append(total / micro_batches)
    return dict(losses=losses, state={k: v.detach().clone() for k, v in module.state_dict().items()})
