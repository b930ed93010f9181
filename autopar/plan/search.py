"""The planner: the fastest layout that fits, the robust choice among those the model cannot tell apart,
and why the others lost.

[Note: search] Every candidate of autopar.plan.space gets a bound on its step
time and on its peak memory that no stage split beats (autopar.plan.bounds:
the cost model's own terms with relaxed inputs). Candidates are visited in
order of that bound; each is costed exactly (stage split by
autopar.plan.split, then the schedule's DAG, swept by
autopar.cost.schedule_sweep) unless a tighter bound already reaches the best
exact time found: the exposed data-parallel time (``step_bound``), the
weighted memory of any split (``memory_bound``), the busiest rank of the best
possible split (``split_bound``), then, inside ``evaluate``, the floor and the
memory of each actual split. The scan stops when the next candidate's bound
reaches the best. The plan is then the robust choice among every plan within
the model's error of that fastest one (autopar.plan.robust [Note: robust
choice]). tests/test_search.py shows both equal to costing every candidate.
Ties break by the candidate's field order, so the same input gives the same
plan. docs/planner.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from autopar.cluster import ClusterSpec
from autopar.cost import constants as C
from autopar.cost.layers import CostOptions, layer_costs
from autopar.cost.model import CostBreakdown, estimate_from_costs, inflight_per_chunk
from autopar.errors import AutoparError
from autopar.plan.bounds import PlannerBounds, _Totals
from autopar.plan.progress import SearchProgress
from autopar.plan.robust import choose_robust, robust_reason
from autopar.plan.space import Candidate, enumerate_candidates
from autopar.plan.split import (SplitProblem, SplitSolution, evaluate_split, least_peak_and_bottleneck,
                                solve_split)
from autopar.plan.types import Pins, Plan, Schedule, StagePlan
from autopar.plan.unpriced import context_parallel_note
from autopar.profile.types import LayerKind, ModelProfile

SPLIT_MODES = ("chunk", "chunk_memory")
"""[Note: split modes] The ILP minimises the busiest "device"'s time.

``chunk``: every chunk is a device, so chunks come out balanced; the
schedule's DAG needs that (interleaved 1F1B with equal per-rank sums but
uneven chunks ran 10-45% slower in the DAG). It ignores memory. When it
does not fit, ``chunk_memory`` keeps chunks balanced under a per-chunk
share of the rank's memory: all of it for one chunk per rank (exact), and
capacity / v for interleaving (conservative: a rank whose chunks could share
memory unevenly is called full; we round memory up, never down). The first
split that fits is kept, else the least over. Balancing whole ranks under
their real memory (the ILP with v > 1) was tried as a third mode: it cost
the 1T search 2-3 s of HiGHS solves that almost never fit. Interleaving the
user did not pin gets the ``chunk`` split only: in the GPT-3 175B search on
1024 GPUs at 8 sequences per GPU (2026-12-01), 3 of the 319 ``chunk_memory``
splits solved while pruning fitted in memory, the plan was the same without
them, and the search took 0.8 s instead of 1.9 s; with only the ``chunk``
split, its floor bounds the candidate and prunes it before any memory work.
"""


@dataclass(frozen=True, kw_only=True)
class Evaluated:
    """A candidate with its split and predicted cost."""

    candidate: Candidate
    plan: Plan
    cost: CostBreakdown
    split: SplitSolution


@dataclass(frozen=True, kw_only=True)
class Alternative:
    dimension: str
    value: str
    evaluated: Evaluated
    reason: str


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    best: Evaluated
    alternatives: tuple[Alternative, ...]
    planning_time_s: float
    candidates: int
    evaluated: int
    pruned_by_bound: int
    pruned_by_memory: int
    split_solves: int
    """Stage-split problems solved (autopar.plan.split: chain DP or ILP)."""
    alternatives_time_s: float = 0.0
    """Time spent costing the alternatives after the plan was found."""
    fastest: Evaluated | None = None
    """The fastest predicted plan that fits, when the robust choice took another (autopar.plan.robust)."""
    choice_reason: str | None = None
    """Why ``best`` and not ``fastest``: one line ([Note: robust choice])."""
    risks: tuple[str, ...] = ()
    """What the plan's predicted step relies on that the model's error can undo (autopar.plan.robust
    .Judged.risks): left only when every plan inside the model's error has it."""
    reliance: str | None = None
    """The overlap the plan relies on, priced, when it is material but not a risk (Judged.reliance)."""
    robust_costed: int = 0
    """Plans inside the model's error costed by the robust choice."""

    def search_dict(self) -> dict:
        return {"planning_time_s": self.planning_time_s, "alternatives_time_s": self.alternatives_time_s,
                "candidates": self.candidates,
                "evaluated": self.evaluated, "pruned_by_bound": self.pruned_by_bound,
                "pruned_by_memory": self.pruned_by_memory, "split_solves": self.split_solves,
                "robust_costed": self.robust_costed}

    def choice_dict(self) -> dict:
        """The robust choice for `explain --json`: the fastest predicted plan when it was not taken, and why."""
        fastest = self.fastest
        return {"fastest_layout": fastest.plan.describe() if fastest else None,
                "fastest_step_time_s": fastest.cost.step_time_s if fastest else None,
                "reason": self.choice_reason, "risks": list(self.risks), "relies_on": self.reliance}


