"""Rank functions for the tensor-parallel tests (tests/test_tensor_parallel.py)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import ds_lab
from ds_lab import comm, parallel
from ds_lab.models import GPT, GPTConfig
from ds_lab.models.gpt_tp import GPTTP
from ds_lab.monitor.memory import ActivationTracker
from ds_lab.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, gather_parameter,
                             vocab_parallel_cross_entropy)
from tests.workers import rank_slice
from ds_lab.lab.model_parallel import _saved_inside

# heads and MLP divisible by 2 and 4; the vocabulary (257) by neither: it is padded
TP_MODEL = dict(vocab_size=257, block_size=16, n_layer=2, n_head=4, n_embd=36)


def _err(a, b) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _full_and_input(seed, in_features, out_features, batch=(3, 8)):
    torch.manual_seed(seed)  # the same on every rank: the same full layer, input and output grad
    full = nn.Linear(in_features, out_features)
    x = torch.randn(*batch, in_features)
    dy = torch.randn(*batch, out_features)
    return full, x, dy


def _run(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y, x.grad


def layers_worker():
    """Each layer against the unsharded one; the whole world is the tensor group (no set-up call)."""
    errs = {}
    size = parallel.model_parallel_world_size()
    # column parallel, output gathered
    full, x, dy = _full_and_input(0, 6, 4 * 3)
    col = ColumnParallelLinear.from_full(full, gather_output=True)
    y, gx = _run(col, x, dy)
    y_ref, gx_ref = _run(full, x, dy)
    errs["column out"], errs["column dx"] = _err(y, y_ref), _err(gx, gx_ref)
    errs["column dW"] = _err(gather_parameter(col.weight, col.weight.grad), full.weight.grad)
    errs["column db"] = _err(gather_parameter(col.bias, col.bias.grad), full.bias.grad)
    errs["column shape"] = float(col.weight.shape != (12 // size, 6))
    # row parallel on a whole input (scattered inside)
    full, x, dy = _full_and_input(1, 4 * 3, 5)
    row = RowParallelLinear.from_full(full, input_is_parallel=False)
    y, gx = _run(row, x, dy)
    y_ref, gx_ref = _run(full, x, dy)
    errs["row out"], errs["row dx"] = _err(y, y_ref), _err(gx, gx_ref)
    errs["row dW"] = _err(gather_parameter(row.weight, row.weight.grad), full.weight.grad)
    errs["row db"] = _err(row.bias.grad, full.bias.grad)
    # column (not gathered) then row: the MLP pattern, nothing exchanged in between
    torch.manual_seed(2)
    fc, proj = nn.Linear(6, 8), nn.Linear(8, 6)
    x, dy = torch.randn(3, 8, 6), torch.randn(3, 8, 6)
    pair = nn.Sequential(ColumnParallelLinear.from_full(fc), nn.GELU(), RowParallelLinear.from_full(proj))
    ref = nn.Sequential(fc, nn.GELU(), proj)
    comm.reset_log()
    y, gx = _run(pair, x, dy)
    ops = [(r.op, r.tag) for r in comm.get_log()]
    y_ref, gx_ref = _run(ref, x, dy)
    errs["mlp out"], errs["mlp dx"] = _err(y, y_ref), _err(gx, gx_ref)
    errs["mlp dW1"] = _err(gather_parameter(pair[0].weight, pair[0].weight.grad), fc.weight.grad)
    errs["mlp dW2"] = _err(gather_parameter(pair[2].weight, pair[2].weight.grad), proj.weight.grad)
    # a fused q|k|v projection, split block by block (stride 3)
    full, x, dy = _full_and_input(3, 6, 3 * 8)
    qkv = ColumnParallelLinear.from_full(full, gather_output=False, stride=3)
    q_rows = full.weight[:8].chunk(size)[comm.get_rank()]
    errs["qkv rows"] = _err(qkv.weight[:8 // size], q_rows)
    errs["qkv gathered"] = _err(gather_parameter(qkv.weight), full.weight)
    # the vocabulary: 257 rows, padded to a multiple of the tensor size
    torch.manual_seed(4)
    emb = nn.Embedding(257, 5)
    ids = torch.randint(0, 257, (3, 8))
    dy = torch.randn(3, 8, 5)
    par = VocabParallelEmbedding.from_full(emb)
    y = par(ids)
    y.backward(dy)
    emb(ids).backward(dy)
    errs["embedding out"] = _err(y, emb(ids))
    errs["embedding dW"] = _err(gather_parameter(par.weight, par.weight.grad), emb.weight.grad)
    refused = []
    for build in (lambda: ColumnParallelLinear(5, 4 * size + 1), lambda: RowParallelLinear(4 * size + 1, 5)):
        try:
            build()
        except ValueError as err:
            refused.append(str(err))
    try:  # heads are split whole: 5 heads over 2 or 4 ranks is refused
        GPTTP(GPTConfig(**dict(TP_MODEL, n_head=5, n_embd=35)))
    except ValueError as err:
        refused.append(str(err))
    return dict(errs=errs, mlp_ops=ops, refused=refused, padded=par.padded_size, per_rank=par.per_rank)


def row_sum_worker():
    """Row-parallel Y = X A with A split by rows: each rank's X_i A_i, and what they add up to."""
    torch.manual_seed(5)
    full = nn.Linear(8, 6, bias=False)
    x = torch.randn(4, 8)
    row = RowParallelLinear.from_full(full, input_is_parallel=False)
    with torch.no_grad():
        partial = F.linear(parallel.scatter_to_region(x), row.weight)  # this rank's X_i A_i, shape [4, 6]
        everyone = torch.empty(comm.get_world_size() * 4, 6)
        comm.all_gather(everyone, partial)
        y = row(x)
    partials = list(everyone.chunk(comm.get_world_size()))
    return dict(full=full(x).detach(), y=y, partials=partials)


