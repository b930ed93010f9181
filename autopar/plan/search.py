"""The planner: the fastest layout that fits, and why the others lost.

[Note: search] Every candidate of autopar.plan.space gets a bound on its step
time from whole-model sums (the mean rank's busy time and a balanced bubble)
and on its peak memory. Candidates are visited in order of that bound; each
is costed exactly (stage split by the ILP, autopar.plan.split, then the
schedule's DAG) unless a tighter bound already reaches the best exact time
found: the busiest rank of the best possible split (``split_bound``), then
the floor of the actual split inside ``estimate_from_costs``. The scan stops
when the next candidate's bound reaches the best. tests/test_search.py shows
the result equal to costing every candidate. Ties break by the candidate's
field order, so the same input gives the same plan. docs/planner.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from autopar.cluster import ClusterSpec
from autopar.cost import constants as C
from autopar.cost.layers import CostOptions, LayerCost, collective_s, layer_costs
from autopar.cost.model import CostBreakdown, estimate_from_costs, inflight_per_chunk
from autopar.errors import AutoparError
from autopar.plan.space import Candidate, enumerate_candidates
from autopar.plan.split import SplitProblem, SplitSolution, solve_split
from autopar.plan.types import Pins, Plan, Schedule, StagePlan
from autopar.profile.types import ModelProfile

BUBBLE_BOUND_MARGIN = 0.5
"""Share of the balanced bubble the bound leaves out for 1F1B and interleaved
1F1B: an uneven split's DAG filled and drained up to 31% faster than the
balanced bubble on the test problems; tests/test_search.py checks the bound
against the exact cost of every candidate of its problems."""

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
the 1T search 2-3 s of HiGHS solves that almost never fit.
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

    def search_dict(self) -> dict:
        return {"planning_time_s": self.planning_time_s, "alternatives_time_s": self.alternatives_time_s,
                "candidates": self.candidates,
                "evaluated": self.evaluated, "pruned_by_bound": self.pruned_by_bound,
                "pruned_by_memory": self.pruned_by_memory, "split_solves": self.split_solves}


@dataclass
class _Totals:
    """Whole-model sums for one (tp, sp, recompute) used by the bounds."""

    costs: list[LayerCost]
    time_s: float
    tp_bytes: float
    tp_calls: int
    params: float
    act_bytes: float
    boundary_bytes: float
    split_time_s: tuple[float, ...]


class Planner:
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
        self.split_solves = 0

    # --- bounds -----------------------------------------------------------
    def totals(self, tp: int, sp: bool, recompute) -> _Totals:
        key = (tp, sp, recompute)
        if key not in self._totals:
            costs = layer_costs(self.profile, self.cluster, tp=tp, sequence_parallel=sp,
                                recompute=recompute, opts=self.opts)
            _, bw = self.cluster.link(tp > self.cluster.gpus_per_node)
            ring = 2 * (tp - 1) / tp / (bw * self.opts.collective_efficiency) if tp > 1 else 0.0
            self._totals[key] = _Totals(
                costs=costs, time_s=sum(c.fwd_s + c.bwd_s for c in costs),
                tp_bytes=sum(c.tp_bytes for c in costs), tp_calls=sum(c.tp_collectives for c in costs),
                params=sum(c.params for c in costs if c.tied_to is None), act_bytes=sum(c.act_bytes for c in costs),
                boundary_bytes=min(c.output_bytes for c in costs[:-1]) if len(costs) > 1 else 0.0,
                split_time_s=tuple(c.fwd_s + c.bwd_s + c.tp_bytes * ring for c in costs))
        return self._totals[key]

    def lower_bound(self, cand: Candidate) -> tuple[float, float]:
        """(step time, peak memory) no split of this candidate can beat."""
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        pp, b, m, v = cand.pp, cand.micro_batch_size, cand.num_microbatches, cand.virtual_stages
        tp_inter = cand.tp > self.cluster.gpus_per_node
        tp_s = collective_s(b * t.tp_bytes / pp, cand.tp, t.tp_calls // pp, tp_inter, self.cluster,
                            self.opts.collective_efficiency)
        per_mb = b * t.time_s / pp + tp_s
        pipe = m * per_mb  # the mean rank's busy time bounds any split
        if pp > 1:
            # Balanced stages' closed form, its bubble less a margin: see _pipeline_bound.
            bubble = (pp - 1) * per_mb / v
            margin = 0.0 if cand.schedule is Schedule.GPIPE else BUBBLE_BOUND_MARGIN
            pipe = max(pipe, m * per_mb + bubble * (1 - margin))
            if v == 1:
                pipe = max(pipe, pp * per_mb / (1 - (1 - 1 / m) ** pp))
        params = t.params / pp
        # Every chunk holds at least one micro-batch of activations at its peak.
        return pipe + self._other_bound(cand, t), self._static_bytes(cand, params) + b * t.act_bytes / pp + self._reserve()

    def _other_bound(self, cand: Candidate, t: _Totals) -> float:
        """Bounds on the pipeline sends, exposed DP communication and optimizer step."""
        pp, b, m, v = cand.pp, cand.micro_batch_size, cand.num_microbatches, cand.virtual_stages
        pp_comm = 0.0
        if pp > 1:
            lat, bw = self.cluster.link(cand.tp * pp > self.cluster.gpus_per_node)
            split = cand.sequence_parallel or self.opts.pp_scatter_gather
            size = t.boundary_bytes * b / (cand.tp if split else 1)
            pp_comm = 2 * (m * v + pp - 1) * (lat + size / (bw * self.opts.p2p_efficiency))
        params = t.params / pp
        return pp_comm + self._dp_bound(cand, params, b * t.time_s / pp) + self._opt_s(cand, params)

    # _pipeline_bound: a perfectly balanced split takes m T + (p - 1) T / v (T
    # the mean rank's micro-batch time; Narayanan et al. 2021 §2.2). GPipe's
    # DAG is sum_c T_c + (m - 1) max_c T_c (tests/test_pipeline.py), never below
    # it. 1F1B and interleaved DAGs of uneven splits can fill and drain faster
    # than the balanced bubble (by up to 14% and 31% of it on every candidate
    # of the test problems), so their bubble counts less BUBBLE_BOUND_MARGIN,
    # with the two rigorous bounds below as floors.
    # For GPipe and 1F1B, rank d cannot start before the first
    # micro-batch's forwards on ranks < d, runs m micro-batches (m T_d), and
    # its last backward is followed by that micro-batch's backwards on ranks
    # < d: step >= sum_{c<d} T_c + m T_d for every d. Averaging these with
    # weights w_d that make every T_c's coefficient equal (w_c m + sum_{d>c}
    # w_d = K) removes the unknown split: step >= sum_c T_c / (1 - (1 - 1/m)^p).
    # It is m * mean for large m and the one-micro-batch chain for m = 1.

    def _dp_bound(self, cand: Candidate, params: float, compute_s: float) -> float:
        if cand.dp <= 1:
            return 0.0
        inter = cand.dp * cand.tp * cand.pp > self.cluster.gpus_per_node
        eff = self.opts.collective_efficiency
        grad, weight = params * C.GRAD_BYTES, params * C.PARAM_BYTES

        def coll(nbytes: float, kind: str) -> float:
            return collective_s(nbytes, cand.dp, 1, inter, self.cluster, eff, kind)

        # The exact model's overlap window is a rank's backward of one micro-batch
        # (all its micro-batches under FSDP); the mean fwd+bwd bounds it above.
        if cand.zero_stage == 0:
            reduce_s, gather_s, window = coll(grad, "all_reduce"), 0.0, compute_s
        elif cand.zero_stage == 1:
            reduce_s, gather_s, window = coll(grad, "reduce_scatter"), coll(weight, "all_gather"), compute_s
        else:
            m = cand.num_microbatches
            reduce_s = m * (coll(grad, "reduce_scatter") + 2 * coll(weight, "all_gather"))
            gather_s, window = 0.0, m * compute_s
        if not self.opts.overlap_dp_comm:
            return reduce_s + gather_s
        return max(0.0, reduce_s - window) + gather_s

    def _opt_s(self, cand: Candidate, params: float) -> float:
        shard = cand.dp if cand.zero_stage >= 1 else 1
        hbm = self.cluster.device.hbm_bytes_per_s * self.opts.memory_efficiency
        return params / shard * C.OPTIMIZER_TRAFFIC_BYTES_PER_PARAM / hbm

    @staticmethod
    def _bytes_per_param(cand: Candidate) -> tuple[float, float]:
        """(weights + grads, optimizer) bytes per parameter under the candidate's ZeRO stage."""
        all_shard = cand.dp if cand.zero_stage >= 3 else 1
        opt_shard = cand.dp if cand.zero_stage >= 1 else 1
        return (C.PARAM_BYTES + C.GRAD_BYTES) / all_shard, C.OPTIMIZER_BYTES / opt_shard

    def _static_bytes(self, cand: Candidate, params: float) -> float:
        wg, opt = self._bytes_per_param(cand)
        return params * (wg + opt)

    def _reserve(self) -> float:
        dev = self.cluster.device
        return dev.context_bytes + C.ALLOCATOR_FRAGMENTATION * dev.memory_bytes

    # --- exact costing ------------------------------------------------------
    def _split(self, cand: Candidate, mode: str) -> SplitSolution:
        """The ILP split for one mode of [Note: split modes]."""
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        chunks = cand.pp * cand.virtual_stages  # each chunk is a "device" of the split problem
        if mode == "chunk":
            key = (cand.tp, cand.sequence_parallel, cand.recompute, chunks)
            problem = SplitProblem(
                time_s=t.split_time_s, weight_bytes=(0.0,) * len(t.costs), act_bytes=(0.0,) * len(t.costs),
                num_devices=chunks, virtual_stages=1, inflight=(1.0,) * chunks, capacity_bytes=math.inf)
        else:
            wg, opt = self._bytes_per_param(cand)
            b = cand.micro_batch_size
            inflight = inflight_per_chunk(cand.schedule, cand.pp, cand.virtual_stages, cand.num_microbatches)
            capacity = self.cluster.device.memory_bytes - self._reserve() - max(b * c.work_bytes for c in t.costs)
            capacity /= cand.virtual_stages  # each of a rank's v chunks gets an equal share: safe
            if capacity <= 0:  # the reserve and one layer's work space alone overflow: nothing fits
                return self._split(cand, "chunk")
            problem = SplitProblem(
                time_s=t.split_time_s, weight_bytes=tuple(c.params * (wg + opt) for c in t.costs),
                act_bytes=tuple(b * c.act_bytes for c in t.costs), num_devices=chunks, virtual_stages=1,
                inflight=inflight, capacity_bytes=capacity)
            key = problem
        if key not in self._splits:
            self._splits[key] = solve_split(problem, solver=self.split_solver)
            self.split_solves += 1
        return self._splits[key]

    def plan_for(self, cand: Candidate, split: SplitSolution) -> Plan:
        bounds = [*split.boundaries, len(self.names)]
        stages = tuple(StagePlan(index=c, layers=self.names[bounds[c]:bounds[c + 1]])
                       for c in range(len(split.boundaries)))
        return Plan(dp=cand.dp, tp=cand.tp, pp=cand.pp, micro_batch_size=cand.micro_batch_size,
                    num_microbatches=cand.num_microbatches, schedule=cand.schedule,
                    virtual_stages=cand.virtual_stages, recompute=cand.recompute, zero_stage=cand.zero_stage,
                    sequence_parallel=cand.sequence_parallel, stages=stages, global_batch_size=self.batch,
                    seq_len=self.profile.seq_len, model=self.profile.name,
                    tp_inter_node=cand.tp > self.cluster.gpus_per_node)

    def evaluate(self, cand: Candidate, prune_above: float | None = None) -> Evaluated | None:
        """Cost ``cand`` with the best of its split modes: see [Note: split modes].

        With ``prune_above``, return None when no mode can beat that step time
        (checked on each split before its DAG runs); only full results are kept.
        """
        if cand in self._evals:
            return self._evals[cand]
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        result, pruned = None, False
        for mode in SPLIT_MODES:
            split = self._split(cand, mode)
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

    def split_bound(self, cand: Candidate) -> float:
        """A step time no split of ``cand`` beats: m micro-batches on the busiest rank of the
        split that minimises the busiest rank (memory ignored; cached per TP and pipeline shape),
        plus the other terms' bounds."""
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        key = ("rank_time", cand.tp, cand.sequence_parallel, cand.recompute, cand.pp, cand.virtual_stages)
        if key not in self._splits:
            chunks = cand.pp * cand.virtual_stages
            self._splits[key] = solve_split(SplitProblem(
                time_s=t.split_time_s, weight_bytes=(0.0,) * len(t.costs), act_bytes=(0.0,) * len(t.costs),
                num_devices=cand.pp, virtual_stages=cand.virtual_stages, inflight=(1.0,) * chunks,
                capacity_bytes=math.inf), solver=self.split_solver)
            self.split_solves += 1
        pipe = cand.num_microbatches * cand.micro_batch_size * self._splits[key].bottleneck_s
        return pipe + self._other_bound(cand, t)