class Planner(PlannerBounds):
    """One planning problem: model, cluster, batch, pins and cost options."""

    def __init__(self, profile: ModelProfile, cluster: ClusterSpec, *, global_batch_size: int,
                 pins: Pins | None = None, opts: CostOptions | None = None, split_solver: str = "auto") -> None:
        if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
            raise AutoparError(f"--global-batch {global_batch_size!r}: must be a positive integer")
        self.profile, self.cluster = profile, cluster
        self.batch = global_batch_size
        self.pins = pins or Pins()
        self.opts = opts or CostOptions()
        self.split_solver = split_solver
        """autopar.plan.split solver: "auto" (exact DP for chains, HiGHS otherwise), "highs", "cbc"."""
        self.names = tuple(name for name, _ in profile.flat_layers())
        self._totals: dict[tuple, _Totals] = {}
        self._splits: dict[tuple, SplitSolution] = {}
        self._evals: dict[Candidate, Evaluated] = {}
        self._problems: dict[tuple, SplitProblem | None] = {}
        self._dp_bounds: dict[Candidate, float] = {}
        self._chunk_times: dict[tuple, list[float] | bool] = {}
        """Per-(split, micro-batch) chunk times of _chunk_floor and per-(problem, split) fits."""
        self.split_solves = 0
        kinds = [layer.kind for _, layer in profile.flat_layers()]
        self._norm_then_head = next((i for i in range(1, len(kinds)) if kinds[i] is LayerKind.LM_HEAD
                                     and kinds[i - 1] is LayerKind.FINAL_NORM), None)
        """Index of the LM head where the final norm comes right before it (:meth:`_glued`)."""

    # --- exact costing ------------------------------------------------------
    def _split(self, cand: Candidate, mode: str) -> SplitSolution:
        """The ILP split for one mode of [Note: split modes]."""
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        chunks = cand.pp * cand.virtual_stages  # each chunk is a "device" of the split problem
        if mode == "chunk":
            key = (cand.tp, cand.sequence_parallel, cand.recompute, chunks)
            if key in self._splits:
                return self._splits[key]
            problem = SplitProblem(
                time_s=t.split_time_s, weight_bytes=(0.0,) * len(t.costs), act_bytes=(0.0,) * len(t.costs),
                num_devices=chunks, virtual_stages=1, inflight=(1.0,) * chunks, capacity_bytes=math.inf)
        else:
            problem = self._memory_problem(cand)
            if problem is None:  # the reserve and one layer's work space alone overflow: nothing fits
                return self._split(cand, "chunk")
            key = problem
        if key not in self._splits:
            self._splits[key] = self._glued(problem, solve_split(problem, solver=self.split_solver))
            self.split_solves += 1
        return self._splits[key]

    def _glued(self, problem: SplitProblem, split: SplitSolution) -> SplitSolution:
        """``split`` with the final norm in the LM head's chunk, where the executor runs it
        (autopar.execute.stage: the last stage applies the norm, then the head): a chunk that would start at
        the head starts at the norm instead, earlier chunks moving down where they must to stay non-empty,
        and the split is costed again (the price is of what runs). A split of one layer per chunk is kept."""
        head = self._norm_then_head
        if head is None or head not in split.boundaries:
            return split
        bounds = [b if b != head else head - 1 for b in split.boundaries]
        for c in range(len(bounds) - 2, 0, -1):
            bounds[c] = min(bounds[c], bounds[c + 1] - 1)
        if any(b < c for c, b in enumerate(bounds)):  # as many chunks as layers: nothing to move
            return split
        return evaluate_split(problem, tuple(bounds), solver=split.solver, solve_time_s=split.solve_time_s)

    def _memory_problem(self, cand: Candidate) -> SplitProblem | None:
        """The ``chunk_memory`` mode's problem ([Note: split modes]); None when no split can fit."""
        key = ("memory", cand.tp, cand.sequence_parallel, cand.recompute, cand.pp, cand.virtual_stages,
               cand.schedule, cand.num_microbatches, cand.micro_batch_size, self._bytes_per_param(cand))
        if key not in self._problems:
            t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
            per_param, b, chunks = self._bytes_per_param(cand), cand.micro_batch_size, cand.pp * cand.virtual_stages
            inflight = inflight_per_chunk(cand.schedule, cand.pp, cand.virtual_stages, cand.num_microbatches)
            capacity = self.cluster.device.memory_bytes - self._reserve() - max(b * c.work_bytes for c in t.costs)
            capacity /= cand.virtual_stages  # each of a rank's v chunks gets an equal share: safe
            # In units of per_param bytes, so that every problem of this TP layout shares its layer tuples.
            self._problems[key] = None if capacity <= 0 else SplitProblem(
                time_s=t.split_time_s, weight_bytes=tuple(c.params for c in t.costs),
                act_bytes=tuple(c.act_bytes for c in t.costs), num_devices=chunks, virtual_stages=1,
                inflight=tuple(x * b / per_param for x in inflight), capacity_bytes=capacity / per_param)
        return self._problems[key]

    def plan_for(self, cand: Candidate, split: SplitSolution) -> Plan:
        bounds = [*split.boundaries, len(self.names)]
        stages = tuple(StagePlan(index=c, layers=self.names[bounds[c]:bounds[c + 1]])
                       for c in range(len(split.boundaries)))
        return Plan(dp=cand.dp, tp=cand.tp, pp=cand.pp, micro_batch_size=cand.micro_batch_size,
                    num_microbatches=cand.num_microbatches, schedule=cand.schedule,
                    virtual_stages=cand.virtual_stages, recompute=cand.recompute, zero_stage=cand.zero_stage,
                    sequence_parallel=cand.sequence_parallel, stages=stages, global_batch_size=self.batch,
                    seq_len=self.profile.seq_len, model=self.profile.name,
                    tp_inter_node=cand.tp > self.cluster.gpus_per_node, precision=cand.precision)

    def evaluate(self, cand: Candidate, prune_above: float | None = None) -> Evaluated | None:
        """Cost ``cand`` with the best of its split modes: see [Note: split modes].

        With ``prune_above``, return None when no mode can beat that step time
        (checked on each split before its DAG runs); only full results are kept.
        """
        if cand in self._evals:
            return self._evals[cand]
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        result, pruned = None, False
        modes = SPLIT_MODES if self._memory_mode(cand) else SPLIT_MODES[:1]
        if prune_above is not None and cand.pp > 1 and self.split_solver in ("auto", "dp"):
            chunk = self._split(cand, "chunk")
            if self._chunk_floor(cand, chunk) + self._other_bound(cand, t) >= prune_above:
                if len(modes) == 1 or self._fits_split_memory(cand, chunk):
                    return None  # the memory mode would return this same split: [Note: split modes]
                pruned, modes = True, SPLIT_MODES[1:]
        for mode in modes:
            if prune_above is not None and mode == "chunk_memory" and self._memory_mode_loses(cand, prune_above):
                pruned = True
                continue
            split = self._split(cand, mode)
            if prune_above is not None and self.memory_floor(cand, split) > self.cluster.device.memory_bytes:
                pruned = True  # cannot fit, so cannot replace a plan that fits
                continue
            plan = self.plan_for(cand, split)
            ranges = [range(a, b) for a, b in zip(split.boundaries, [*split.boundaries[1:], len(self.names)])]
            cost = estimate_from_costs(t.costs, ranges, self.profile, self.cluster, plan, self.opts, prune_above)
            if cost is None:
                pruned = True
                continue
            ev = Evaluated(candidate=cand, plan=plan, cost=cost, split=split)
            if _better(result, ev):
                result = ev
            if cost.fits:
                break
        if result is None or (pruned and not result.cost.fits):
            return None
        self._evals[cand] = result
        return result

    def _memory_mode(self, cand: Candidate) -> bool:
        """Is the ``chunk_memory`` split tried? One chunk per rank, or interleaving the user pinned: [Note: split
        modes]."""
        return cand.virtual_stages == 1 or self.pins.virtual_stages is not None or (
            self.pins.schedule is Schedule.INTERLEAVED_1F1B)

    def _memory_mode_loses(self, cand: Candidate, limit: float) -> bool:
        """Can no split of the memory mode fit, or beat ``limit``? Without solving it: the least peak over every
        split (parameters and held activations, in the mode's units, plus the reserve: the estimate's peak
        without transients) and, where a split meets the mode's memory, m micro-batches of its least slowest
        chunk (on a pipeline rank, busy that long) plus the other terms' bounds."""
        problem = self._memory_problem(cand)
        if problem is None or cand.pp == 1:
            return False
        key = ("least", id(problem))
        if key not in self._chunk_times:
            self._chunk_times[key] = least_peak_and_bottleneck(problem)
        peak, slowest = self._chunk_times[key]
        if peak * self._bytes_per_param(cand) + self._reserve() > self.cluster.device.memory_bytes:
            return True
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        busy = cand.num_microbatches * cand.micro_batch_size * slowest
        return math.isfinite(slowest) and busy + self._other_bound(cand, t) >= limit

    def _fits_split_memory(self, cand: Candidate, split: SplitSolution) -> bool:
        """Does ``split`` meet the memory mode's constraints? Then that mode's exact DP returns ``split`` itself:
        it is the closest-to-even of the least-bottleneck splits, and the constraints only remove splits."""
        problem = self._memory_problem(cand)
        if problem is None:
            return True
        key = ("fits", id(problem), split.boundaries)
        if key not in self._chunk_times:  # the DP's own arithmetic: sums from np.cumsum prefixes
            weights, acts = (np.concatenate(([0.0], np.cumsum(x))) for x in (problem.weight_bytes, problem.act_bytes))
            starts = np.array(split.boundaries)
            ends = np.append(starts[1:], problem.num_layers)
            memory = (weights[ends] - weights[starts]) + np.asarray(problem.inflight) * (acts[ends] - acts[starts])
            self._chunk_times[key] = bool((memory <= problem.capacity_bytes).all())
        return self._chunk_times[key]

