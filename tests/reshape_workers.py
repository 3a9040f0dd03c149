"""Rank functions for tests/test_checkpoint_reshape.py: save at one (pipe, data, model) shape, load at another."""
from __future__ import annotations

import torch

import ds_lab
from ds_lab import comm, parallel
from ds_lab.models import GPT, GPTConfig
from ds_lab.models.gpt_tp import GPTTP
from ds_lab.parallel import gather_parameter
from tests.tp_workers import TP_MODEL  # n_head 4, n_embd 36: divisible by 2 and 4; vocabulary 257 padded
from tests.workers import rank_slice


def build(tensor_size: int, seed: int):
    """tensor_size 0: the plain GPT; else the tensor-parallel GPT on a grid with that model axis."""
    if tensor_size:
        parallel.initialize_model_parallel(tensor_model_parallel_size=tensor_size)
        parallel.model_parallel_manual_seed(seed)
        return GPTTP(GPTConfig(**TP_MODEL))
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TP_MODEL))


def engine_for(tensor_size, stage, seed, lr=0.05):
    config = {"train_batch_size": 8, "zero_optimization": {"stage": stage}}
    optimizer = lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)  # noqa: E731
    return ds_lab.initialize(model=build(tensor_size, seed), config=config, optimizer=optimizer)[0]


def whole_weights(engine) -> dict:
    """The whole fp32 model by state_dict key: ZeRO-3 shards gathered over data, tensor shards over model."""
    zero = engine.zero_optimizer
    local = (zero.full_state_dict() if zero is not None and zero.stage == 3 else
             {k: v.detach().float() for k, v in engine.module.state_dict().items()})
    params = engine.module.state_dict(keep_vars=True)
    return {k: gather_parameter(params[k], v).clone() for k, v in local.items()}


def batch_loss(engine, batch) -> float:
    """The global batch's loss, forward only: this data rank's rows, mean over data ranks."""
    grid = engine.grid
    x = rank_slice(batch, grid.rank_in("data"), grid.size("data"), 0, 1)
    with torch.no_grad():
        loss = engine(input_ids=x, labels=x).loss.detach().reshape(1).clone()
    comm.all_reduce(loss, group=grid.group("data"))
    return loss.item() / grid.size("data")


def _global(engine, loss: float) -> float:
    t = torch.tensor([loss])
    comm.all_reduce(t, group=engine.grid.group("data"))
    return t.item() / engine.grid.size("data")


def resume_worker(tensor_size, stage, batches, folder):
    """Another shape, optimizer state included (SGD momentum, lr 0.05): continue on `batches`."""
    engine = engine_for(tensor_size, stage, seed=7)
    engine.load_checkpoint(folder)
    losses = [_global(engine, loss) for loss in train(engine, batches)]
    out = dict(losses=losses, weights=whole_weights(engine), steps=engine.global_steps)
    parallel.destroy_model_parallel()
    return out


def train(engine, batches) -> list:
    grid, losses = engine.grid, []
    for batch in batches:
        x = rank_slice(batch, grid.rank_in("data"), grid.size("data"), 0, 1)  # tensor partners: same rows
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def save_worker(tensor_size, stage, batches, probe, folder, then=()):
    """Train at this shape, save, and report the whole weights and the loss on `probe`; then train
    on `then` (the continuation at the saved shape) and report its losses and weights."""
    engine = engine_for(tensor_size, stage, seed=0)
    train(engine, batches)
    engine.save_checkpoint(folder)
    out = dict(weights=whole_weights(engine), loss=batch_loss(engine, probe), steps=engine.global_steps)
    out["continued"] = [_global(engine, loss) for loss in train(engine, then)]
    out["continued_weights"] = whole_weights(engine)
    parallel.destroy_model_parallel()
    return out


