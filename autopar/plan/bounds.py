"""The planner's bounds: a step time and a peak memory that no stage split of a candidate beats.

Every bound is the cost model's own terms (autopar.cost) with relaxed inputs: the per-layer costs no
micro-batch beats (``layer_costs(micro_batch_size=None)``), the mean pipeline rank, the least a split can
put before a rank; [Note: pipeline bound] and [Note: memory bound] give the arguments, and
tests/test_search.py checks every bound against the exact cost of every candidate of its problems. The
search (autopar.plan.search) orders candidates by ``lower_bound`` and skips any whose bound reaches the
step it must beat.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from autopar.cost import constants as C
from autopar.cost.data_parallel import dp_bytes_per_param, dp_exposed_s, optimizer_rate, optimizer_step_s
from autopar.cost.layers import LayerCost, collective_s, layer_costs
from autopar.cost.model import _chunk_fwd_bwd, costs_for_micro_batch, inflight_per_chunk
from autopar.plan.space import Candidate
from autopar.plan.split import SplitProblem, SplitSolution, solve_split
from autopar.plan.types import Schedule


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
    prefix_s: tuple[float, ...] = ()
    """Sums of split_time_s over the first d layers, d = 0..L."""
    layer_types: "np.ndarray | None" = None
    """(params, activation bytes, count) of each distinct layer, for the memory bound (filled on first use)."""
    memory_prefix: "tuple[np.ndarray, np.ndarray] | None" = None
    """Prefix sums of the layers' parameters (tied ones left out) and activation bytes (filled on first use)."""