def _better(a: Evaluated | None, b: Evaluated) -> bool:
    """Is ``b`` better than ``a``? Fitting first, then faster, then less over, then field order."""
    if a is None:
        return True
    if a.cost.fits != b.cost.fits:
        return b.cost.fits
    if not b.cost.fits:
        return (b.cost.over_bytes, b.candidate) < (a.cost.over_bytes, a.candidate)
    return (b.cost.step_time_s, b.candidate) < (a.cost.step_time_s, a.candidate)


def _prune_limit(best: Evaluated | None, cand: Candidate) -> float | None:
    """The step time ``cand`` must get under to replace ``best``: its time, or for a candidate earlier in
    field order (which wins ties, see _better) the next float above it. Exact ties happen: ZeRO 2 and 3
    take the same time when their gathers hide behind compute."""
    if best is None:
        return None
    limit = best.cost.step_time_s
    return limit if cand > best.candidate else math.nextafter(limit, math.inf)


def scan_candidates(planner: Planner, ordered: list[tuple[float, float, Candidate]], capacity: float,
                    budget: int | None = None, progress: SearchProgress | None = None,
                    phase: str = "fastest layout") -> tuple[Evaluated | None, Evaluated | None, int, int, int]:
    """Visit candidates in bound order: (best fitting, least over, evaluated, pruned by bound, by memory).

    Three bounds prune, cheapest first: the candidate's balanced bound (the
    order), its split bound (the busiest rank of the best possible split), and
    inside evaluate the busiest rank of each actual split.
    """
    best = least_over = None
    evaluated = pruned_memory = pruned_split = 0
    for i, (time_lb, mem_lb, cand) in enumerate(ordered):
        if progress is not None:
            progress.step(phase, i, len(ordered), best.cost.step_time_s if best is not None else None)
        if best is not None and time_lb >= best.cost.step_time_s:
            if time_lb > best.cost.step_time_s:
                return best, least_over, evaluated, len(ordered) - i + pruned_split, pruned_memory
            if cand > best.candidate:  # at best a tie, which the earlier field order wins
                pruned_split += 1
                continue
        if budget is not None and (evaluated >= 2 * budget or (best is not None and evaluated >= budget)):
            break
        if (least_over is not None or best is not None) and (
                mem_lb > capacity or (cand.pp > 1 and planner.memory_bound(cand) > capacity)):
            pruned_memory += 1
            continue
        limit = _prune_limit(best, cand)
        # The split bound needs an ILP when v > 1; there the floor inside evaluate,
        # on the cached balanced-chunk split, prunes as well and costs less.
        if limit is not None and (planner.step_bound(cand, time_lb) >= limit or (
                cand.pp > 1 and cand.virtual_stages == 1 and planner.split_bound(cand) >= limit)):
            pruned_split += 1
            continue
        ev = planner.evaluate(cand, prune_above=limit)
        if ev is None:  # its actual split's floor already reached the best
            pruned_split += 1
            continue
        evaluated += 1
        if ev.cost.fits:
            best = ev if _better(best, ev) else best
        elif _better(least_over, ev):
            least_over = ev
    return best, least_over, evaluated, pruned_split, pruned_memory


