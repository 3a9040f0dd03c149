"""Models and rank functions for tests/test_zero_defects.py (importable: launched ranks import them).

`Net` is a tiny token classifier built to exercise what a GPT forward does not:
    kind="checkpointed"  every segment runs under torch.utils.checkpoint(use_reentrant=True)
    kind="shared"        ...and one Linear is used inside two of those segments, so its gradient
                         arrives in two separate inner backwards (its hooks fire twice)
    kind="growing"       as "shared", but on the first forward only segment 0 uses that Linear: from the
                         second step on its gradient arrives in more parts than the first step taught
    kind="tied_head"     the parent reads a child's parameter in its own forward
                         (logits = h @ self.emb.weight.t()), as a tied LM head does
    kind="plain"         no checkpointing, no sharing
Sizes are odd on purpose (uneven shards, padding).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import ds_lab
from ds_lab import comm
from tests.workers import global_mean, rank_slice

VOCAB, WIDTH, SEGMENTS = 23, 13, 4
ADAM = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}}  # ds_lab config = torch AdamW below


class Segment(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width + 1)
        self.fc2 = nn.Linear(2 * width + 1, width)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, kind="plain", width=WIDTH, segments=SEGMENTS):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(VOCAB, width)
        self.segments = nn.ModuleList(Segment(width) for _ in range(segments))
        self.shared = nn.Linear(width, width) if kind in ("shared", "growing") else None
        self.head = None if kind == "tied_head" else nn.Linear(width, VOCAB)
        self.calls = 0  # forwards so far, this one included (constant while backward re-runs segments)

    def _segment(self, i, h):
        uses = (0, 2) if self.kind == "shared" or self.calls > 1 else (0,)
        if self.shared is not None and i in uses:  # the same Linear inside two checkpointed segments
            h = torch.tanh(self.shared(h))
        return self.segments[i](h)

    def forward(self, x, y):
        self.calls += 1
        h = self.emb(x)
        for i in range(len(self.segments)):
            if self.kind in ("checkpointed", "shared", "growing"):
                h = checkpoint(self._segment, i, h, use_reentrant=True)
            else:
                h = self._segment(i, h)
        logits = h @ self.emb.weight.t() if self.head is None else self.head(h)
        return F.cross_entropy(logits, y)


def make_batches(steps, global_batch, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (global_batch,), generator=g),
             torch.randint(0, VOCAB, (global_batch,), generator=g)) for _ in range(steps)]


def make_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.2, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def reference_train(kind, batches, optimizer="adam", clip=1.0, seed=0, start=None):
    """Plain PyTorch on one process, the whole global batch at once (from `start` weights if given)."""
    torch.manual_seed(seed)
    model = Net(kind)
    if start is not None:
        model.load_state_dict(start)
    opt = make_optimizer(optimizer, model.parameters())
    losses = []
    for x, y in batches:
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return dict(losses=losses, weights={k: v.detach().clone() for k, v in model.state_dict().items()})


def full_weights(engine):
    if engine.zero_optimizer is not None and engine.zero_optimizer.stage == 3:
        return engine.zero_optimizer.full_state_dict()
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def train(engine, batches):
    rank, n, accumulation = comm.get_rank(), comm.get_world_size(), engine.gradient_accumulation_steps()
    losses = []
    for x, y in batches:
        micro_losses = []
        for micro in range(accumulation):
            loss = engine(rank_slice(x, rank, n, micro, accumulation), rank_slice(y, rank, n, micro, accumulation))
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.detach().float())
        losses.append(global_mean(micro_losses))
    return losses


def cases_worker(cases, batches, seed=0):
    """Each case (kind, config, optimizer name): a fresh model and engine, trained on `batches`.
    One launch runs many cases, since starting ranks costs more than these models train."""
    out = []
    for kind, config, optimizer in cases:
        torch.manual_seed(seed)
        model = Net(kind)
        client = make_optimizer(optimizer, model.parameters()) if optimizer == "sgd" else None
        if client is None:
            config = {**config, "optimizer": ADAM}
        engine, _, _, _ = ds_lab.initialize(model=model, optimizer=client, config=config)
        out.append(dict(losses=train(engine, batches), weights=full_weights(engine)))
    return out


def reinitialize_worker(stages, batches, seed=0):
    """A notebook user re-running the `initialize` cell: engine after engine on the same model.
    Each engine trains one step; its result must equal a fresh engine's on the weights it got."""
    torch.manual_seed(seed)
    model = Net("plain")
    out = []
    for stage in stages:
        config = {"train_batch_size": batches[0][0].shape[0], "gradient_clipping": 1.0, "optimizer": ADAM,
                  "zero_optimization": {"stage": stage, "reduce_bucket_size": 200,
                                        "stage3_param_persistence_threshold": 0}}
        engine, _, _, _ = ds_lab.initialize(model=model, config=config)
        before = full_weights(engine)
        losses = train(engine, batches)
        out.append(dict(stage=stage, before=before, losses=losses, weights=full_weights(engine)))
        # what the next engine starts from: the model as this one leaves it, whole and plain
        previous = getattr(model, "_ds_lab_mode", None)
        if previous is not None and hasattr(previous, "detach"):
            previous.detach()
        out[-1]["after_detach"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out[-1]["grads_after_detach"] = [p.grad is not None for p in model.parameters()]
    return out


def external_parameter_worker(config, batches):
    """`register_external_parameter(module, param)` before initialize: stage 3 gathers the
    parameter around that module from the first forward on."""
    from ds_lab.zero import register_external_parameter
    torch.manual_seed(0)
    model = Net("tied_head")
    register_external_parameter(model, model.emb.weight)
    engine, _, _, _ = ds_lab.initialize(model=model, config={**config, "optimizer": ADAM})
    unit = engine.zero_optimizer.unit_of[model.emb.weight]
    registered = unit in engine.zero_optimizer.needs.get(model, [])
    return dict(registered=registered, losses=train(engine, batches), weights=full_weights(engine))


def collectives_worker(config, batches, kind="plain", seed=0):
    """Collectives a ZeRO-3 step issues, by tag, counted over each step."""
    torch.manual_seed(seed)
    config = {**config, "optimizer": ADAM}
    engine, _, _, _ = ds_lab.initialize(model=Net(kind), config=config)
    counts = []
    for batch in batches:
        comm.reset_log()
        train(engine, [batch])
        counts.append({tag: sum(1 for r in comm.get_log() if r.tag == tag)
                       for tag in ("grad_reduce_scatter", "param_allgather")})
    return dict(counts=counts, weights=full_weights(engine),
                memory=engine.memory_report(), num_parameters=engine.num_parameters())
