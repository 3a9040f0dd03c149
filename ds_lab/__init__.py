"""ds_lab: DeepSpeed's ideas, re-implemented to be read, run and measured.

    import ds_lab as deepspeed
    engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config=config)

`initialize` takes DeepSpeed's arguments and returns DeepSpeed's 4-tuple. `launch(fn, world_size)`
runs `fn` on real processes from a notebook cell or a script.
"""
from __future__ import annotations

import os

from ds_lab import comm
from ds_lab.arguments import add_config_arguments, config_from_args
from ds_lab.comm import init_distributed
from ds_lab.config import ConfigError, DeepSpeedConfig, check_client_optimizer, check_client_scheduler
from ds_lab.launch import RankError, launch
from ds_lab.runtime import utils as _runtime_utils  # noqa: F401  deepspeed.runtime.utils after `import deepspeed`

__version__ = "0.1.0"

__all__ = ["initialize", "tp_model_init", "init_distributed", "launch", "comm", "ConfigError", "RankError",
           "DeepSpeedConfig", "DeepSpeedEngine", "add_config_arguments", "__version__"]


TORCH_DISTRIBUTED_DEFAULT_PORT = 29500  # DeepSpeed's constant (deepspeed/constants.py)


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, distributed_port=TORCH_DISTRIBUTED_DEFAULT_PORT, mpu=None,
               dist_init_required=None, collate_fn=None, config=None, mesh_param=None, config_params=None):
    """DeepSpeed's `deepspeed.initialize`: returns (engine, optimizer, training_dataloader, lr_scheduler).

    The signature and positional order are DeepSpeed 0.19.8's. Works inside a `ds_lab.launch`ed rank,
    under torchrun, and in a lone process (which becomes a world of size 1).
    The config comes from `config` (or the legacy `config_params`) or `args.deepspeed_config` (or the
    deprecated `args.deepscale_config`), never two of them (`ds_lab.arguments.config_from_args`).
    `distributed_port`: used only when ds_lab itself initialises torch.distributed from an environment
    that names the ranks (RANK set) but no MASTER_PORT; it becomes MASTER_PORT, as in DeepSpeed.
    `mesh_param`: DeepSpeed's (data parallel, sequence parallel) mesh; ds_lab has no sequence
    parallelism, so anything but None is refused.
    """
    from ds_lab.comm.topology import set_grid
    from ds_lab.modes import check_zero_optimizer, mode_builder
    from ds_lab.parallel.autotp import apply_autotp
    from ds_lab.runtime.engine import DeepSpeedEngine

    if model is None:
        raise ValueError("initialize() needs model=")
    if mesh_param is not None:
        raise ConfigError(f"initialize(mesh_param={mesh_param!r}): DeepSpeed's (data_parallel, sequence_parallel) "
                          "mesh needs sequence parallelism, which ds_lab does not have; pass mesh_param=None")
    raw = config_from_args(args, config, config_params)
    if dist_init_required is not False:
        if "RANK" in os.environ and "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(distributed_port)
        init_distributed()
    pipeline = _pipeline_module(model)
    grid = _grid_for(model, pipeline, mpu, raw)
    # the batch rule is micro x accumulation x data-parallel degree (tensor and pipe ranks share data)
    ds_config = DeepSpeedConfig.from_any(raw, world_size=grid.size("data"))
    if ds_config.tensor_parallel.autotp_size > 1:  # shard before the engine sees the parameters
        set_grid(grid)
        apply_autotp(model, ds_config.tensor_parallel.autotp_size)
    check_client_optimizer(ds_config, optimizer)  # the client's wins, as in DeepSpeed: said, not silent
    check_client_scheduler(ds_config, lr_scheduler)
    if pipeline is None and "pipeline" in ds_config.raw:
        raise ConfigError("the config has a 'pipeline' section but the model is not a ds_lab.pipe.PipelineModule")
    engine = (pipeline or DeepSpeedEngine)(model, ds_config, grid, mode_builder(ds_config), optimizer=optimizer,
                                           model_parameters=model_parameters, lr_scheduler=lr_scheduler,
                                           training_data=training_data, collate_fn=collate_fn, mpu=mpu)
    check_zero_optimizer(ds_config, engine.optimizer)  # DeepSpeed's untested-optimizer rule, as a warning
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _grid_for(model, pipeline, mpu, raw_config):
    """The one grid (pipe x data x model) every process group comes from, in this order of precedence:
    a PipelineModule's own grid; an mpu's groups; the grid set up before the model was built
    (initialize_model_parallel / tp_model_init); AutoTP's `tensor_parallel.autotp_size`; else every
    rank on the data axis."""
    from ds_lab.comm.topology import MpuGroups, ProcessGroups, ProcessTopology, get_grid
    from ds_lab.parallel.autotp import autotp_size_of
    from ds_lab.parallel.state import initialize_model_parallel

    if pipeline is not None:  # the PipelineModule built its grid (pipe x data x model) to know its stage
        if mpu is not None:
            raise ValueError("a PipelineModule brings its own process grid; do not pass mpu= with it")
        if model.grid is None and model.num_stages > 1:
            raise ValueError("this PipelineModule was built before torch.distributed was initialised, so it "
                             "does not know its stage; call ds_lab.init_distributed() before building it")
        return model.grid or ProcessGroups(ProcessTopology(pipe=1, data=comm.get_world_size()))
    if mpu is not None:
        return MpuGroups(mpu)
    if get_grid() is not None and get_grid().world_size == comm.get_world_size():
        return get_grid()  # set up before the model was built (tensor-parallel layers need it)
    if autotp_size_of(raw_config) > 1:  # AutoTP: T consecutive ranks hold one model
        return initialize_model_parallel(autotp_size_of(raw_config))
    return ProcessGroups(ProcessTopology(data=comm.get_world_size()))


def _pipeline_module(model):
    """PipelineEngine when `model` is a PipelineModule, else None (ds_lab.pipe loads only then)."""
    import sys
    if "ds_lab.pipe" not in sys.modules:
        return None  # nobody imported ds_lab.pipe, so model cannot be a PipelineModule
    from ds_lab.pipe import PipelineEngine, PipelineModule
    return PipelineEngine if isinstance(model, PipelineModule) else None


def tp_model_init(model, tp_size, dtype=None, config=None, **kwargs):
    """DeepSpeed's `deepspeed.tp_model_init`: shard `model` for AutoTP over `tp_size` ranks before
    `initialize` (see `ds_lab/parallel/autotp.py`)."""
    from ds_lab.parallel import tp_model_init as shard
    return shard(model, tp_size, dtype=dtype, config=config, **kwargs)


# submodules a DeepSpeed script reaches as attributes after `import deepspeed`, loaded on first use
_LAZY_MODULES = ("utils", "accelerator", "runtime", "moe", "ops", "optim", "arguments", "checkpointing",
                 "profiling")


def __getattr__(name):
    if name == "DeepSpeedEngine":
        from ds_lab.runtime.engine import DeepSpeedEngine
        return DeepSpeedEngine
    if name == "zero":
        import ds_lab.zero
        return ds_lab.zero
    if name == "pipe":
        import ds_lab.pipe
        return ds_lab.pipe
    if name in _LAZY_MODULES:  # deepspeed.utils, deepspeed.accelerator, deepspeed.runtime.utils, ...
        import importlib
        return importlib.import_module(f"ds_lab.{name}")
    raise AttributeError(f"module 'ds_lab' has no attribute {name!r}")