def search(profile: ModelProfile, cluster: ClusterSpec, *, global_batch_size: int, pins: Pins | None = None,
           opts: CostOptions | None = None, alternatives: bool = True, split_solver: str = "auto",
           robust: bool = True, progress: bool = False) -> SearchResult:
    """Plan ``profile`` on ``cluster``: see [Note: search]; with ``robust``, the plan is the robust choice among
    those predicted within the model's error of the fastest ([Note: robust choice]), else the fastest. With
    ``progress``, a search that runs past a second shows a status line on stderr (autopar.plan.progress).

    Raises:
        AutoparError: no layout exists (pins, batch), or nothing fits in memory and
            nothing was pinned (the message gives the fewest GPUs that could fit).
    """
    shown = SearchProgress(progress)
    try:
        return _search(profile, cluster, global_batch_size, pins or Pins(), opts, alternatives, split_solver, robust,
                       shown)
    finally:
        shown.close()


def _search(profile: ModelProfile, cluster: ClusterSpec, global_batch_size: int, pins: Pins,
            opts: CostOptions | None, alternatives: bool, split_solver: str, robust: bool,
            progress: SearchProgress) -> SearchResult:
    start = time.perf_counter()
    planner = Planner(profile, cluster, global_batch_size=global_batch_size, pins=pins, opts=opts,
                      split_solver=split_solver)
    cands = enumerate_candidates(profile, cluster, global_batch_size=global_batch_size, pins=pins)
    # cands come in field order, so their index breaks ties as the candidates would, and faster.
    ordered = [(t, mem, c) for t, mem, _, c in sorted((*planner.lower_bound(c), i, c) for i, c in enumerate(cands))]
    capacity = cluster.device.memory_bytes
    best, least_over, evaluated, pruned_bound, pruned_mem = scan_candidates(planner, ordered, capacity,
                                                                            progress=progress)
    if best is None:
        if least_over is None:
            least_over = planner.evaluate(min(ordered, key=lambda x: (x[1], x[2]))[2])
        if not _pinned(pins):
            raise AutoparError(_does_not_fit(profile, cluster, least_over, global_batch_size))
        best = least_over
    fastest, reason, risks, reliance, costed = None, None, (), None, 0
    if robust and best.cost.fits:
        chosen, quickest, costed = choose_robust(planner, ordered, best, capacity, progress)
        reason = robust_reason(chosen, quickest)
        fastest = quickest.evaluated if reason else None
        best, risks = chosen.evaluated, tuple(chosen.risks().values())
        reliance = None if "overlap" in chosen.risks() else chosen.reliance()
    planning_s = time.perf_counter() - start
    from autopar.plan.alternatives import best_alternatives

    alts = best_alternatives(planner, ordered, best, capacity, progress) if alternatives else ()
    return SearchResult(
        best=best, alternatives=alts, planning_time_s=planning_s, candidates=len(cands),
        evaluated=evaluated, pruned_by_bound=pruned_bound, pruned_by_memory=pruned_mem,
        split_solves=planner.split_solves, alternatives_time_s=time.perf_counter() - start - planning_s,
        fastest=fastest, choice_reason=reason, risks=risks, reliance=reliance, robust_costed=costed)


