"""Functions the chapters (and tests) run on every rank with `ds_lab.launch(fn, world_size, ...)`.

They live here, importable, so that a spawned rank (NCCL) can import them and two chapters never
paste the same loop. Each takes what it needs as arguments (model shape, config, batches) and
returns plain data: what the rank held, what it sent, its losses.

    results = ds_lab.launch(zero_train, 4, config, batches, MODEL)        # one dict per rank
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch

import ds_lab
from ds_lab import comm
from ds_lab.lab.measure import ConstructionProbe, WholeParameterProbe, census_since, tensor_census
from ds_lab.models import GPT, GPTConfig
from ds_lab.zero import Init

COMM_TAGS = ("grad_allreduce", "grad_reduce_scatter", "param_allgather")  # the traffic of a step
MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rows_of(batch, rank, world_size, micro=0, accumulation=1):
    """Micro-batch `micro` of rank `rank`: the N x A equal micro-batches tile the global batch."""
    size = batch.shape[0] // (world_size * accumulation)
    start = (rank * accumulation + micro) * size
    return batch[start:start + size]


def global_losses(results) -> list:
    """Each step's loss over the whole global batch: the mean of the ranks' equal-sized slices."""
    return [statistics.fmean(r["losses"][step] for r in results) for step in range(len(results[0]["losses"]))]


def _step_traffic(records) -> dict:
    """Per collective tag: calls, message bytes (r.bytes) and the ring-model bytes this rank sent
    (wire: message bytes x the ring factor, see comm/trace.py)."""
    return dict(calls={tag: sum(r.tag == tag for r in records) for tag in COMM_TAGS},
                messages={tag: [r.bytes for r in records if r.tag == tag] for tag in COMM_TAGS},
                wire={tag: sum(r.wire_bytes for r in records if r.tag == tag) for tag in COMM_TAGS})


def data_parallel_train(batches, model, global_batch, accumulation=1, zero=None, lr=1e-3):
    """Data parallelism through the engine (ZeRO stage 0): one optimizer step per global batch.

    Besides losses and traffic it records when backward produced its last gradient, so the
    caller can count the all-reduces already on the wire by then (`sent_early`): our own hooks,
    registered before the engine's, run first, so a gradient is timed before its bucket can leave."""
    rank, world_size = comm.get_rank(), comm.get_world_size()
    inherited = tensor_census(MODEL_DTYPES)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**model))
    grad_times = []
    for p in gpt.parameters():
        p.register_post_accumulate_grad_hook(lambda p: grad_times.append(time.time()))
    config = {"train_batch_size": global_batch, "gradient_accumulation_steps": accumulation,
              "optimizer": {"type": "AdamW", "params": {"lr": lr}},
              "zero_optimization": {"stage": 0, **(zero or {})}}
    engine, _, _, _ = ds_lab.initialize(model=gpt, config=config)
    out = dict(losses=[], step_seconds=[], collectives=[], bytes=[], messages=[], wire_bytes=[],
               sent_early=[], lead_ms=[])
    all_grad_records = []
    for batch in batches:
        mark = comm.record_count()
        start = time.perf_counter()
        micro_losses = []
        for micro in range(accumulation):
            grad_times.clear()
            x = rows_of(batch, rank, world_size, micro, accumulation)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.item())
        out["step_seconds"].append(time.perf_counter() - start)
        grads = [r for r in comm.get_log(since=mark) if r.tag == "grad_allreduce"]
        all_grad_records += grads
        last_gradient = max(grad_times)
        out["losses"].append(sum(micro_losses) / accumulation)
        out["collectives"].append(len(grads))
        out["bytes"].append(sum(r.bytes for r in grads))
        out["messages"].append([r.bytes for r in grads])
        out["wire_bytes"].append(sum(r.wire_bytes for r in grads))
        out["sent_early"].append(sum(r.start < last_gradient for r in grads))
        out["lead_ms"].append(1e3 * (last_gradient - min(r.start for r in grads)) if grads else 0.0)
    del loss, x  # the census below counts what the engine keeps, not this loop's last tensors
    out.update(micro_batch=engine.train_micro_batch_size_per_gpu(), memory=engine.memory_report(),
               census=census_since(inherited, MODEL_DTYPES), num_parameters=engine.num_parameters(),
               summary=comm.summarize(all_grad_records))
    return out


