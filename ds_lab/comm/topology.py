"""One named grid of ranks, from which every process group is derived.

    grid = torch.arange(world_size).view(pipe, data, model)

A rank's coordinate on each axis is its position in that grid. The ranks that share every
coordinate except one axis form that axis's group: the *data* groups all-reduce gradients, the
*model* groups run tensor parallel, the *pipe* groups pass activations. The model axis is the
fastest-varying, so tensor-parallel partners are neighbouring ranks (on one node, over the
fastest links), as in Megatron-LM and DeepSpeed's PipeModelDataParallelTopology.
"""
from __future__ import annotations

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
    """The process groups of one topology, for this rank. Every rank must build it (collectively)."""

    def __init__(self, topology: ProcessTopology):
        if comm.get_world_size() != topology.world_size:
            raise ValueError(f"{topology} needs {topology.world_size} ranks, "
                             f"but the job has {comm.get_world_size()}")
        self.topology = topology
        self.rank = comm.get_rank()
        self.coord = topology.get_coord(self.rank)
        self.groups, self.ranks = {}, {}
        for axis in AXES:
            for ranks in topology.axis_groups(axis):  # all ranks create all groups, same order
                group = None if len(ranks) == topology.world_size else comm.new_group(ranks)
                if self.rank in ranks:
                    self.groups[axis], self.ranks[axis] = group, ranks

    def group(self, axis: str):
        return self.groups[axis]

    def size(self, axis: str) -> int:
        return len(self.ranks[axis])

    def rank_in(self, axis: str) -> int:
        return self.coord[axis]

    # the names DeepSpeed's `mpu` object uses
    def get_data_parallel_group(self):
        return self.groups["data"]

    def get_data_parallel_world_size(self):
        return self.size("data")

    def get_data_parallel_rank(self):
        return self.rank_in("data")

    def get_model_parallel_group(self):
        return self.groups["model"]

    def get_model_parallel_world_size(self):
        return self.size("model")

    def get_model_parallel_rank(self):
        return self.rank_in("model")

