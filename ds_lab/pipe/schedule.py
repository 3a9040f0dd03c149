"""Pipeline schedules as data: for one stage, the list of instructions it executes for one batch.

A schedule is decided before anything runs, so it can be printed, drawn as a Gantt chart and
checked (every micro-batch forwarded and backwarded once per stage, every send matched by a receive
in the same order) without a single process. The engine (engine.py) only executes instructions.

With P stages, m micro-batches, forward time t_f and backward t_b per micro-batch and stage:

    AFAB (GPipe)       all m forwards, then all m backwards. Simple; holds m micro-batches' activations.
    1F1B               (PipeDream-Flush, DeepSpeed's TrainSchedule) stage s runs P-s-1 warm-up forwards,
                       then alternates one forward / one backward, then drains the backwards. Same time,
                       but at most P-s micro-batches' activations are alive (not m).
    interleaved 1F1B   (Megatron) each stage holds v chunks (virtual stages) of 1/v of its layers; a
                       micro-batch visits every stage v times. The fill and drain shrink by v.

Both AFAB and 1F1B take (m + P - 1)(t_f + t_b), of which m(t_f + t_b) is work, so each stage idles

    bubble = (P - 1) / (m + P - 1)              interleaved:  (P - 1) / (v m + P - 1)

`timeline(schedules)` simulates the instruction lists (unit costs) and returns each stage's compute
slots; `bubble_fraction(slots)` measures the idle share from them.
Instruction names are DeepSpeed's (runtime/pipe/schedule.py).
"""
from __future__ import annotations


class PipeInstruction:
    """One step of a stage's program. `micro_batch`, and `chunk` (local virtual-stage index)."""

    def __init__(self, micro_batch=None, chunk=0):
        self.micro_batch, self.chunk = micro_batch, chunk

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self):
        if self.micro_batch is None:
            return f"{self.name}()"
        return f"{self.name}({self.micro_batch}" + (f", chunk={self.chunk})" if self.chunk else ")")

    def __eq__(self, other):
        return type(self) is type(other) and (self.micro_batch, self.chunk) == (other.micro_batch, other.chunk)

    def __hash__(self):
        return hash((self.name, self.micro_batch, self.chunk))


class LoadMicroBatch(PipeInstruction):
    """First stage: inputs; last stage: labels (DeepSpeed's data contract: (inputs, labels))."""


class ForwardPass(PipeInstruction):
    pass


class BackwardPass(PipeInstruction):
    pass


class SendActivation(PipeInstruction):
    pass


class RecvActivation(PipeInstruction):
    pass


class SendGrad(PipeInstruction):
    pass


class RecvGrad(PipeInstruction):
    pass


class ReduceTiedGrads(PipeInstruction):
    pass


class ReduceGrads(PipeInstruction):
    pass


class OptimizerStep(PipeInstruction):
    pass


class PipeSchedule:
    """Base: subclasses give `compute_order()`, the stage's (kind "F"|"B", micro_batch, local chunk) list."""

    train = True

    def __init__(self, micro_batches: int, stages: int, stage_id: int, virtual_stages: int = 1):
        if not 0 <= stage_id < stages:
            raise ValueError(f"stage_id {stage_id} outside 0..{stages - 1}")
        self.micro_batches, self.stages, self.stage_id = micro_batches, stages, stage_id
        self.virtual_stages = virtual_stages
        self.num_chunks = stages * virtual_stages

    def compute_order(self) -> list:
        raise NotImplementedError

    def global_chunk(self, chunk: int) -> int:
        return chunk * self.stages + self.stage_id

    def steps(self):
        """Yield one list of instructions per compute op; the last list ends the batch."""
        order = self.compute_order()
        last = self.num_chunks - 1
        for i, (kind, mb, chunk) in enumerate(order):
            g, cmds = self.global_chunk(chunk), []
            if kind == "F":
                if g == 0 or g == last:
                    cmds.append(LoadMicroBatch(mb))
                if g != 0:
                    cmds.append(RecvActivation(mb, chunk))
                cmds.append(ForwardPass(mb, chunk))
                if g != last:
                    cmds.append(SendActivation(mb, chunk))
            else:
                if g != last:
                    cmds.append(RecvGrad(mb, chunk))
                cmds.append(BackwardPass(mb, chunk))
                if g != 0:
                    cmds.append(SendGrad(mb, chunk))
            if i == len(order) - 1 and self.train:
                cmds += [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]
            yield cmds

    def __iter__(self):
        return self.steps()

    def instructions(self) -> list:
        return [cmd for step in self.steps() for cmd in step]

    def __str__(self):
        lines = [f"{type(self).__name__}: stage {self.stage_id} of {self.stages}, {self.micro_batches} micro-batches"
                 + (f", {self.virtual_stages} virtual stages" if self.virtual_stages > 1 else "")]
        lines += [f"  {i:2d}: " + ", ".join(map(repr, step)) for i, step in enumerate(self.steps())]
        return "\n".join(lines)


class GPipeSchedule(PipeSchedule):
    """AFAB: all forwards, then all backwards."""

    def compute_order(self) -> list:
        m = self.micro_batches
        return [("F", mb, 0) for mb in range(m)] + [("B", mb, 0) for mb in range(m)]


class TrainSchedule(PipeSchedule):
    """1F1B (PipeDream-Flush): P-s-1 warm-up forwards, then one forward / one backward, then drain."""

    def compute_order(self) -> list:
        m = self.micro_batches
        warmup = min(self.stages - self.stage_id - 1, m)
        order = [("F", mb, 0) for mb in range(warmup)]
        for i in range(m - warmup):
            order += [("F", warmup + i, 0), ("B", i, 0)]
        return order + [("B", mb, 0) for mb in range(m - warmup, m)]


