"""Which ranks form this process's tensor-parallel group: the model axis of the one grid.

    from ds_lab.parallel import initialize_model_parallel
    initialize_model_parallel(tensor_model_parallel_size=2)    # world 4 -> pipe 1 x data 2 x model 2
    engine, *_ = ds_lab.initialize(model=GPTTP(config), ...)   # initialize() takes this grid

The grid is ProcessTopology(pipe=P, data=world // (P*T), model=T) (comm/topology.py): the model axis
varies fastest, so tensor partners are neighbouring ranks, rank = (p * D + d) * T + t. Tensor
partners hold different shards of the same layers and must see the *same* micro-batch.

With no grid set up (a plain `launch`), Megatron-style layers still work: the whole world is the
tensor group, as if `initialize_model_parallel(world_size)` had been called.
"""
from __future__ import annotations

from ds_lab import comm
from ds_lab.comm.topology import ProcessGroups, ProcessTopology, get_grid, set_grid


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1):
    """Build the pipe x data x model grid for this job and make it this process's grid.

    Every rank must call it (it creates process groups, a collective act). Returns the ProcessGroups.
    """
    world, t, p = comm.get_world_size(), tensor_model_parallel_size, pipeline_model_parallel_size
    if t < 1 or p < 1 or world % (t * p) != 0:
        raise ValueError(f"world size {world} is not divisible by tensor_model_parallel_size {t} x "
                         f"pipeline_model_parallel_size {p} = {t * p}; choose sizes whose product divides it")
    groups = ProcessGroups(ProcessTopology(pipe=p, data=world // (t * p), model=t))
    set_grid(groups)
    return groups


def destroy_model_parallel() -> None:
    """Forget the grid: layers built afterwards use the whole world again."""
    set_grid(None)


def model_parallel_is_initialized() -> bool:
    return get_grid() is not None


def _grid():
    grid = get_grid()
    # a grid left over from another world (a stale set-up) does not describe this job
    return grid if grid is not None and grid.world_size == comm.get_world_size() else None


def model_parallel_group():
    """The tensor-parallel process group (None: torch.distributed's default group, the whole world)."""
    grid = _grid()
    return None if grid is None else grid.group("model")


def model_parallel_world_size() -> int:
    grid = _grid()
    return comm.get_world_size() if grid is None else grid.size("model")


def model_parallel_rank() -> int:
    grid = _grid()
    return comm.get_rank() if grid is None else grid.rank_in("model")


def data_parallel_rank() -> int:
    """This rank's data-parallel index: tensor partners (same index) must see the same data."""
    grid = _grid()
    return 0 if grid is None else grid.rank_in("data")


def data_parallel_world_size() -> int:
    grid = _grid()
    return 1 if grid is None else grid.size("data")
