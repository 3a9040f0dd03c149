"""PipelineModule: a model written as a list of layers, cut into stages, each stage built only on its ranks.

    layers = [TiedLayerSpec("embed", Embedding, V, H), *[LayerSpec(Block, cfg) for _ in range(L)],
              LayerSpec(LayerNorm, H), TiedLayerSpec("embed", Embedding, V, H, forward_fn=head)]
    model = PipelineModule(layers, num_stages=P, loss_fn=cross_entropy, partition_method="parameters")

The output of layer i is the input of layer i+1, so cutting the list at `parts` (see partition.py)
gives P stages that talk only through one activation per micro-batch: stage s sends its output
to s+1 (forward) and receives the gradient of that output back (backward).

- `LayerSpec(cls, *args, **kw)` defers `cls(*args, **kw)`: a stage builds only its own layers, so
  no rank ever holds the whole model (DeepSpeed's point: the model need not fit in one process).
- `TiedLayerSpec(key, ...)`: the layers sharing `key` share one module per stage (the embedding used
  as the LM head). On different stages they are different tensors kept equal: broadcast from the
  lowest rank at construction, and after each batch's backward their gradients are summed over the
  *tie group* (the stages holding the key, same data/model coordinates), so every copy takes the
  same step:  g_tied = sum over stages s holding it of g_s.
  For the global norm the copy on the lowest stage counts; the others carry `pipe_tied = True`.
- `virtual_stages=v` (ds_lab; DeepSpeed has none): the list is cut into P*v chunks and stage s holds
  chunks s, s+P, s+2P, ... for the interleaved schedule.
- `activation_checkpoint_interval=k`: every k layers form a segment whose activations are recomputed
  in backward (non-reentrant checkpointing, so an embedding of integer ids as first layer works).

Parameter names are DeepSpeed's: layer i's parameters are `"{i}.{name}"`, tied ones
`"tied_modules.{key}.{name}"` — so a stage's state_dict is a subset of the one-stage model's.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ds_lab import comm
from ds_lab.comm.topology import ProcessGroups, ProcessTopology, get_grid
from ds_lab.pipe.partition import partition_layers


class LayerSpec:
    """A layer not yet built: `cls(*args, **kwargs)` runs only on the stage that owns it."""

    def __init__(self, typename, *module_args, **module_kwargs):
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise TypeError(f"LayerSpec needs an nn.Module subclass, got {typename!r}")
        self.typename, self.module_args, self.module_kwargs = typename, module_args, module_kwargs

    def build(self) -> nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self):
        return f"{type(self).__name__}({self.typename.__name__})"


class TiedLayerSpec(LayerSpec):
    """A layer whose module is shared by every spec with the same `key` (built once per stage).
    `forward_fn(module, x)`, if given, replaces `module(x)` (e.g. x @ embedding.weight.T as LM head);
    `tied_weight_attr`: the attribute(s) whose gradients are summed over the tie group."""

    def __init__(self, key, typename, *module_args, forward_fn=None, tied_weight_attr="weight", **module_kwargs):
        super().__init__(typename, *module_args, **module_kwargs)
        self.key, self.forward_fn = key, forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)


def _class_name(layer) -> str:
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    return type(layer).__name__ if isinstance(layer, nn.Module) else getattr(layer, "__name__", type(layer).__name__)


def _count_params(layer) -> int:
    if isinstance(layer, LayerSpec):
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
            layer = layer.build()
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters() if p.requires_grad)
    return 0


class PipelineModule(nn.Module):
    def __init__(self, layers, num_stages=None, topology=None, loss_fn=None, seed_layers=False, base_seed=1234,
                 partition_method="parameters", activation_checkpoint_interval=0, virtual_stages=1):
        super().__init__()
        layers = list(layers)
        if num_stages is None and topology is None:
            raise ValueError("PipelineModule needs num_stages= (or topology=)")
        self.grid = self._grid(num_stages, topology) if comm.is_initialized() else None
        if num_stages is None:
            num_stages = topology.get_dim("pipe")
        if self.grid is not None and self.grid.size("pipe") != num_stages:
            raise ValueError(f"num_stages={num_stages} but the topology's pipe size is {self.grid.size('pipe')}")
        self.num_stages, self.virtual_stages = num_stages, virtual_stages
        self.stage_id = self.grid.rank_in("pipe") if self.grid is not None else 0
        self.loss_fn, self.seed_layers, self.base_seed = loss_fn, seed_layers, base_seed
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.partition_method = partition_method
        self.num_chunks = num_stages * virtual_stages
        if len(layers) < self.num_chunks:
            raise ValueError(f"{len(layers)} layers cannot fill {num_stages} stages x {virtual_stages} virtual stages")
        self.layer_specs = layers
        self.parts = partition_layers(partition_method, layers, self.num_chunks, _count_params, _class_name)
        self.local_chunks = list(range(self.stage_id, self.num_chunks, num_stages))  # global chunk ids here
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs, self.tied_stages = {}, {}
        self.chunk_funcs = [self._build_chunk(c) for c in self.local_chunks]
        self._mark_tied_copies()
        self.tie_groups = {}
        if self.grid is not None:
            self._make_tie_groups()
            self._synchronize_tied_weights()

    # ---- construction ------------------------------------------------------------------------------
    @staticmethod
    def _grid(num_stages, topology):
        if topology is not None:
            return ProcessGroups(topology)
        grid = get_grid()
        if grid is not None and grid.size("pipe") == num_stages and grid.world_size == comm.get_world_size():
            return grid
        world = comm.get_world_size()
        if world % num_stages:
            raise ValueError(f"num_stages={num_stages} does not divide the world size {world}")
        return ProcessGroups(ProcessTopology(pipe=num_stages, data=world // num_stages))

    def stage_of_layer(self, index: int) -> int:
        chunk = max(c for c in range(self.num_chunks) if self.parts[c] <= index)
        return chunk % self.num_stages

    def _build_chunk(self, chunk: int) -> list:
        funcs = []
        for index in range(self.parts[chunk], self.parts[chunk + 1]):
            layer = self.layer_specs[index]
            if self.seed_layers:
                torch.manual_seed(self.base_seed + index)  # the same weights whichever stage builds it
            if isinstance(layer, TiedLayerSpec):
                if layer.key not in self.tied_modules:
                    self.tied_modules[layer.key] = layer.build()
                    self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
                module = self.tied_modules[layer.key]
                fn = module if layer.forward_fn is None else (lambda x, m=module, f=layer.forward_fn: f(m, x))
                funcs.append(fn)
            elif isinstance(layer, LayerSpec):
                module = layer.build()
                self.add_module(str(index), module)
                funcs.append(module)
            elif isinstance(layer, nn.Module):
                self.add_module(str(index), layer)
                funcs.append(layer)
            elif callable(layer):
                funcs.append(layer)
            else:
                raise TypeError(f"layer {index} is {layer!r}: use a LayerSpec, an nn.Module or a function")
        return funcs

    def _mark_tied_copies(self) -> None:
        """Which stages hold each tie key; the copies above the lowest stage are `pipe_tied` (norm: counted once)."""
        for index, layer in enumerate(self.layer_specs):
            if isinstance(layer, TiedLayerSpec):
                self.tied_stages.setdefault(layer.key, set()).add(self.stage_of_layer(index))
        self.tied_stages = {k: sorted(v) for k, v in sorted(self.tied_stages.items())}
        for key in self.tied_modules:
            if self.stage_id != self.tied_stages[key][0]:
                for p in self.tied_weights(key):
                    p.pipe_tied = True

    def tied_weights(self, key) -> list:
        return [getattr(self.tied_modules[key], attr) for attr in self.tied_weight_attrs[key]]

    def _make_tie_groups(self) -> None:
        """One group per key and per (data, model) coordinate; every rank creates every group, in order."""
        topo = self.grid.topology
        for key, stages in self.tied_stages.items():
            if len(stages) < 2:
                continue
            for d in range(topo.get_dim("data")):
                for m in range(topo.get_dim("model")):
                    ranks = [topo.get_rank(pipe=s, data=d, model=m) for s in stages]
                    group = comm.new_group(ranks)
                    if self.grid.rank in ranks:
                        self.tie_groups[key] = (group, ranks)

    def _synchronize_tied_weights(self) -> None:
        """Every copy of a tied weight starts from the lowest rank's value (DeepSpeed does the same)."""
        with torch.no_grad(), comm.tag("tied_weight_broadcast"):
            for key, (group, ranks) in self.tie_groups.items():
                for p in self.tied_weights(key):
                    comm.broadcast(p.data, src=min(ranks), group=group)

    def allreduce_tied_weight_gradients(self) -> None:
        """g_tied = sum over the tie group of each stage's gradient (DeepSpeed's ReduceTiedGrads)."""
        with comm.tag("tied_grad_allreduce"):
            for key, (group, _) in self.tie_groups.items():
                for p in self.tied_weights(key):
                    if p.grad is not None:
                        comm.all_reduce(p.grad, group=group)

    # ---- running -----------------------------------------------------------------------------------
    def forward(self, x, chunk: int = 0):
        """Run local chunk `chunk` (0 .. virtual_stages-1) of this stage on x."""
        funcs = self.chunk_funcs[chunk]
        interval = self.activation_checkpoint_interval
        if interval <= 0 or not (self.training and torch.is_grad_enabled()):
            for fn in funcs:
                x = fn(*x) if isinstance(x, tuple) else fn(x)
            return x
        for start in range(0, len(funcs), interval):
            segment = funcs[start:start + interval]
            x = checkpoint(_run_segment, segment, *(x if isinstance(x, tuple) else (x,)), use_reentrant=False)
        return x

    def is_first_chunk(self, chunk: int) -> bool:
        return self.local_chunks[chunk] == 0

    def is_last_chunk(self, chunk: int) -> bool:
        return self.local_chunks[chunk] == self.num_chunks - 1

    def topology(self):
        return self.grid.topology if self.grid is not None else None


def _run_segment(segment, *x):
    x = x if len(x) > 1 else x[0]
    for fn in segment:
        x = fn(*x) if isinstance(x, tuple) else fn(x)
    return x