def load_worker(tensor_size, stage, probe, folder, try_optimizer=True):
    """A differently seeded model at another shape: (try_optimizer) the optimizer state refused, then
    the weights loaded; the whole weights, the probe loss, and one lr=0 step's loss (the weights must
    stay the loaded ones)."""
    engine = engine_for(tensor_size, stage, seed=7, lr=0.0)
    refusal = None
    if try_optimizer:
        try:
            engine.load_checkpoint(folder)
        except Exception as err:
            refusal = str(err)
    engine.load_checkpoint(folder, load_optimizer_states=False)
    out = dict(refusal=refusal, weights=whole_weights(engine), loss=batch_loss(engine, probe),
               steps=engine.global_steps)
    out["step_loss"] = train(engine, [probe])[0]
    out["after_step"] = whole_weights(engine)
    parallel.destroy_model_parallel()
    return out


# ---- AutoTP (Hugging Face GPT-2, Conv1D) ------------------------------------------------------------

def autotp_save_worker(folder, steps=2):
    from tests import autotp_workers as aw
    model = aw.build("gpt2")
    config = {"train_batch_size": aw.BATCH, "tensor_parallel": {"autotp_size": 2},
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    engine, *_ = ds_lab.initialize(model=model, config=config)
    for batch in aw.batches(steps):
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(folder)
    whole = {k: gather_parameter(v).clone() for k, v in model.state_dict(keep_vars=True).items()}
    parallel.destroy_model_parallel()
    return whole


# ---- pipeline (tests/pipe_workers.py's tiny GPT as layers) --------------------------------------------

def _pipe_model(stages, tensor_size, tensor_layers):
    """tensor_layers: the stages hold ColumnParallel/RowParallel MLPs, split over `tensor_size` ranks."""
    from tests import pipe_workers as pw
    if tensor_size > 1 or stages > 1:
        parallel.initialize_model_parallel(tensor_size, stages)
    return pw.pipe_model(stages, tensor_parallel=tensor_layers)


def _pipe_engine(model, dp_size, zero):
    """Micro-batch 2, 4 / dp micro-batches: the global batch (8 rows) is the same at every shape."""
    from tests import pipe_workers as pw
    cfg = pw.config_for(dict(micro=2, m=4 // dp_size, schedule="1f1b", zero=zero))
    return ds_lab.initialize(model=model, config=cfg, optimizer=pw.optimizer_for("sgd"))[0]


def _pipe_batch(engine, rows):
    from tests import pipe_workers as pw
    return pw.micro_batches(rows, engine.gradient_accumulation_steps(), engine.dp_world_size, engine.dp_rank, 2)


def pipe_save_worker(folder, stages, tensor_size, data, zero=0):
    """One batch at this shape, save; then the continuation on data[1:] (its losses)."""
    model = _pipe_model(stages, tensor_size, tensor_size > 1)
    engine = _pipe_engine(model, comm.get_world_size() // (stages * max(tensor_size, 1)), zero)
    engine.train_batch(_pipe_batch(engine, data[0]))
    engine.save_checkpoint(folder)
    whole = {k: gather_parameter(v).clone() for k, v in model.state_dict(keep_vars=True).items()}
    continued = [engine.train_batch(_pipe_batch(engine, rows)).item() for rows in data[1:]]
    parallel.destroy_model_parallel()
    return dict(state=whole, stage=engine.stage_id, model_rank=engine.grid.rank_in("model"), continued=continued)


def pipe_resume_worker(folder, stages, data, zero):
    """Another pipe/data shape loads everything (ZeRO-1 optimizer state included) and continues."""
    model = _pipe_model(stages, 1, False)
    engine = _pipe_engine(model, comm.get_world_size() // stages, zero)
    engine.load_checkpoint(folder)
    losses = [engine.train_batch(_pipe_batch(engine, rows)).item() for rows in data]
    parallel.destroy_model_parallel()
    return losses


def pipe_load_worker(folder, stages, tensor_size, tensor_layers, state=None):
    """A pipeline engine at another shape loads the weights; or (state given) the model takes a
    consolidated state_dict with strict=True. Returns this rank's whole tensors."""
    model = _pipe_model(stages, tensor_size, tensor_layers)
    if state is not None:
        model.load_state_dict(state, strict=True)
    else:
        engine = _pipe_engine(model, comm.get_world_size() // stages, 0)
        engine.load_checkpoint(folder, load_optimizer_states=False)
    whole = {k: gather_parameter(v).clone() for k, v in model.state_dict(keep_vars=True).items()}
    parallel.destroy_model_parallel()
    return whole
