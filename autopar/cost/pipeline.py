"""Pipeline schedules as task orders, and the step they take as a DAG.

[Note: pipeline step DAG]
A pipeline step is a DAG of tasks: the forward (F) and backward (B) of each
micro-batch on each chunk. Chunk ``c`` of ``pp * v`` runs on pipeline rank
``c % pp`` (torch.distributed.pipelining's "loop" placement). Edges:

* data: F(c, i) after F(c-1, i) ends plus the p2p transfer; B(c, i) after
  B(c+1, i) ends plus the p2p transfer, and after F(c, i) (same rank);
* order: each rank runs its tasks one at a time in the order its schedule
  class executes them (:func:`action_orders`, checked against torch's own
  ScheduleGPipe, Schedule1F1B and ScheduleInterleaved1F1B in
  tests/test_pipeline.py).

The step time is the longest path (node weights = task durations, edge
weights = transfers). :func:`simulate` computes it with an event-driven sweep
over the per-rank orders, O(tasks): ~0.3 s for 1f1b with pp=64, m=512 (65k
tasks) on one CPU core. :func:`build_step_dag` + :func:`dag_step_time` build
the same DAG in networkx, ~6 s at that size, so they serve to validate (the
tests check both agree on random uneven cases). Sends are modelled as
asynchronous: a transfer delays only its receiver. Closed forms
(:func:`bubble_fraction`) are tests of the DAG, not inputs to the planner.
docs/schedules.md has the derivations.

Pure Python: this module must not import torch (``autopar explain`` starts
fast); networkx is imported only inside :func:`build_step_dag`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

from autopar.errors import AutoparError
from autopar.plan.types import Schedule

if TYPE_CHECKING:
    import networkx as nx

_SINK = "sink"


@dataclass(frozen=True, slots=True)
class Action:
    """One compute task of a pipeline rank."""

    kind: Literal["F", "B"]
    """Forward or (full) backward."""
    chunk: int
    """Global chunk index in model order (torch's ``stage_index``)."""
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}(chunk {self.chunk}, mb {self.microbatch})"


class TaskSpan(NamedTuple):
    """When one task runs, as drawn by ``explain --plot``."""

    rank: int
    kind: str
    chunk: int
    microbatch: int
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Timeline:
    """Start and end of every task of one step, and the step time."""

    tasks: list[TaskSpan]
    """In the order the sweep completed them (per rank: schedule order)."""
    step_s: float
    """Longest path of the step DAG: end of the last task."""
    num_ranks: int

    def busy_s(self) -> list[float]:
        """Seconds of compute per pipeline rank."""
        busy = [0.0] * self.num_ranks
        for task in self.tasks:
            busy[task.rank] += task.end_s - task.start_s
        return busy


# ---------------------------------------------------------------- orders


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AutoparError(f"{name}={value!r}: must be a positive integer")


