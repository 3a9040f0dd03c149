"""One named grid of ranks, from which every process group is derived.

    grid = torch.arange(world_size).view(pipe, data, model)

A rank's coordinate on each axis is its position in that grid. The ranks that share every
coordinate except one axis form that axis's group: the *data* groups all-reduce gradients, the
*model* groups run tensor parallel, the *pipe* groups pass activations. The model axis is the
fastest-varying, so tensor-parallel partners are neighbouring ranks (on one node, over the
fastest links), as in Megatron-LM and DeepSpeed's PipeModelDataParallelTopology.
"""
from __future__ import annotations

import weakref

import torch

from ds_lab import comm

AXES = ("pipe", "data", "model")


class ProcessTopology:
    def __init__(self, pipe: int = 1, data: int = 1, model: int = 1):
        self.dims = {"pipe": pipe, "data": data, "model": model}
        self.grid = torch.arange(pipe * data * model).view(pipe, data, model)

    @property
    def world_size(self) -> int:
        return self.grid.numel()

    def get_dim(self, axis: str) -> int:
        return self.dims[axis]

    def get_coord(self, rank: int) -> dict:
        index = (self.grid == rank).nonzero()[0].tolist()
        return dict(zip(AXES, index))

    def get_rank(self, **coord) -> int:
        return int(self.grid[coord.get("pipe", 0), coord.get("data", 0), coord.get("model", 0)])

    def axis_groups(self, axis: str) -> list[list[int]]:
        """Every group along `axis`: fix the other coordinates, vary this one."""
        dim = AXES.index(axis)
        moved = self.grid.movedim(dim, -1).reshape(-1, self.dims[axis])
        return [row.tolist() for row in moved]

    def __repr__(self):
        return f"ProcessTopology(pipe={self.dims['pipe']}, data={self.dims['data']}, model={self.dims['model']})"


class ProcessGroups:
    """The process groups of one topology, for this rank. Every rank must build it (collectively).

    The engine, ZeRO, and tensor/pipeline parallel take every group they use from here.
    `world_group` is the group of the whole grid (None: torch.distributed's default group).
    """

    axes = AXES

    def __init__(self, topology: ProcessTopology):
        if comm.get_world_size() != topology.world_size:
            raise ValueError(f"{topology} needs {topology.world_size} ranks, "
                             f"but the job has {comm.get_world_size()}")
        self.topology = topology
        self.rank = comm.get_rank()
        self.coord = topology.get_coord(self.rank)
        self.groups, self.ranks = {}, {}
        self.world_group, self.world_size = None, topology.world_size
        for axis in AXES:
            for ranks in topology.axis_groups(axis):  # all ranks create all groups, same order
                group = None if len(ranks) == topology.world_size else comm.new_group(ranks)
                if self.rank in ranks:
                    self.groups[axis], self.ranks[axis] = group, ranks
        _built.add(self)

    def group(self, axis: str):
        if self.groups is None:
            raise RuntimeError(f"{self}: its process groups were destroyed (comm.destroy); "
                               f"build a new grid after comm.init_distributed()")
        return self.groups[axis]

    def release(self) -> None:
        """Let go of the process groups (comm.destroy calls this): the backend can then end them."""
        self.groups = None

    def size(self, axis: str) -> int:
        return len(self.ranks[axis])

    def rank_in(self, axis: str) -> int:
        return self.coord[axis]

    @property
    def mp_rank(self) -> int:
        """This rank's place in its model slice (pipe x model): DeepSpeed's `mp_rank_XX` in file names."""
        return self.rank_in("pipe") * self.size("model") + self.rank_in("model")

    @property
    def mp_world_size(self) -> int:
        return self.size("pipe") * self.size("model")

    def __repr__(self):
        return f"ProcessGroups({self.topology}, rank {self.rank} at {self.coord})"

    # the names DeepSpeed's `mpu` object uses
    def get_data_parallel_group(self):
        return self.group("data")

    def get_data_parallel_world_size(self):
        return self.size("data")

    def get_data_parallel_rank(self):
        return self.rank_in("data")

    def get_model_parallel_group(self):
        return self.group("model")

    def get_model_parallel_world_size(self):
        return self.size("model")

    def get_model_parallel_rank(self):
        return self.rank_in("model")

    def get_pipe_parallel_group(self):
        return self.group("pipe")

    def get_pipe_parallel_world_size(self):
        return self.size("pipe")

    def get_pipe_parallel_rank(self):
        return self.rank_in("pipe")


class MpuGroups(ProcessGroups):
    """The same interface over a Megatron-style `mpu` object: every group it defines is used
    (`get_{data,model,pipe}_parallel_{group,rank,world_size}`); an axis it does not define has size 1.
    The grid must cover the job: data x model x pipe == world size."""

    def __init__(self, mpu):
        self.mpu, self.groups, self.ranks, self.coord = mpu, {}, {}, {}
        self.world_group, self.world_size, self.rank = None, comm.get_world_size(), comm.get_rank()
        for axis in AXES:
            getter = getattr(mpu, f"get_{axis}_parallel_group", None)
            if getter is None:
                self.groups[axis], self.coord[axis], sizes = _SINGLE, 0, 1
            else:
                self.groups[axis] = getter()
                sizes = getattr(mpu, f"get_{axis}_parallel_world_size")()
                self.coord[axis] = getattr(mpu, f"get_{axis}_parallel_rank")()
            self.ranks[axis] = list(range(sizes))  # only the count is used
        product = self.size("pipe") * self.size("data") * self.size("model")
        if product != self.world_size:
            raise ValueError(f"mpu: pipe {self.size('pipe')} x data {self.size('data')} x model "
                             f"{self.size('model')} = {product}, but the job has {self.world_size} ranks; "
                             f"an mpu must describe every rank")
        self.topology = ProcessTopology(self.size("pipe"), self.size("data"), self.size("model"))
        _built.add(self)

    def group(self, axis: str):
        group = super().group(axis)
        if group is _SINGLE:
            raise ValueError(f"the mpu defines no {axis}-parallel group; its size is 1")
        return group


_SINGLE = object()  # an axis of size 1 that the mpu does not define


_current = None  # the grid set up for this process (initialize_model_parallel), if any
_built: "weakref.WeakSet" = weakref.WeakSet()  # every grid built in this process and still alive


def _release_all() -> None:
    """comm.destroy's hook: no grid keeps a destroyed process group (and its threads) alive."""
    global _current
    _current = None
    for groups in list(_built):
        groups.release()


comm.at_destroy(_release_all)


def set_grid(groups) -> None:
    """Make `groups` (ProcessGroups or MpuGroups) this process's grid: tensor-parallel layers take
    their model group from it, and `ds_lab.initialize` uses it when no mpu is given."""
    global _current
    _current = groups


def get_grid():
    """This process's grid, or None when none was set up (then layers use the whole world)."""
    return _current