class InterleavedSchedule(PipeSchedule):
    """Megatron's interleaved 1F1B. The k-th forward of every stage is micro-batch
    (k // (P v)) P + k mod P on local chunk (k // P) mod v; backwards walk the chunks in reverse.
    Needs m to be a multiple of P (micro-batches travel in groups of P)."""

    def __init__(self, micro_batches: int, stages: int, stage_id: int, virtual_stages: int = 2):
        super().__init__(micro_batches, stages, stage_id, virtual_stages)
        if micro_batches % stages:
            raise ValueError(f"the interleaved schedule needs the micro-batch count ({micro_batches}, "
                             f"gradient_accumulation_steps) to be a multiple of the stage count ({stages})")

    def _op(self, k: int, forward: bool) -> tuple:
        p, v = self.stages, self.virtual_stages
        mb = (k // (p * v)) * p + k % p
        chunk = (k // p) % v
        return ("F", mb, chunk) if forward else ("B", mb, v - 1 - chunk)

    def compute_order(self) -> list:
        p, v, total = self.stages, self.virtual_stages, self.micro_batches * self.virtual_stages
        if self.micro_batches == p:
            warmup = total
        else:
            warmup = min((p - self.stage_id - 1) * 2 + (v - 1) * p, total)
        order = [self._op(k, True) for k in range(warmup)]
        for k in range(total - warmup):
            order += [self._op(warmup + k, True), self._op(k, False)]
        return order + [self._op(k, False) for k in range(total - warmup, total)]


class InferenceSchedule(GPipeSchedule):
    """Forward only (eval_batch): every micro-batch through every stage, no backward, no step."""

    train = False

    def compute_order(self) -> list:
        return [("F", mb, c) for mb in range(self.micro_batches) for c in range(self.virtual_stages)]


SCHEDULES = {"afab": GPipeSchedule, "1f1b": TrainSchedule, "interleaved": InterleavedSchedule}


def make_schedule(name: str, micro_batches: int, stages: int, stage_id: int, virtual_stages: int = 1):
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule {name!r}: use one of {sorted(SCHEDULES)}")
    if name == "interleaved":
        return InterleavedSchedule(micro_batches, stages, stage_id, virtual_stages)
    if virtual_stages != 1:
        raise ValueError(f"schedule {name!r} runs one chunk per stage; virtual_stages={virtual_stages} "
                         f"needs the 'interleaved' schedule")
    return SCHEDULES[name](micro_batches, stages, stage_id)


# ---- what the schedules promise, checked by simulation --------------------------------------------
def messages(schedules: list) -> dict:
    """{(src, dst, kind): [(micro_batch, receiving global chunk), ...] in send order} and the same in
    receive order: a schedule is deadlock-free on ordered channels when the two agree."""
    p = len(schedules)
    sent, received = {}, {}
    for s, sched in enumerate(schedules):
        for cmd in sched.instructions():
            g = sched.global_chunk(cmd.chunk)
            if isinstance(cmd, SendActivation):
                sent.setdefault((s, (g + 1) % p, "activation"), []).append((cmd.micro_batch, g + 1))
            elif isinstance(cmd, SendGrad):
                sent.setdefault((s, (g - 1) % p, "grad"), []).append((cmd.micro_batch, g - 1))
            elif isinstance(cmd, RecvActivation):
                received.setdefault(((g - 1) % p, s, "activation"), []).append((cmd.micro_batch, g))
            elif isinstance(cmd, RecvGrad):
                received.setdefault(((g + 1) % p, s, "grad"), []).append((cmd.micro_batch, g))
    return {"sent": sent, "received": received}


def timeline(schedules: list, forward_cost: float = 1.0, backward_cost: float = 1.0) -> list:
    """Simulate the stages' compute orders (sends never block, a receive waits for its message):
    per stage a list of (start, end, "F"|"B", micro_batch, global chunk). A chunk costs 1/v of the stage.
    Raises RuntimeError if the schedules deadlock."""
    done, slots = {}, [[] for _ in schedules]
    orders = [s.compute_order() for s in schedules]
    position, free = [0] * len(schedules), [0.0] * len(schedules)
    last = schedules[0].num_chunks - 1
    remaining = sum(map(len, orders))
    while remaining:
        progressed = False
        for s, sched in enumerate(schedules):
            while position[s] < len(orders[s]):
                kind, mb, chunk = orders[s][position[s]]
                g = sched.global_chunk(chunk)
                need = ("F", mb, g - 1) if kind == "F" and g > 0 else ("B", mb, g + 1) if kind == "B" and g < last \
                    else ("F", mb, g) if kind == "B" else None
                if need is not None and need not in done:
                    break
                cost = (forward_cost if kind == "F" else backward_cost) / sched.virtual_stages
                start = max(free[s], done[need] if need else 0.0)
                free[s] = done[(kind, mb, g)] = start + cost
                slots[s].append((start, start + cost, kind, mb, g))
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {s: orders[s][position[s]] for s in range(len(schedules)) if position[s] < len(orders[s])}
            raise RuntimeError(f"the schedules deadlock; each stage waits at {stuck}")
    return slots


def bubble_fraction(slots: list) -> float:
    """Idle share of the stages' time from first start to last end: 1 - busy / (P x makespan)."""
    begin = min(s[0][0] for s in slots if s)
    end = max(s[-1][1] for s in slots if s)
    busy = sum(e - b for stage in slots for b, e, *_ in stage)
    return 1.0 - busy / (len(slots) * (end - begin))


def theoretical_bubble(stages: int, micro_batches: int, virtual_stages: int = 1) -> float:
    return (stages - 1) / (virtual_stages * micro_batches + stages - 1)