class PlannerBounds:
    """The bounds of autopar.plan.search.Planner (which holds the caches they use)."""

    def totals(self, tp: int, sp: bool, recompute) -> _Totals:
        key = (tp, sp, recompute)
        if key not in self._totals:
            costs = layer_costs(self.profile, self.cluster, tp=tp, sequence_parallel=sp,
                                recompute=recompute, opts=self.opts)
            _, bw = self.cluster.link(tp > self.cluster.gpus_per_node)
            ring = 2 * (tp - 1) / tp / (bw * self.opts.collective_efficiency) if tp > 1 else 0.0
            split_time_s = tuple(c.fwd_s + c.bwd_s + c.tp_bytes * ring for c in costs)
            self._totals[key] = _Totals(
                costs=costs, time_s=sum(c.fwd_s + c.bwd_s for c in costs),
                tp_bytes=sum(c.tp_bytes for c in costs), tp_calls=sum(c.tp_collectives for c in costs),
                params=sum(c.params for c in costs if c.tied_to is None), act_bytes=sum(c.act_bytes for c in costs),
                boundary_bytes=min(c.output_bytes for c in costs[:-1]) if len(costs) > 1 else 0.0,
                split_time_s=split_time_s, prefix_s=tuple(itertools.accumulate(split_time_s, initial=0.0)))
        return self._totals[key]

    def lower_bound(self, cand: Candidate) -> tuple[float, float]:
        """(step time, peak memory) no split of this candidate can beat."""
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        pp, b, m, v = cand.pp, cand.micro_batch_size, cand.num_microbatches, cand.virtual_stages
        tp_inter = cand.tp > self.cluster.gpus_per_node
        tp_s = collective_s(b * t.tp_bytes / pp, cand.tp, t.tp_calls // pp, tp_inter, self.cluster,
                            self.opts.collective_efficiency)
        per_mb = b * t.time_s / pp + tp_s  # the mean rank's micro-batch: no split's ranks all beat it
        pipe = self._pipeline_bound(cand, t, per_mb)
        params = t.params / pp
        # Every chunk holds at least one micro-batch of activations at its peak. The exposed data-parallel
        # time is left out here (its bound costs more than the rest): step_bound adds it.
        return pipe + self._rest_bound(cand, t), self._static_bytes(cand, params) + b * t.act_bytes / pp + self._reserve()

    def step_bound(self, cand: Candidate, time_lb: float) -> float:
        """``lower_bound``'s time ``time_lb`` plus the exposed data-parallel time no split beats."""
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        return time_lb + self._dp_bound(cand, t.params / cand.pp, cand.micro_batch_size * t.time_s / cand.pp)

    def memory_bound(self, cand: Candidate) -> float:
        """A peak memory no split of ``cand`` gets under, tighter than ``lower_bound``'s: [Note: memory bound]."""
        key = ("memory_bound", cand.tp, cand.sequence_parallel, cand.recompute, cand.pp, cand.virtual_stages,
               cand.schedule, cand.num_microbatches, cand.micro_batch_size, self._bytes_per_param(cand))
        if key not in self._chunk_times:
            self._chunk_times[key] = self._weighted_memory(cand) + self._reserve()
        return self._chunk_times[key]

    def _weighted_memory(self, cand: Candidate) -> float:
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        if t.layer_types is None:
            seen: dict[tuple[float, float], int] = {}
            for c in t.costs:
                pair = (0.0 if c.tied_to is not None else c.params, c.act_bytes)
                seen[pair] = seen.get(pair, 0) + 1
            t.layer_types = np.array([(p, a, k) for (p, a), k in seen.items()])
        params, act, count = t.layer_types.T
        per_param, pp = self._bytes_per_param(cand), cand.pp
        held = cand.micro_batch_size * np.array(
            inflight_per_chunk(cand.schedule, pp, cand.virtual_stages, cand.num_microbatches))
        rank = np.arange(len(held)) % pp
        # per layer type and chunk: the bytes the layer costs the chunk's rank
        cost = params[:, None] * per_param + act[:, None] * held[None, :]
        main = int(np.argmax(count))  # weigh ranks to equalise the commonest layer (the blocks)
        per_rank = np.zeros(pp)
        np.add.at(per_rank, rank, cost[main])
        best = 0.0
        for weight in (np.full(pp, 1.0 / pp), (1 / per_rank) / (1 / per_rank).sum()):
            best = max(best, float((count * (weight[rank][None, :] * cost).min(axis=1)).sum()))
        return best

    # [Note: memory bound] Rank d holds at its peak M_d = sum over its chunks c
    # and their layers l of (params_l x bytes per parameter + held_c x
    # act_l), held_c the micro-batches chunk c keeps (autopar.cost.model
    # .inflight_per_chunk), plus a reserve and transients >= 0. For any weights
    # w_d >= 0 summing to 1, max_d M_d >= sum_d w_d M_d >= sum_l min_c
    # w_{rank(c)} (params_l x bytes + held_c x act_l): every layer sits on
    # some chunk. Uniform weights give the mean rank; weights inverse to a
    # rank's memory for one block equalise the blocks, which is the best for a
    # model of equal blocks (1F1B's first rank holds p micro-batches, the last
    # one). Both are tried. tests/test_search.py checks it against the exact
    # peak of every candidate of its problems.

    def _other_bound(self, cand: Candidate, t: _Totals) -> float:
        """Bounds on the pipeline sends, exposed DP communication and optimizer step."""
        return self._rest_bound(cand, t) + self._dp_bound(cand, t.params / cand.pp,
                                                          cand.micro_batch_size * t.time_s / cand.pp)

    def _rest_bound(self, cand: Candidate, t: _Totals) -> float:
        """Bounds on the pipeline sends and the optimizer step."""
        pp, b, m, v = cand.pp, cand.micro_batch_size, cand.num_microbatches, cand.virtual_stages
        pp_comm = 0.0
        if pp > 1:
            lat, bw = self.cluster.link(cand.tp * pp > self.cluster.gpus_per_node)
            split = cand.sequence_parallel or self.opts.pp_scatter_gather
            size = t.boundary_bytes * b / (cand.tp if split else 1)
            pp_comm = 2 * (m * v + pp - 1) * (lat + size / (bw * self.opts.p2p_efficiency))
        return pp_comm + self._opt_s(cand, t.params / pp)

    def _pipeline_bound(self, cand: Candidate, t: _Totals, per_mb: float) -> float:
        """A pipeline time that no stage split of ``cand`` beats: [Note: pipeline bound]."""
        pp, m, v = cand.pp, cand.num_microbatches, cand.virtual_stages
        if pp == 1:
            return m * per_mb
        if cand.schedule is Schedule.GPIPE:
            return (m - 1 + pp) * per_mb
        if v == 1:
            return pp * per_mb / (1 - (1 - 1 / m) ** pp)
        first = [cand.micro_batch_size * t.prefix_s[d] for d in range(pp)]
        return _water_level(first, m * pp * per_mb)

    # [Note: pipeline bound] Rigorous for every split, from the cost model's
    # own per-layer times (T_d: rank d's time for one micro-batch, all its
    # chunks; t_c: chunk c's; sum_d T_d >= p T, T the mean rank's):
    #  (a) rank d's first task waits for micro-batch 0's forwards on chunks
    #      0..d-1 (one per rank below d), it then runs m T_d, and after its
    #      last backward (micro-batch m-1 on chunk d) come that micro-batch's
    #      backwards on chunks d-1..0: step >= sum_{c<d} t_c + m T_d, for
    #      GPipe, 1F1B and interleaved 1F1B alike.
    #  (b) One chunk per rank (t_c = T_c): averaging (a) with weights that give
    #      every T_c the same coefficient (w_c m + sum_{d>c} w_d = K) removes
    #      the split: step >= sum_c T_c / (1 - (1 - 1/m)^p) >= p T / (...).
    #  (c) GPipe: the path through rank d's forwards and backwards of every
    #      micro-batch gives step >= sum_c T_c + (m - 1) T_d >= (m - 1 + p) T.
    #  (d) Interleaved: chunks 0..d-1 hold at least layers 0..d-1, so
    #      sum_{c<d} t_c >= A_d, the first d layers' time, and (a) with
    #      sum_d T_d = p T gives the least S with sum_d max(0, S - A_d) >= m p T
    #      (_water_level). It lacks the balanced bubble (p - 1) T / v that a
    #      real split pays; the per-split floor inside the estimate
    #      (autopar.cost.model._pipeline_floor, (a) on the actual chunks) adds it.
    # tests/test_search.py checks the bound against the exact cost of every
    # candidate of its problems (uneven interleaved splits included).

    def _dp_bound(self, cand: Candidate, params: float, compute_s: float) -> float:
        """The exact model's exposed data-parallel time (autopar.cost.data_parallel.dp_exposed_s) with relaxed
        inputs: every layer of the model on the device (the smallest unhidden piece) and the mean rank's
        forward and backward as the windows (the exact model's backward window is below it)."""
        if cand.dp <= 1:
            return 0.0
        if cand in self._dp_bounds:
            return self._dp_bounds[cand]
        inter = cand.dp * cand.tp * cand.pp > self.cluster.gpus_per_node
        eff = self.opts.collective_efficiency

        def coll(nbytes: float, kind: str, calls: int) -> float:
            return collective_s(nbytes, cand.dp, 1, inter, self.cluster, eff, kind)  # latency of one call

        self._dp_bounds[cand] = dp_exposed_s(
            cand, params=params, layers=len(self.names), bwd_window_s=compute_s, compute_s=compute_s, coll=coll,
            overlap=self.opts.overlap_dp_comm, reduce_bytes=self.opts.dp_reduce_bytes,
            reduce_calls=self.opts.dp_reduce_calls)
        return self._dp_bounds[cand]

    def _opt_s(self, cand: Candidate, params: float) -> float:
        rate = optimizer_rate(self.cluster.device, self.opts.memory_efficiency)  # no per-tensor cost: a bound
        return optimizer_step_s(cand, params, rate, fused=self.opts.optimizer_fused)

    @staticmethod
    def _bytes_per_param(cand: Candidate) -> float:
        """Bytes per parameter at the peak that scale with the device's parameters (autopar.cost.data_parallel
        .dp_bytes_per_param: held state and the data-parallel wrapper's full-size copies)."""
        return _bytes_per_param(cand.dp, cand.tp, cand.zero_stage, cand.pp, cand.precision)

    def _static_bytes(self, cand: Candidate, params: float) -> float:
        return params * self._bytes_per_param(cand)

    def _reserve(self) -> float:
        dev = self.cluster.device
        return dev.context_bytes + C.ALLOCATOR_FRAGMENTATION * dev.memory_bytes

    def _chunk_floor(self, cand: Candidate, split: SplitSolution) -> float:
        """[Note: pipeline bound] (a) on ``split``'s chunks: the estimate's pipeline time is never below it."""
        key = ("chunk_s", split.boundaries, cand.tp, cand.sequence_parallel, cand.recompute, cand.micro_batch_size,
               cand.dp, cand.zero_stage)  # the layout's fixed cost per block depends on these too
        if key not in self._chunk_times:
            t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
            costs = costs_for_micro_batch(t.costs, self.profile, self.cluster, cand, self.opts)
            bounds = [*split.boundaries, len(self.names)]
            inter = cand.tp > self.cluster.gpus_per_node
            self._chunk_times[key] = [sum(_chunk_fwd_bwd(costs[a:b], cand, self.cluster, self.opts, inter)[:2])
                                      for a, b in zip(bounds, bounds[1:])]
        times, pp, m = self._chunk_times[key], cand.pp, cand.num_microbatches
        floor, before = 0.0, 0.0
        for rank in range(pp):
            floor = max(floor, before + m * sum(times[rank::pp]))
            before += times[rank]
        return floor

    def memory_floor(self, cand: Candidate, split: SplitSolution) -> float:
        """The estimate's peak memory on ``split`` without its transients (each >= 0): the worst rank's
        parameters x bytes per parameter (tied weights left out) plus its chunks' held activations, and the
        reserve. A split over capacity by this does not fit."""
        t = self.totals(cand.tp, cand.sequence_parallel, cand.recompute)
        if t.memory_prefix is None:
            t.memory_prefix = (np.concatenate(([0.0], np.cumsum([0.0 if c.tied_to else c.params for c in t.costs]))),
                               np.concatenate(([0.0], np.cumsum([c.act_bytes for c in t.costs]))))
        params, act = t.memory_prefix
        starts = np.array(split.boundaries)
        ends = np.append(starts[1:], len(t.costs))
        held = cand.micro_batch_size * np.array(
            inflight_per_chunk(cand.schedule, cand.pp, cand.virtual_stages, cand.num_microbatches))
        chunk = (params[ends] - params[starts]) * self._bytes_per_param(cand) + held * (act[ends] - act[starts])
        return float(np.bincount(np.arange(len(starts)) % cand.pp, weights=chunk).max()) + self._reserve()

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


def _water_level(floors: list[float], volume: float) -> float:
    """The least S with sum_d max(0, S - floors[d]) >= volume (floors increasing): [Note: pipeline bound] (d)."""
    total = 0.0
    for k, floor in enumerate(floors):
        total += floor
        level = (volume + total) / (k + 1)
        if k + 1 == len(floors) or level <= floors[k + 1]:
            return level
    return floors[-1]


@lru_cache(maxsize=1024)
def _bytes_per_param(dp: int, tp: int, zero_stage: int, pp: int, precision) -> float:
    """PlannerBounds._bytes_per_param for one (dp, tp, ZeRO stage, pp, precision), cached: the planner asks per
    candidate."""
    from types import SimpleNamespace

    layout = SimpleNamespace(dp=dp, tp=tp, zero_stage=zero_stage, pp=pp, precision=precision)
    return sum(dp_bytes_per_param(layout).values())