def _better(a: Evaluated | None, b: Evaluated) -> bool:
    """Is ``b`` better than ``a``? Fitting first, then faster, then less over, then field order."""
    if a is None:
        return True
    if a.cost.fits != b.cost.fits:
        return b.cost.fits
    if not b.cost.fits:
        return (b.cost.over_bytes, b.candidate) < (a.cost.over_bytes, a.candidate)
    return (b.cost.step_time_s, b.candidate) < (a.cost.step_time_s, a.candidate)


def scan_candidates(planner: Planner, ordered: list[tuple[float, float, Candidate]], capacity: float,
          budget: int | None = None) -> tuple[Evaluated | None, Evaluated | None, int, int, int]:
    """Visit candidates in bound order: (best fitting, least over, evaluated, pruned by bound, by memory).

    Three bounds prune, cheapest first: the candidate's balanced bound (the
    order), its split bound (the busiest rank of the best possible split), and
    inside evaluate the busiest rank of each actual split.
    """
    best = least_over = None
    evaluated = pruned_memory = pruned_split = 0
    for i, (time_lb, mem_lb, cand) in enumerate(ordered):
        if best is not None and time_lb >= best.cost.step_time_s:
            return best, least_over, evaluated, len(ordered) - i + pruned_split, pruned_memory
        if budget is not None and (evaluated >= 2 * budget or (best is not None and evaluated >= budget)):
            break
        if mem_lb > capacity and (least_over is not None or best is not None):
            pruned_memory += 1
            continue
        limit = best.cost.step_time_s if best is not None else None
        # The split bound needs an ILP when v > 1; there the floor inside evaluate,
        # on the cached balanced-chunk split, prunes as well and costs less.
        if limit is not None and cand.pp > 1 and cand.virtual_stages == 1 and planner.split_bound(cand) >= limit:
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
           opts: CostOptions | None = None, alternatives: bool = True, split_solver: str = "auto") -> SearchResult:
    """Plan ``profile`` on ``cluster``: see [Note: search].

    Raises:
        AutoparError: no layout exists (pins, batch), or nothing fits in memory and
            nothing was pinned (the message gives the fewest GPUs that could fit).
    """
    start = time.perf_counter()
    pins = pins or Pins()
    planner = Planner(profile, cluster, global_batch_size=global_batch_size, pins=pins, opts=opts,
                      split_solver=split_solver)
    cands = enumerate_candidates(profile, cluster, global_batch_size=global_batch_size, pins=pins)
    ordered = sorted((*planner.lower_bound(c), c) for c in cands)
    capacity = cluster.device.memory_bytes
    best, least_over, evaluated, pruned_bound, pruned_mem = scan_candidates(planner, ordered, capacity)
    if best is None:
        if least_over is None:
            least_over = planner.evaluate(min(ordered, key=lambda x: (x[1], x[2]))[2])
        if not _pinned(pins):
            raise AutoparError(_does_not_fit(profile, cluster, least_over, global_batch_size))
        best = least_over
    planning_s = time.perf_counter() - start
    from autopar.plan.alternatives import best_alternatives

    alts = best_alternatives(planner, ordered, best, capacity) if alternatives else ()
    return SearchResult(
        best=best, alternatives=alts, planning_time_s=planning_s, candidates=len(cands),
        evaluated=evaluated, pruned_by_bound=pruned_bound, pruned_by_memory=pruned_mem,
        split_solves=planner.split_solves, alternatives_time_s=time.perf_counter() - start - planning_s)


def _pinned(pins: Pins) -> bool:
    return any(getattr(pins, f) is not None for f in
               ("dp", "tp", "pp", "micro_batch_size", "virtual_stages", "schedule", "recompute", "zero_stage"))


def _does_not_fit(profile: ModelProfile, cluster: ClusterSpec, least: Evaluated, batch: int) -> str:
    gib = 1024**3
    need = max(s.peak_bytes for s in least.cost.stages)
    fewest = _fewest_gpus(profile, cluster, batch)
    where = f"at least {fewest} GPUs" if fewest else "a device with more memory"
    return (f"{profile.name} fits no layout of {cluster.world_size} x {cluster.device.name}: the leanest "
            f"({least.plan.describe()}) needs {need / gib:.1f} GiB per GPU, the device has "
            f"{cluster.device.memory_bytes / gib:.0f} GiB; use {where}, or a smaller --global-batch/--seq-len")


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