def _interleaved_rounds(pp: int, m: int) -> tuple[int, int]:
    """(rounds, micro-batches per round) as ScheduleInterleaved1F1B.__init__ computes them."""
    rounds = max(1, m // pp)
    return rounds, m // rounds


def _parse_schedule(schedule: Schedule | str) -> Schedule:
    try:
        return Schedule(schedule)
    except ValueError:
        names = ", ".join(s.value for s in Schedule)
        raise AutoparError(f"schedule {schedule!r} is unknown; use one of {names}") from None


def _check_schedule(schedule: Schedule, pp: int, v: int, m: int) -> None:
    if schedule in (Schedule.GPIPE, Schedule.ONE_F_ONE_B) and v != 1:
        raise AutoparError(
            f"schedule {schedule.value} with virtual_stages={v}: it runs one chunk per rank; "
            f"use virtual_stages=1, or interleaved_1f1b for {v} chunks per rank")
    if schedule is Schedule.ONE_F_ONE_B and m < pp:
        raise AutoparError(
            f"schedule 1f1b with num_microbatches={m} < pp={pp}: torch's Schedule1F1B needs "
            f"num_microbatches >= pp; use at least {pp} micro-batches, or gpipe")
    if schedule is Schedule.INTERLEAVED_1F1B:
        if v < 2:
            raise AutoparError(
                f"schedule interleaved_1f1b with virtual_stages={v}: it needs at least 2 chunks "
                "per rank; use virtual_stages>=2, or 1f1b for one chunk per rank")
        rounds, _ = _interleaved_rounds(pp, m)
        if m % rounds:
            lower = max(k for k in range(1, m) if k % _interleaved_rounds(pp, k)[0] == 0)
            upper = next(k for k in range(m + 1, 2 * m + pp) if k % _interleaved_rounds(pp, k)[0] == 0)
            raise AutoparError(
                f"schedule interleaved_1f1b with num_microbatches={m}, pp={pp}: torch's "
                f"ScheduleInterleaved1F1B needs num_microbatches to be a multiple of "
                f"max(1, num_microbatches // pp) = {rounds}; use {lower} or {upper} "
                f"(any multiple of pp works)")


def action_orders(schedule: Schedule | str, pp: int, v: int, m: int) -> list[list[Action]]:
    """Each pipeline rank's compute tasks, in the order torch executes them.

    Args:
        schedule: a :class:`Schedule` or its string value.
        pp: pipeline ranks.
        v: chunks per rank (``virtual_stages``); chunk c runs on rank c % pp.
        m: micro-batches per step.

    Returns:
        ``orders[rank]`` = that rank's actions; idle slots of torch's schedule
        IR (``None``) are dropped: waits come from the DAG's data edges.

    Raises:
        AutoparError: an unknown schedule, or a combination torch rejects
            (1f1b with m < pp; interleaved with v < 2 or m not a multiple of
            max(1, m // pp)), or v != 1 for gpipe/1f1b.
    """
    schedule = _parse_schedule(schedule)
    for name, value in (("pp", pp), ("virtual_stages", v), ("num_microbatches", m)):
        _check_positive(name, value)
    _check_schedule(schedule, pp, v, m)
    if schedule is Schedule.GPIPE:
        return [_gpipe_rank(rank, m) for rank in range(pp)]
    if schedule is Schedule.ONE_F_ONE_B:
        return [_one_f_one_b_rank(rank, pp, m) for rank in range(pp)]
    return [_interleaved_rank(rank, pp, v, m) for rank in range(pp)]


def _gpipe_rank(rank: int, m: int) -> list[Action]:
    """ScheduleGPipe._step_microbatches: all forwards, then all backwards."""
    return [Action("F", rank, i) for i in range(m)] + [Action("B", rank, i) for i in range(m)]


def _one_f_one_b_rank(rank: int, pp: int, m: int) -> list[Action]:
    """Schedule1F1B._step_microbatches: pp - rank warm-up forwards, then B/F pairs, then Bs.

    (Its ``_get_pipeline_order`` IR is off by one on the last rank in torch
    2.13; the executed loop is what we follow.)
    """
    warmup = min(m, pp - rank)
    actions = [Action("F", rank, i) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [Action("B", rank, i), Action("F", rank, warmup + i)]
    actions += [Action("B", rank, i) for i in range(m - warmup, m)]
    return actions


def _interleaved_rank(rank: int, pp: int, v: int, m: int) -> list[Action]:
    """ScheduleInterleaved1F1B._calculate_single_rank_operations + _get_1f1b_rank_ops.

    Forwards visit local chunks in groups of ``per_round`` micro-batches
    (depth first); backwards visit them in reverse; a rank warms up with
    (v - 1) * per_round + 2 * (pp - 1 - rank) forwards.
    """
    _, per_round = _interleaved_rounds(pp, m)
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), m * v)
    next_f, next_b = [0] * v, [0] * v
    actions: list[Action] = []

    def emit(kind: Literal["F", "B"], local: int, counters: list[int]) -> None:
        actions.append(Action(kind, local * pp + rank, counters[local]))
        counters[local] += 1

    for op in range(m * v + warmup):
        if op < m * v:
            emit("F", (op // per_round) % v, next_f)
        if op >= warmup:
            emit("B", v - 1 - ((op - warmup) // per_round) % v, next_b)
    return actions


# ---------------------------------------------------------------- the DAG


def _check_orders(orders: Sequence[Sequence[Action]], num_chunks: int) -> int:
    """Checks every (kind, chunk, microbatch) appears once, on rank chunk % pp; returns m."""
    pp = len(orders)
    if pp < 1 or num_chunks % pp:
        raise AutoparError(
            f"{num_chunks} chunk durations for {pp} pipeline ranks: need pp * virtual_stages "
            "durations, one per chunk")
    m = 1 + max((a.microbatch for order in orders for a in order), default=-1)
    seen = set()
    for rank, order in enumerate(orders):
        for a in order:
            if (not 0 <= a.chunk < num_chunks or a.chunk % pp != rank or a.microbatch < 0
                    or a.kind not in ("F", "B")):
                raise AutoparError(f"{a} on rank {rank}: chunk must be in [0, {num_chunks}) and run "
                                   f"on rank chunk % {pp}, micro-batch >= 0, kind F or B")
            seen.add((a.kind, a.chunk, a.microbatch))
    if m < 1 or len(seen) != 2 * num_chunks * m or sum(map(len, orders)) != len(seen):
        raise AutoparError(
            f"orders hold {sum(map(len, orders))} tasks, {len(seen)} distinct; need each of F and B "
            f"for {num_chunks} chunks x {m} micro-batches exactly once ({2 * num_chunks * m})")
    return m


def _hop_s(p2p_s: float | Sequence[float], num_chunks: int, pp: int) -> list[float]:
    """Transfer time from chunk c to c+1 (index c); zero where both chunks share a rank."""
    hops = [float(p2p_s)] * (num_chunks - 1) if isinstance(p2p_s, (int, float)) else list(p2p_s)
    if len(hops) != num_chunks - 1:
        raise AutoparError(f"{len(hops)} p2p times for {num_chunks} chunks: give one float, "
                           f"or one per boundary ({num_chunks - 1})")
    return [0.0 if c % pp == (c + 1) % pp else hops[c] for c in range(num_chunks - 1)]


def _durations(fwd_s: Sequence[float], bwd_s: Sequence[float]) -> None:
    if len(fwd_s) != len(bwd_s) or any(t < 0 for t in (*fwd_s, *bwd_s)):
        raise AutoparError(f"{len(fwd_s)} forward and {len(bwd_s)} backward durations: need one "
                           "non-negative duration per chunk in each")


def simulate(orders: Sequence[Sequence[Action]], fwd_s: Sequence[float], bwd_s: Sequence[float],
             p2p_s: float | Sequence[float] = 0.0, *, trusted_microbatches: int | None = None) -> Timeline:
    """Earliest start of every task: the longest path of the step DAG, by a sweep.

    Each rank runs its order until a task's input is not ready, then parks on
    that input; the task producing it wakes the rank. Every task starts at
    max(previous task on the rank ends, each input ends + transfer), which is
    its longest-path distance from the start. O(tasks).

    Args:
        orders: per rank, from :func:`action_orders` (or any complete order).
        fwd_s: forward seconds of one micro-batch, per chunk.
        bwd_s: backward seconds of one micro-batch, per chunk.
        p2p_s: seconds to move one micro-batch's boundary tensor from chunk c
            to c+1: one float, or one per boundary; not charged between
            chunks on the same rank.
        trusted_microbatches: m, for orders made by :func:`action_orders`
            for these chunks: skips checking them (the planner's hot path).

    Raises:
        AutoparError: malformed orders, or orders that deadlock (a cycle).
    """
    _durations(fwd_s, bwd_s)
    n = len(fwd_s)
    # Orders straight from action_orders (the cost model's) need no re-check.
    m = trusted_microbatches or _check_orders(orders, n)
    hop = _hop_s(p2p_s, n, len(orders))
    ends: list[float | None] = [None] * (2 * n * m)  # F(c,i) at c*m+i, B(c,i) at (n+c)*m+i
    waiting: dict[int, list[int]] = {}
    ptr, clock = [0] * len(orders), [0.0] * len(orders)
    ready, spans = list(reversed(range(len(orders)))), []
    while ready:
        rank = ready.pop()
        order, k, t = orders[rank], ptr[rank], clock[rank]
        while k < len(order):
            a = order[k]
            c, i = a.chunk, a.microbatch
            # Inputs: F(c, i) needs F(c-1, i); B(c, i) needs F(c, i) and B(c+1, i).
            # Written out (no tuples) because this loop is the planner's hot path.
            blocked, start = None, t
            if a.kind == "F":
                key, dur = c * m + i, fwd_s[c]
                if c:
                    dep = key - m
                    if ends[dep] is None:
                        blocked = dep
                    elif ends[dep] + hop[c - 1] > start:
                        start = ends[dep] + hop[c - 1]
            else:
                key, dur = (n + c) * m + i, bwd_s[c]
                dep = c * m + i
                if ends[dep] is None:
                    blocked = dep
                else:
                    start = max(start, ends[dep])
                    if c < n - 1:
                        dep = key + m
                        if ends[dep] is None:
                            blocked = dep
                        elif ends[dep] + hop[c] > start:
                            start = ends[dep] + hop[c]
            if blocked is not None:  # park until the task producing `blocked` ends
                waiting.setdefault(blocked, []).append(rank)
                break
            t = start + dur
            ends[key] = t
            spans.append(TaskSpan(rank, a.kind, c, i, start, t))
            k += 1
            ready.extend(waiting.pop(key, ()))
        ptr[rank], clock[rank] = k, t
    stuck = [r for r, order in enumerate(orders) if ptr[r] < len(order)]
    if stuck:
        waits = ", ".join(f"rank {r} at {orders[r][ptr[r]]}" for r in stuck)
        raise AutoparError(f"pipeline order deadlocks: {waits} wait forever; "
                           "the orders must come from one schedule (action_orders)")
    return Timeline(tasks=spans, step_s=max(clock), num_ranks=len(orders))


def simulate_shared(orders: Sequence[Sequence[Action]], fwd_s: Sequence[float], bwd_s: Sequence[float],
                    speeds: Sequence[float], p2p_s: float | Sequence[float] = 0.0, *,
                    trusted_microbatches: int | None = None) -> Timeline:
    """The step DAG of :func:`simulate` on ranks that share their devices (processor sharing).

    A task's duration is its work at one rank's own rate; while ``k`` pipeline ranks compute at once each
    advances at ``speeds[k]`` of it (``speeds[0]`` unused; 1 where the ranks have a device each, below 1
    where they time-slice cores: autopar.cost.model [Note: ranks sharing a device]). So a pipeline's
    warm-up and drain, where few ranks run, go at the rank's own rate, and its steady state at the shared
    one. Event-driven: every task starts when its rank is free and its inputs have arrived (input end +
    transfer), and time advances to the next start or end; O(tasks x pp). With every speed 1 it is
    :func:`simulate`'s longest path (tests/test_pipeline.py).

    Raises:
        AutoparError: malformed orders or speeds, or orders that deadlock.
    """
    _durations(fwd_s, bwd_s)
    pp, n = len(orders), len(fwd_s)
    if len(speeds) != pp + 1 or any(not 0 < s <= 1 for s in speeds[1:]):
        raise AutoparError(f"{len(speeds)} speeds for {pp} pipeline ranks: need pp + 1 values, each of "
                           "speeds[1:] in (0, 1]")
    m = trusted_microbatches or _check_orders(orders, n)
    hop = _hop_s(p2p_s, n, pp)
    ends: list[float | None] = [None] * (2 * n * m)  # as in simulate
    ptr = [0] * pp
    running: dict[int, list] = {}  # rank -> [key, work left, start, action]
    spans: list[TaskSpan] = []
    now = 0.0

    def arrival(rank: int) -> float | None:
        """When the inputs of the rank's next task are all there (None: one is not computed yet)."""
        a = orders[rank][ptr[rank]]
        c, i = a.chunk, a.microbatch
        if a.kind == "F":  # F(c, i) needs F(c-1, i); B(c, i) needs F(c, i) and B(c+1, i)
            deps = [((c - 1) * m + i, hop[c - 1])] if c else []
        else:
            deps = [(c * m + i, 0.0)] + ([((n + c + 1) * m + i, hop[c])] if c < n - 1 else [])
        t = 0.0
        for key, transfer in deps:
            if ends[key] is None:
                return None
            t = max(t, ends[key] + transfer)
        return t

    while True:
        waits = []
        for rank in range(pp):
            if rank in running or ptr[rank] >= len(orders[rank]):
                continue
            t = arrival(rank)
            if t is not None and t <= now:
                a = orders[rank][ptr[rank]]
                key = (a.chunk if a.kind == "F" else n + a.chunk) * m + a.microbatch
                running[rank] = [key, fwd_s[a.chunk] if a.kind == "F" else bwd_s[a.chunk], now, a]
            elif t is not None:
                waits.append(t)
        if not running and not waits:
            break
        speed = speeds[len(running)] if running else 1.0
        step = min([left / speed for _, left, _, _ in running.values()] + [t - now for t in waits])
        now += step
        for rank, task in list(running.items()):
            task[1] -= step * speed
            if task[1] <= 1e-12 * max(1.0, now):
                key, _, start, a = task
                ends[key] = now
                spans.append(TaskSpan(rank, a.kind, a.chunk, a.microbatch, start, now))
                ptr[rank] += 1
                del running[rank]
    stuck = [r for r, order in enumerate(orders) if ptr[r] < len(order)]
    if stuck:
        waits_at = ", ".join(f"rank {r} at {orders[r][ptr[r]]}" for r in stuck)
        raise AutoparError(f"pipeline order deadlocks: {waits_at} wait forever; "
                           "the orders must come from one schedule (action_orders)")
    return Timeline(tasks=spans, step_s=now, num_ranks=pp)


def step_time(orders: Sequence[Sequence[Action]], fwd_s: Sequence[float], bwd_s: Sequence[float],
              p2p_s: float | Sequence[float] = 0.0) -> float:
    """Predicted pipeline time of one step (seconds): see :func:`simulate`."""
    return simulate(orders, fwd_s, bwd_s, p2p_s).step_s


def build_step_dag(orders: Sequence[Sequence[Action]], fwd_s: Sequence[float], bwd_s: Sequence[float],
                   p2p_s: float | Sequence[float] = 0.0) -> "nx.DiGraph":
    """The step DAG in networkx: nodes are :class:`Action` plus a sink.

    Node weights are folded into edges: edge u -> w weighs duration(u) +
    transfer(u, w), and every task has an edge to the sink weighing its
    duration, so the longest path is the step time (:func:`dag_step_time`).

    Raises:
        AutoparError: malformed orders, or orders with a cycle (a deadlock).
    """
    import networkx as nx

    _durations(fwd_s, bwd_s)
    n = len(fwd_s)
    m = _check_orders(orders, n)
    hop = _hop_s(p2p_s, n, len(orders))
    dur = {"F": fwd_s, "B": bwd_s}
    dag = nx.DiGraph()
    for c in range(n):
        for i in range(m):
            f, b = Action("F", c, i), Action("B", c, i)
            dag.add_edge(f, b, weight=fwd_s[c])
            dag.add_edge(b, _SINK, weight=bwd_s[c])
            dag.add_edge(f, _SINK, weight=fwd_s[c])
            if c + 1 < n:
                dag.add_edge(f, Action("F", c + 1, i), weight=fwd_s[c] + hop[c])
                dag.add_edge(Action("B", c + 1, i), b, weight=bwd_s[c + 1] + hop[c])
    for order in orders:
        for u, w in zip(order, order[1:]):
            if not dag.has_edge(u, w):
                dag.add_edge(u, w, weight=dur[u.kind][u.chunk])
    if not nx.is_directed_acyclic_graph(dag):
        raise AutoparError("pipeline order has a dependency cycle (it would deadlock); "
                           "the orders must come from one schedule (action_orders)")
    return dag


def dag_step_time(dag: "nx.DiGraph") -> float:
    """Longest path of a :func:`build_step_dag` graph, by networkx."""
    import networkx as nx

    return float(nx.dag_longest_path_length(dag, weight="weight"))


# ---------------------------------------------------------------- memory and closed forms


def peak_inflight(orders: Sequence[Sequence[Action]], num_chunks: int) -> tuple[float, ...]:
    """Per chunk, the most micro-batches whose F is done and B is not.

    Those are the micro-batches whose activations the chunk holds; walking
    the rank's order gives the count without timing. 1F1B: min(pp - stage, m);
    GPipe: m. Whole numbers, as floats so the planner can scale them.
    """
    live, peak = [0] * num_chunks, [0] * num_chunks
    for order in orders:
        for a in order:
            live[a.chunk] += 1 if a.kind == "F" else -1
            peak[a.chunk] = max(peak[a.chunk], live[a.chunk])
    return tuple(float(p) for p in peak)


def peak_activation_bytes(orders: Sequence[Sequence[Action]],
                          bytes_per_microbatch: Sequence[float]) -> tuple[float, ...]:
    """Per rank, the most activation bytes held at once over all its chunks.

    With one chunk per rank this is ``peak_inflight * bytes``; with several
    (interleaved) the chunks peak at different times, so this is at most the
    sum of their separate peaks.
    """
    peaks = []
    for order in orders:
        live = peak = 0.0
        for a in order:
            live += bytes_per_microbatch[a.chunk] * (1 if a.kind == "F" else -1)
            peak = max(peak, live)
        peaks.append(peak)
    return tuple(peaks)


def bubble_fraction(schedule: Schedule | str, pp: int, v: int, m: int) -> float:
    """Idle time over ideal time, for equal chunks and free transfers.

    The step is then m(f+b) * (1 + bubble_fraction), f and b being one
    micro-batch's forward and backward time on one rank (all its chunks).
    Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on
    GPU Clusters Using Megatron-LM"), §2.2.1: GPipe and 1F1B idle (p-1)(f+b)
    against an ideal m(f+b), so (p-1)/m; §2.2.2: with v chunks per rank each
    costing (f+b)/v, the bubble shrinks to (p-1)/(v m). The DAG of torch's
    interleaved order matches that exactly for every valid m >= pp. For
    m < pp a round holds only m micro-batches and each rank waits for
    micro-batch 0 to come back from the last rank: the step is
    (v p + m - 1)(f+b)/v, a bubble of (v(p-m) + m - 1)/(v m) (derived from the
    DAG; tests/test_pipeline.py checks both).
    """
    schedule = _parse_schedule(schedule)
    for name, value in (("pp", pp), ("virtual_stages", v), ("num_microbatches", m)):
        _check_positive(name, value)
    _check_schedule(schedule, pp, v, m)
    if schedule is Schedule.INTERLEAVED_1F1B and m < pp:
        return (v * (pp - m) + m - 1) / (v * m)
    return (pp - 1) / (v * m)