def _pinned(pins: Pins) -> bool:
    return any(getattr(pins, f) is not None for f in
               ("dp", "tp", "pp", "micro_batch_size", "virtual_stages", "schedule", "recompute", "zero_stage"))


def _does_not_fit(profile: ModelProfile, cluster: ClusterSpec, least: Evaluated, batch: int) -> str:
    gib = 1024**3
    need = max(s.peak_bytes for s in least.cost.stages)
    fewest = _fewest_gpus(profile, cluster, batch)
    where = f"at least {fewest} GPUs" if fewest else "a device with more memory"
    plan = least.plan
    from autopar.plan.space import tp_options
    from autopar.profile.types import Recompute

    work = min(max(c.work_bytes for c in layer_costs(profile, cluster, tp=tp, sequence_parallel=tp > 1,
                                                     recompute=rc, opts=CostOptions()))
               for tp in tp_options(profile, cluster, cluster.world_size, Pins()) for rc in Recompute)
    free = cluster.device.memory_bytes - cluster.device.context_bytes - C.ALLOCATOR_FRAGMENTATION * cluster.device.memory_bytes
    context = context_parallel_note(work, free, profile.seq_len)
    held = max(s.memory_bytes.get("batch", 0.0) for s in least.cost.stages)
    if held >= free:  # no layout helps: every rank holds the loop's whole batch (autopar.cost.constants.BATCH_TENSORS)
        return (f"{profile.name} fits no layout of {cluster.world_size} x {cluster.device.name}: the loop's batch "
                f"alone ({batch:,} sequences x {profile.seq_len:,} tokens of int64 ids and labels, held whole on "
                f"every rank) takes {held / gib:.1f} GiB of the device's {free / gib:.0f} GiB usable; use a "
                "smaller --global-batch/--seq-len (accumulate over several steps in the loop instead)")
    return (f"{profile.name} fits no layout of {cluster.world_size} x {cluster.device.name}: the leanest "
            f"({plan.describe()}) needs {need / gib:.1f} GiB per GPU, the device has "
            f"{cluster.device.memory_bytes / gib:.0f} GiB; " + (context or
            f"use {where}, or a smaller --global-batch/--seq-len"))


def _fewest_gpus(profile: ModelProfile, cluster: ClusterSpec, batch: int, limit: int = 1 << 17) -> int | None:
    """Smallest world (whole nodes, doubling) whose leanest layout's memory bound fits."""
    from autopar.profile.types import Recompute

    gpus = cluster.world_size * 2
    lean = Pins(recompute=Recompute.FULL, micro_batch_size=1)
    while gpus <= limit:
        try:
            bigger = cluster.with_gpus(gpus)
            planner = Planner(profile, bigger, global_batch_size=batch, pins=lean)
            cands = enumerate_candidates(profile, bigger, global_batch_size=batch, pins=lean)
        except AutoparError:
            gpus *= 2
            continue
        if min(planner.lower_bound(c)[1] for c in cands) <= bigger.device.memory_bytes:
            return gpus
        gpus *= 2
    return None
