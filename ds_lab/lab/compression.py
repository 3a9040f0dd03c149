"""Communication compression in the course (chapter 05): one training run per optimizer on real ranks,
what each step sent, and the volume arithmetic of 1-bit Adam's two stages.

    results = ds_lab.launch(compression_train, 2, optimizer_section, batches, MODEL)
    steps = step_bytes(results[0])             # per step: {"grad_allreduce": wire bytes, ...}

The optimizers compared (config types): "Adam" (the fp32 all-reduce every step), "OneBitAdam"
(warmup, then 1-bit momentum with error feedback), "OneBitAdam" with `error_feedback: false`,
"SignAdam" (the article's §4.4 rule) and "SignSGD" (majority vote).
"""
from __future__ import annotations

import torch

import ds_lab
from ds_lab import comm
from ds_lab.comm.compressed import compressed_allreduce, padded_length, wire_bytes
from ds_lab.lab.workers import rows_of
from ds_lab.models import GPT, GPTConfig

TAGS = ("grad_allreduce", "compressed_allreduce", "sign_vote")


def compressed_rounds(n: int, rounds: int, error_feedback: bool = True, seed: int = 0) -> dict:
    """Compress-average the *same* tensor `rounds` times: each rank holds x_r (a shared signal plus
    its own noise). Returns the true average, each round's compressed result and the log of the
    first round. With error feedback, what one round gets wrong the next corrects, so the mean of
    the results converges to the true average; without it, the same error repeats every round."""
    rank, world = comm.get_rank(), comm.get_world_size()
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, generator=g)
    mine = signal + torch.randn(world, n, generator=g)[rank]  # every rank draws all the noise, keeps its own
    truth = mine.clone()
    comm.all_reduce(truth)
    truth /= world
    worker_error = torch.zeros(padded_length(n, world))
    server_error = torch.zeros(padded_length(n, world) // world)
    results, mark, first = [], comm.record_count(), None
    for r in range(rounds):
        if not error_feedback:
            worker_error.zero_(), server_error.zero_()
        results.append(compressed_allreduce(mine, worker_error, server_error))
        if first is None:
            first = [(rec.op, rec.bytes, rec.wire_bytes) for rec in comm.get_log(since=mark)
                     if rec.tag == "compressed_allreduce"]
    return dict(truth=truth, results=results, first_round=first)


def running_mean_error(result: dict) -> list:
    """|mean of the first t results - true average| / |true average| (RMS), for t = 1 .. rounds."""
    total, out = torch.zeros_like(result["truth"]), []
    for t, x in enumerate(result["results"], 1):
        total += x
        out.append((torch.linalg.vector_norm(total / t - result["truth"]) /
                    torch.linalg.vector_norm(result["truth"])).item())
    return out


def zero_gradient_masks(gpt, batch, relative: float = 1e-7) -> dict:
    """{parameter name: 0/1 mask} for the tensors having entries whose gradient is zero, or zero
    but for rounding (|g| <= relative * max |g| of the tensor), measured on `batch`. In GPT-2 these
    are the last position's embedding (no token after it has a label) and the attention's key
    bias (softmax ignores a constant added to every score): a sign bit cannot say 0, so 1-bit
    compression would give them momentum they must not have; DeepSpeed's remedy is `exp_avg_mask`."""
    gpt.zero_grad()
    gpt(input_ids=batch, labels=batch).loss.backward()
    masks = {}
    for name, p in gpt.named_parameters():
        mask = (p.grad.abs() > relative * p.grad.abs().max()).float()
        if not bool(mask.all()):
            masks[name] = mask
    gpt.zero_grad(set_to_none=True)
    return masks


def param_groups_with_masks(gpt, masks: dict) -> list:
    """One optimizer param group per masked tensor (with its `exp_avg_mask`), one for the rest."""
    named = dict(gpt.named_parameters())
    rest = [p for name, p in named.items() if name not in masks]
    return [{"params": [named[name]], "exp_avg_mask": mask} for name, mask in masks.items()] + [{"params": rest}]


def compression_train(optimizer: dict, batches, model: dict, seed: int = 0, clip: float = 0.0,
                      masks: bool = False, extra: dict | None = None) -> dict:
    """Train a GPT on `batches` (global batches; this rank takes its rows) with the optimizer
    section `optimizer`; return the rank's losses and, per step, the bytes of each tag it sent.
    masks: give 1-bit Adam `exp_avg_mask`s for the entries the data never moves (measured on the
    first batch, `zero_gradient_masks`). extra: more config keys (e.g. "hierarchical_allreduce")."""
    rank, world = comm.get_rank(), comm.get_world_size()
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**model))
    masked = zero_gradient_masks(gpt, batches[0]) if masks else {}
    engine, *_ = ds_lab.initialize(model=gpt, model_parameters=param_groups_with_masks(gpt, masked), config={
        "train_batch_size": batches[0].shape[0], "gradient_clipping": clip, "optimizer": optimizer, **(extra or {})})
    losses, wire, messages, compressing, links = [], [], [], [], []
    for batch in batches:
        compressing.append(bool(getattr(engine.optimizer, "compressing", lambda: False)()))
        mark = comm.record_count()
        x = rows_of(batch, rank, world)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        records = [r for r in comm.get_log(since=mark) if r.tag in TAGS]
        wire.append({tag: sum(r.wire_bytes for r in records if r.tag == tag) for tag in TAGS})
        messages.append({tag: sum(r.bytes for r in records if r.tag == tag) for tag in TAGS})
        links.append({link: sum(r.wire_bytes for r in records if r.link == link) for link in ("intra", "inter", "")})
        losses.append(loss.item())
    largest = {name: p.detach().abs().max().item() for name, p in engine.module.named_parameters()}
    return dict(losses=losses, wire=wire, messages=messages, compressing=compressing, largest=largest, links=links,
                masked={name: int((m == 0).sum()) for name, m in masked.items()},
                sizes=[p.numel() for p in engine.module.parameters()])


def global_curve(results) -> list:
    """The global batch's loss per step: the mean of the ranks' equal slices."""
    return [sum(r["losses"][t] for r in results) / len(results) for t in range(len(results[0]["losses"]))]


def step_wire(result) -> list:
    """Bytes this rank sent per step, all tags together."""
    return [sum(step.values()) for step in result["wire"]]


def onebit_step_ratio(sizes, world: int) -> float:
    """Wire bytes of one compressed step over one fp32 gradient all-reduce step, for tensors of
    `sizes` elements (`compressed.wire_bytes` per tensor against the ring's 2(N-1)/N * 4n)."""
    return sum(wire_bytes(n, world) for n in sizes) / sum(2 * (world - 1) / world * 4 * n for n in sizes)


def whole_run_reduction(warmup_fraction: float, compressed_ratio: float) -> float:
    """How many times less a whole run sends than all-fp32: 1 / (w + (1 - w) * r)."""
    return 1 / (warmup_fraction + (1 - warmup_fraction) * compressed_ratio)


def draw_curves(curves: dict, title: str = "", figsize=(8, 4), freeze_step=None):
    """Loss against step, one line per optimizer; a dotted line where 1-bit Adam's compression starts."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=label)
    if freeze_step is not None:
        ax.axvline(freeze_step, color="grey", linestyle=":", label=f"compression starts (step {freeze_step})")
    ax.set_xlabel("step"), ax.set_ylabel("training loss (global batch)"), ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
