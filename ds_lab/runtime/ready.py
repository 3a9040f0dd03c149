"""When a group of gradients is complete: the signal every gradient-sync mode hangs its collectives on.

Backward produces gradients one parameter at a time, last layers first. Data parallel (bucketed
all-reduce) and ZeRO 1-3 (reduce-scatter per unit) both start a unit's collective the moment all
of its gradients exist, so communication overlaps the rest of backward.

"All of its gradients" means every *contribution*, not every parameter. A parameter's
post-accumulate-grad hook fires once per gradient autograd accumulates into it: once in an
ordinary backward (autograd sums every use of a parameter inside one graph before accumulating),
but once per segment when the parameter is used inside several segments of reentrant activation
checkpointing (`torch.utils.checkpoint(..., use_reentrant=True)`: each segment runs its own inner
backward). Sending a unit after the first firing would send half a gradient.

So the number of firings is learnt, and a unit goes as soon as each of its parameters has fired
its learnt number of times (a parameter never seen firing is waited for once; a unit whose
parameter never fires goes at the end of backward). A firing beyond the learnt count that comes
after its unit was sent cannot be folded into that collective:
- modes whose late part can be reduced on its own pass `relaunch_late` (ZeRO-2/3: reduce-scatter
  is linear and the shards add up): they start from one firing per parameter, keeping their
  memory promise on every step; a late part is reduced again at the end of backward (extra
  collectives on the first step only), and the count is learnt for the next backward;
- the others (data parallel, ZeRO-1: the bucket is reduced in place while backward could still add
  to it) launch nothing on their first communicating backward until its end (as
  `overlap_comm=False` would), counting; later, a firing beyond the count after the unit was sent
  is an error that says what to do.
"""
from __future__ import annotations


class ReadyInOrder:
    """Calls `on_ready(i)` for unit i as soon as every parameter of units 0..i has all of its
    gradient contributions for this backward (see the module docstring).

    Units are released strictly in order, so every rank issues its collectives in the same order
    (the order is a property of the model, not of timing). Used by data parallel and by ZeRO 1-3.
    `on_grad(p)` runs on every firing, also outside communicating backwards.
    """

    def __init__(self, units: list, on_ready, on_grad=None, relaunch_late: bool = False, names=None):
        self.units, self.on_ready, self.on_grad = units, on_ready, on_grad
        self.relaunch_late, self.names = relaunch_late, names or {}
        self.unit_of = {p: i for i, params in enumerate(units) for p in params}
        # {param: firings per backward}: learnt on the first communicating backward (None until then),
        # or, when late parts can be reduced again, one each to start with and learnt as it goes
        self.expected = {p: 1 for p in self.unit_of} if relaunch_late else None
        self.fired, self.ready, self.late = {}, [0] * len(units), set()
        self.next, self.active = 0, False
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook) for p in self.unit_of]

    @property
    def learning(self) -> bool:
        return self.expected is None

    def _hook(self, p) -> None:
        if self.active:
            self.fired[p] = self.fired.get(p, 0) + 1
        if self.on_grad is not None:
            self.on_grad(p)
        if not self.active or self.learning:
            return
        index, fired, expected = self.unit_of[p], self.fired[p], self.expected[p]
        if fired == expected:
            self.ready[index] += 1
            self._release_ready()
        elif fired > expected and index < self.next:
            if not self.relaunch_late:
                name = self.names.get(p, f"of shape {tuple(p.shape)}")
                raise RuntimeError(
                    f"parameter {name} received gradient contribution {fired} in this backward, but only "
                    f"{expected} in the first one, and its bucket was already being reduced. ds_lab learns "
                    f"how many times each parameter's gradient arrives (once per reentrant checkpoint "
                    f"segment that uses it) on the first step; keep that number the same every step, or use "
                    f"torch.utils.checkpoint(..., use_reentrant=False), or set zero_optimization.overlap_comm "
                    f"to false (stage 0), or use ZeRO stage 2 or 3, which re-reduce a late gradient")
            self.late.add(index)

    def _release_ready(self) -> None:
        while self.next < len(self.units) and self.ready[self.next] == len(self.units[self.next]):
            self.next += 1
            self.on_ready(self.next - 1)

    def start(self) -> None:
        self.fired, self.ready, self.late, self.next, self.active = {}, [0] * len(self.units), set(), 0, True

    def flush(self) -> None:
        """End of backward: release the units still waiting (all of them while learning; else those
        with a parameter that got fewer contributions than expected, or none), then any unit that
        got a contribution after it was sent (`relaunch_late`)."""
        if not self.active:
            return
        counts = {p: max(1, self.fired.get(p, 0)) for p in self.unit_of}  # unseen: wait for it once
        self.expected = counts if self.learning else {p: max(n, counts[p]) for p, n in self.expected.items()}
        while self.next < len(self.units):
            self.next += 1
            self.on_ready(self.next - 1)
        for index in sorted(self.late):
            self.on_ready(index)
        self.active = False

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
