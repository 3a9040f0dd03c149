"""Data parallel gradient averaging: one flat buffer, buckets, all-reduce overlapped with backward.

Every rank holds the whole model and computes gradients on its own slice of the global batch;
averaging the gradients over the N ranks gives exactly the gradient of the whole batch:

    g = 1/N * sum_r g_r                  (each g_r is the mean over that rank's B samples)

Wire: one all-reduce of all gradient bytes per optimizer step. Per rank, a ring all-reduce sends
2(N-1)/N x (gradient bytes), the ZeRO paper's "2Ψ".

How (the same idea as torch DDP):
- All gradients live in one flat buffer; each `param.grad` is a view into it, so autograd
  accumulates straight into the buffer and the all-reduce runs in place (no copies, and the
  ledger's grads = exactly Ψ x bytes per element).
- The buffer is laid out in *reverse* parameter order (backward produces the last layer's
  gradients first) and cut into buckets of `bucket_size` elements.
- A post-accumulate-grad hook on every parameter counts the bucket's ready gradients; when a
  bucket is complete its async all-reduce starts while backward goes on computing the earlier
  layers (overlap). Buckets are always launched in bucket order, so every rank issues its
  collectives in the same order.
- With gradient accumulation, only the boundary micro-step communicates (DeepSpeed's stage-0
  rule); earlier micro-steps just accumulate into the buffer.
- Where the 1/N goes and the dtype on the wire are DeepSpeed's (`runtime/grad_reduce.py`): by
  default the all-reduce sums and the sum is multiplied by 1/N after it; `prescale_gradients`,
  `gradient_predivide_factor` and `communication_data_type` change that, as in DeepSpeed.
- `overlap=False` waits for the end of backward, then reduces bucket by bucket: the naive
  schedule, kept so the chapter can measure what overlap buys.
- `hierarchical=True` (config `"hierarchical_allreduce": true`) all-reduces each bucket node-aware:
  intra-node reduce-scatter, inter-node all-reduce of 1/k of it, intra-node all-gather
  (`comm.hierarchical.HierarchicalAllReduce`, built for every data-parallel group). Same sum, other wire.
"""
from __future__ import annotations

import torch

from ds_lab import comm
from ds_lab.comm.hierarchical import HierarchicalAllReduce
from ds_lab.runtime.grad_reduce import GradientReduction
from ds_lab.runtime.mode import GradientMode, copies_along
from ds_lab.runtime.precision import master_values
from ds_lab.runtime.ready import ReadyInOrder


class BucketedAllReduce:
    def __init__(self, params, bucket_size: int, group=None, overlap: bool = True, hierarchical: bool = False,
                 reduction: GradientReduction = GradientReduction()):
        self.params = [p for p in params if p.requires_grad]
        self.reduction = reduction  # where the 1/N goes and the wire dtype (runtime/grad_reduce.py)
        self.group, self.overlap = group, overlap
        self.world_size = comm.get_world_size(group)
        # collective: every rank builds the groups of every data-parallel group (flat when on one node)
        self.hierarchy = HierarchicalAllReduce.for_group(group) if hierarchical else None
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise TypeError(f"data parallel needs one parameter dtype, got {sorted(map(str, dtypes))}")
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.buffer = torch.zeros(total, dtype=dtypes.pop() if dtypes else torch.float32, device=device)
        self.views, self.buckets, buckets = {}, [], []  # buckets: (start, end) in the buffer
        offset, start = 0, 0
        for p in reversed(self.params):
            if not buckets or offset - start >= bucket_size:
                buckets.append([])
                start = offset
                self.buckets.append([offset, offset])
            self.views[p] = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            self.buckets[-1][1] = offset
            buckets[-1].append(p)
            p.grad = self.views[p]
        self.handles = []
        self.tracker = ReadyInOrder(buckets, self._launch if overlap else (lambda i: None), self._reattach)
        self.deferred = not overlap

    def _reattach(self, p) -> None:
        view = self.views[p]
        if p.grad is not view:  # someone set .grad to None (e.g. optimizer.zero_grad()): re-attach
            view.copy_(p.grad)
            p.grad = view

    def _launch(self, index: int, async_op: bool = True) -> None:
        if self.world_size == 1 and self.reduction.wire(self.buffer) is self.buffer:
            return  # nothing to average, nothing to round
        start, end = self.buckets[index]
        flat = self.buffer[start:end]
        wire = self.reduction.before_all_reduce(flat, self.world_size)  # DeepSpeed's allreduce_bucket
        handle = None
        if self.world_size > 1:
            with comm.tag("grad_allreduce"):
                if self.hierarchy is not None and not self.hierarchy.flat:
                    handle = self.hierarchy.all_reduce(wire, async_op=async_op)
                else:
                    handle = comm.all_reduce(wire, group=self.group, async_op=async_op)
        self.handles.append((handle, wire, flat))

    # ---- called by the engine -----------------------------------------------------------------
    def backward_start(self, boundary: bool) -> None:
        """Before backward: only the boundary micro-step communicates."""
        if boundary:
            self.handles = []
            self.tracker.start()

    def backward_end(self, boundary: bool) -> None:
        if boundary:
            self.finish()

    def finish(self) -> None:
        """After the boundary backward: reduce what is left (unused parameters, or everything
        when overlap is off), then wait until every bucket has arrived."""
        self.tracker.flush()
        if self.deferred:  # the naive schedule: all communication after backward, one by one
            for index in range(len(self.buckets)):
                self._launch(index, async_op=False)
        for handle, wire, flat in self.handles:
            if handle is not None:
                handle.wait()
            self.reduction.after_all_reduce(wire, flat, self.world_size)
        self.handles = []

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for p, view in self.views.items():
            p.grad = view

    def remove(self) -> None:
        self.tracker.remove()