def build_gpt(model, use_init=False):
    """The GPT built whole, as usual, or inside zero.Init (every module partitioned as it is built).
    Returns (model, what construction measured: see ConstructionProbe). Only rank 0 of an Init
    build measures (sampling the census at every parameter takes seconds); otherwise None."""
    torch.manual_seed(0)  # the same seed on every rank (the engine broadcasts rank 0's weights anyway)
    if not use_init:
        return GPT(GPTConfig(**model)), None
    probe = ConstructionProbe() if comm.get_rank() == 0 else contextlib.nullcontext()
    with probe, Init():
        gpt = GPT(GPTConfig(**model))
    if comm.get_rank() != 0:
        return gpt, None
    built = dict(peak_bytes=probe.peak, kept_bytes=probe.after, samples=probe.samples,
                 param_elements=sum(p.numel() for p in gpt.parameters()),
                 real_elements=sum(math.prod(getattr(p, "ds_shape", p.shape)) for p in gpt.parameters()),
                 example=(tuple(gpt.lm_head.weight.shape), getattr(gpt.lm_head.weight, "ds_shape", None)))
    return gpt, built


def zero_train(config, batches, model, use_init=False, article_call=False):
    """One optimizer step per global batch with `config` (any ZeRO stage, no accumulation).

    Returns, per rank: losses and step times; per step the collectives by tag (calls, message
    bytes, ring-model bytes sent), every other collective as (op, tag, message bytes) (`others`)
    and the message bytes of all of them (`all_bytes`); after the last step the ledger (`memory`)
    and the census of every tensor the rank created and still holds (`census`, by dtype);
    `peak_whole`, the most bytes of whole
    parameters our own hooks saw at once; `gathered_by_first_module`, per step, the all-gathered
    bytes requested before the first module had run (a prefetch shows here); `built`, what
    constructing the model measured (zero.Init only)."""
    rank, world_size = comm.get_rank(), comm.get_world_size()
    inherited = tensor_census(MODEL_DTYPES)
    gpt, built = build_gpt(model, use_init)
    engine, _, _, _ = ds_lab.initialize(model=gpt, config=config)
    probe = WholeParameterProbe(engine.module)
    out = dict(losses=[], step_seconds=[], calls=[], messages=[], wire=[], gathered_by_first_module=[],
               others=[], all_bytes=[], built=built)
    for batch in batches:
        mark = comm.record_count()
        start = time.perf_counter()
        x = rows_of(batch, rank, world_size)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        out["step_seconds"].append(time.perf_counter() - start)
        out["losses"].append(loss.float().item())
        every = comm.get_log(since=mark)  # every collective of the step, tagged or not
        records = [r for r in every if r.tag in COMM_TAGS]
        out["others"].append([(r.op, r.tag, r.bytes) for r in every if r.tag not in COMM_TAGS])
        out["all_bytes"].append(sum(r.bytes for r in every))
        for key, value in _step_traffic(records).items():
            out[key].append(value)
        # all-gathered bytes requested before the first module of this forward had finished
        out["gathered_by_first_module"].append(sum(r.bytes for r in records if r.tag == "param_allgather"
                                                   and r.start < probe.first_module_done[-1]))
    del loss, x  # the census below counts what the engine keeps, not this loop's last tensors
    probe.remove()
    out.update(memory=engine.memory_report(), census=census_since(inherited, MODEL_DTYPES),
               num_parameters=engine.num_parameters(), peak_whole=probe.peak,
               peak_live=getattr(engine.zero_optimizer, "peak_live_bytes", None))  # the engine's own counter, for show
    if article_call:  # the article's §3.1 line, verbatim, after initialize
        try:
            engine.zero.Init(module=gpt)
        except Exception as err:
            out["article_call"] = f"{type(err).__name__}: {err}"
    return out
