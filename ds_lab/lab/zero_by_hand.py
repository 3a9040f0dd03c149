"""ZeRO-1 written out by hand, in about twenty lines, to set beside the engine's (chapter 3).

The idea: data parallelism's all-reduce *is* a reduce-scatter followed by an all-gather. Put the
optimizer step between the two halves and each rank needs Adam's state for its own 1/N of the
parameters only:

    flat fp32 gradient --reduce-scatter--> my chunk of the averaged gradient
    Adam on my chunk (m, v and the master weights: 1/N of them)
    my updated chunk --all-gather--> every rank has the whole updated model again

`zero1_by_hand` does exactly that with `ds_lab.comm` and torch's own Adam; `engine_stage1` runs the
engine's ZeRO-1 on the same model and batches, and `one_process` trains the same model in a single
process on the whole global batch. All three return the flat fp32 weights after the last step, so
a chapter can compare them element by element.

    hand = ds_lab.launch(zero1_by_hand, 2, batches, MODEL)   # one dict per rank
"""
from __future__ import annotations

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import ds_lab
from ds_lab import comm
from ds_lab.lab.workers import rows_of
from ds_lab.models import GPT, GPTConfig

LR = 1e-3  # Adam's defaults otherwise: betas (0.9, 0.999), eps 1e-8, no weight decay (DeepSpeed's "Adam")


def zero1_by_hand(batches, model, lr=LR):
    """ZeRO-1 by hand: reduce-scatter the flat fp32 gradient, step Adam on this rank's chunk,
    all-gather the updated chunks. Returns losses, the flat weights, Adam's state elements on this
    rank and the bytes handed to each collective."""
    rank, n = comm.get_rank(), comm.get_world_size()
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**model))
    params = list(gpt.parameters())
    psi = sum(p.numel() for p in params)
    chunk = -(-psi // n)                                  # Ψ/N, rounded up: the flat vector is padded to N chunks
    flat = torch.zeros(chunk * n)
    flat[:psi] = parameters_to_vector(params).detach()
    master = flat[rank * chunk:(rank + 1) * chunk].clone().requires_grad_()   # my 1/N of the weights
    adam = torch.optim.Adam([master], lr=lr)             # so m and v are 1/N too
    losses, mark = [], comm.record_count()
    for batch in batches:
        x = rows_of(batch, rank, n)
        gpt.zero_grad()
        loss = gpt(input_ids=x, labels=x).loss
        loss.backward()
        grads = torch.zeros(chunk * n)
        grads[:psi] = parameters_to_vector([p.grad for p in params])
        mine = torch.empty(chunk)
        comm.reduce_scatter(mine, grads / n)              # my chunk of the average over ranks, only mine
        master.grad = mine
        adam.step()                                       # the optimizer touches my chunk only
        comm.all_gather(flat, master.detach())            # every rank gets every updated chunk
        vector_to_parameters(flat[:psi], params)
        losses.append(loss.item())
    state = sum(t.numel() for s in adam.state.values() for t in s.values() if t.dim() > 0)
    sent = [(r.op, r.bytes) for r in comm.get_log(since=mark)]
    return dict(losses=losses, weights=flat[:psi].clone(), adam_state_elements=state, chunk=chunk, records=sent)


def engine_stage1(batches, model, lr=LR):
    """The engine's ZeRO-1 on the same model and batches, in fp32: losses and flat weights. Clipping
    is off (DeepSpeed 0.19.8 clips at 1.0 by default, which needs the global norm: one more all-reduce)."""
    rank, n = comm.get_rank(), comm.get_world_size()
    torch.manual_seed(0)
    config = {"train_batch_size": batches[0].shape[0], "optimizer": {"type": "Adam", "params": {"lr": lr}},
              "gradient_clipping": 0.0, "zero_optimization": {"stage": 1}}  # no clipping: the hand version has none
    engine, _, _, _ = ds_lab.initialize(model=GPT(GPTConfig(**model)), config=config)
    losses = []
    for batch in batches:
        x = rows_of(batch, rank, n)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return dict(losses=losses, weights=parameters_to_vector(engine.module.parameters()).detach().clone())


def one_process(batches, model, lr=LR):
    """The same training in one process on the whole global batch, with torch's Adam."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**model))
    adam = torch.optim.Adam(gpt.parameters(), lr=lr)
    losses = []
    for x in batches:
        adam.zero_grad()
        loss = gpt(input_ids=x, labels=x).loss
        loss.backward()
        adam.step()
        losses.append(loss.item())
    return dict(losses=losses, weights=parameters_to_vector(gpt.parameters()).detach().clone())