def cross_entropy_worker(n_tokens=12, vocab=257):
    torch.manual_seed(6)
    logits = torch.randn(n_tokens, vocab) * 3
    target = torch.randint(0, vocab, (n_tokens,))
    target[1] = -100  # ignored, as the GPT's padding
    full = logits.clone().requires_grad_()
    F.cross_entropy(full, target).backward()
    head = VocabParallelEmbedding(vocab, 1)  # only its vocabulary layout is used
    shard_cols = torch.cat([logits, logits.new_zeros(n_tokens, head.padded_size - vocab)], 1)
    shard = head.mask_padding(shard_cols[:, head.vocab_start:head.vocab_start + head.per_rank]).requires_grad_()
    comm.reset_log()
    loss = vocab_parallel_cross_entropy(shard, target)
    loss.backward()
    log = [(r.op, r.tag, r.bytes) for r in comm.get_log()]
    grad_ref = full.grad[:, head.vocab_start:head.vocab_start + head.per_rank]
    real = min(head.per_rank, max(0, vocab - head.vocab_start))
    return dict(loss=loss.item(), loss_ref=F.cross_entropy(logits, target).item(),
                grad_err=_err(shard.grad[:, :real], grad_ref[:, :real]),
                pad_grad=shard.grad[:, real:].abs().sum().item(), log=log)


def rng_worker(seed=1234):
    """Draws outside a fork agree across tensor ranks, draws inside differ; forking leaves the
    outside stream exactly where it would have been."""
    parallel.model_parallel_manual_seed(seed)
    outside_1 = torch.rand(6)
    with parallel.get_rng_tracker().fork():
        inside_1 = torch.rand(6)
    outside_2 = torch.rand(6)
    with parallel.get_rng_tracker().fork():
        inside_2 = torch.rand(6)
    torch.manual_seed(seed)
    unforked = torch.rand(12)
    mask = parallel.tensor_parallel_dropout(torch.ones(1000), 0.5, training=True)
    return dict(outside=torch.cat([outside_1, outside_2]), inside=torch.cat([inside_1, inside_2]),
                unforked=unforked, mask=mask)


def _global_mean(loss, grid):
    """The global batch's loss: mean over the data-parallel replicas (tensor partners agree already)."""
    mean = loss.detach().reshape(1).clone()
    comm.all_reduce(mean, group=grid.group("data"))
    return mean.item() / grid.size("data")


def train_worker(tensor_size, config, batches, optimizer=None, sequence_parallel=False, model=None):
    """Train the GPT through ds_lab.initialize: tensor_size=0 means the plain GPT (the reference)."""
    model = model or TP_MODEL
    if tensor_size:
        grid = parallel.initialize_model_parallel(tensor_model_parallel_size=tensor_size)
        parallel.model_parallel_manual_seed(0)
        net = GPTTP(GPTConfig(**model), sequence_parallel=sequence_parallel)
    else:
        torch.manual_seed(0)
        net = GPT(GPTConfig(**model))
    kwargs = {}
    if optimizer is not None:
        lr, momentum = optimizer
        kwargs["optimizer"] = lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)
    engine, *_ = ds_lab.initialize(model=net, config=config, **kwargs)
    grid = engine.grid
    data_rank, data_size = grid.rank_in("data"), grid.size("data")
    accumulation = engine.gradient_accumulation_steps()
    losses, norms = [], []
    for batch in batches:
        micro = []
        for m in range(accumulation):  # tensor partners (same data rank) take the same rows
            x = rank_slice(batch, data_rank, data_size, m, accumulation)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            micro.append(loss.detach())
        losses.append(_global_mean(torch.stack(micro).mean(), grid))
        norms.append(engine.get_global_grad_norm())
    weights = net.full_state_dict() if tensor_size else {k: v.detach().clone() for k, v in net.state_dict().items()}
    parallel.destroy_model_parallel()
    return dict(losses=losses, norms=norms, weights=weights, coord=dict(grid.coord))


def traffic_worker(tensor_size, sequence_parallel, batch=2, seq=16, model=None):
    """One forward + backward of the TP GPT: the comm log, and saved activations (LayerNorms, total)."""
    model = model or TP_MODEL
    parallel.initialize_model_parallel(tensor_model_parallel_size=tensor_size)
    parallel.model_parallel_manual_seed(0)
    net = GPTTP(GPTConfig(**model), sequence_parallel=sequence_parallel)
    x = torch.randint(0, model["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    whole = ActivationTracker(exclude=list(net.parameters()))
    ln_bytes, handles = _saved_inside(whole, net)
    comm.reset_log()
    with whole.track():
        loss = net(input_ids=x, labels=x).loss
    for h in handles:
        h.remove()
    loss.backward()
    log = [(r.op, r.tag, r.bytes, r.wire_bytes) for r in comm.get_log()]
    parallel.destroy_model_parallel()
    return dict(log=log, loss=loss.item(), layernorm_bytes=ln_bytes[0], activations_peak=whole.peak)