class DataParallel(GradientMode):
    """ZeRO stage 0: every rank keeps everything; gradients are all-reduced in buckets during backward.

    fp32: the optimizer steps the parameters themselves. bf16/fp16: each parameter gets an fp32
    master copy (the optimizer never sees the 2-byte weights) and the step copies it back.

    bf16/fp16 also take one optimizer step with zero gradients when the optimizer is bound, as
    DeepSpeed's stage-0 FP16_Optimizer / FP16_UnfusedOptimizer do in `initialize_optimizer_states`:
    Adam's step count starts at 1 (the first real update is ~0.74 lr with betas (0.9, 0.999), not lr)
    and AdamW's weight decay shrinks the masters once. ZeRO and fp32 take no such step.
    """

    name, stage = "data parallel", 0
    supports_no_sync = True
    # DeepSpeed's stage-0 fp16 optimizer ignores hysteresis and stays at the minimum scale
    loss_scaler_options = dict(use_hysteresis=False, raise_below_minimum=False)
    reduction = GradientReduction()  # modes.py sets the config's (prescale, predivide, wire dtype)

    def __init__(self, module, grid, model_dtype, device, bucket_size: int, overlap: bool = True,
                 hierarchical: bool = False):
        super().__init__(grid, device)
        self.module, self.model_dtype = module, model_dtype
        self.master_of = {}  # model param -> fp32 master (mixed precision only)
        self.bucket_size, self.overlap, self.hierarchical = bucket_size, overlap, hierarchical
        self.reducer = None

    zero_grad_step_at_init = True  # DeepSpeed's initialize_optimizer_states (mixed precision only)

    @property
    def optimizer(self):
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer) -> None:
        """Bound by the engine; in bf16/fp16 the zero-gradient step happens here, before any scheduler."""
        self._optimizer = optimizer
        if optimizer is not None and self.model_dtype != torch.float32 and self.zero_grad_step_at_init:
            for master in self.masters:
                master.grad = torch.zeros_like(master)
            optimizer.step()
            for master in self.masters:
                master.grad = None

    def optimizer_params(self, group_index: int, params: list) -> list:
        if self.model_dtype == torch.float32:
            masters = list(params)
        else:
            for p in params:
                if p not in self.master_of:
                    self.master_of[p] = torch.nn.Parameter(master_values([p], self.model_dtype)[0].float())
                    for attr in ("tensor_model_parallel", "pipe_tied"):  # the norm reads them
                        setattr(self.master_of[p], attr, getattr(p, attr, False))
            masters = [self.master_of[p] for p in params]
        known = {id(m) for m in self.masters}
        self.masters.extend(m for m in masters if id(m) not in known)
        return masters

    def attach(self) -> None:
        """After the cast to the model dtype: the flat gradient buffer and its buckets."""
        self.reducer = BucketedAllReduce(list(self.module.parameters()), self.bucket_size,
                                         group=self.dp_group, overlap=self.overlap, hierarchical=self.hierarchical,
                                         reduction=self.reduction)

    def backward_start(self, boundary: bool) -> None:
        self.reducer.backward_start(boundary)

    def backward_end(self, boundary: bool) -> None:
        self.reducer.backward_end(boundary)

    def zero_grad(self) -> None:
        self.reducer.zero_grad()

    def owned_grads(self) -> list:
        return [self.reducer.buffer]

    def prepare_master_grads(self) -> list:
        for p, master in self.master_of.items():
            master.grad = p.grad.float() if p.grad is not None else None
        return [(m.grad, copies_along(m)) for m in self.masters if m.grad is not None]

    def release_master_grads(self) -> None:
        for master in self.master_of.values():
            master.grad = None  # fp32 masters: dropped; fp32 params keep their views into the buffer

    def publish_params(self) -> None:
        with torch.no_grad():
            for p, master in self.master_of.items():
                p.copy_(master)

    def ledger_categories(self) -> dict:
        return dict(params=list(self.module.parameters()), grads=[self.reducer.buffer],
                    master_params=list(self.master_of.values()))

    def model_state(self, names: dict) -> dict:
        return dict(optimizer=self.optimizer.state_dict() if self.optimizer is not None else None,
                    master_params_by_name={names[p]: m.detach() for p, m in self.master_of.items()})

    def load(self, weights: dict, model_state: dict, shards: list, names: dict,
             load_optimizer_states: bool) -> None:
        """Weights into the parameters and, exactly in fp32, into the masters (so a bf16 engine
        continues from an fp32 checkpoint's values, not from their 2-byte rounding)."""
        with torch.no_grad():
            for p in self.module.parameters():
                if names[p] in weights:
                    p.copy_(weights[names[p]])
            for p, master in self.master_of.items():
                master.copy_(weights[names[p]] if names[p] in weights else p.float())
        if load_optimizer_states and self.optimizer is not None and model_state.get("optimizer") is not None:
            self.optimizer.load_state_dict(model_state["optimizer"])

    def detach(self) -> None:
        """Hooks off; parameters back to the fp32 values of the masters when there are masters."""
        if self.reducer is not None:
            self.reducer.remove()
            for p in self.reducer.params:
                p.grad = None
        with torch.no_grad():
            for p, master in self.master_of.items():
                p.data = master.detach().clone()
