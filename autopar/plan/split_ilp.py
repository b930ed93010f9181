"""The stage-split ILP in PuLP (HiGHS in-process, or CBC): the general form.

Split out of autopar.plan.split, which holds the problem types, the exact
chain DP and the solver dispatch; the formulation is in docs/split-ilp.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import pulp

from autopar.plan.split import (MIP_GAP, TIE_RTOL, SplitProblem, SplitTimeLimitError, _even_starts,
                                chunk_layers, evaluate_split)


class _Run(NamedTuple):
    """Consecutive identical layers (equal time, weight and activation bytes)."""

    start: int
    length: int
    time_s: float
    weight_bytes: float
    act_bytes: float


def _runs(problem: SplitProblem) -> list[_Run]:
    """Maximal runs of identical consecutive layers."""
    keys = list(zip(problem.time_s, problem.weight_bytes, problem.act_bytes))
    runs: list[_Run] = []
    for i, key in enumerate(keys):
        if runs and keys[i - 1] == key:
            runs[-1] = runs[-1]._replace(length=runs[-1].length + 1)
        else:
            runs.append(_Run(i, 1, *key))
    return runs


@dataclass(frozen=True)
class _Model:
    """The ILP of docs/split-ilp.md. prefix[c + 1][r] counts layers of run r in chunks
    <= c (prefix[0] is zeros); largest["time"/"memory"] bound every device's load, in
    ``units`` (seconds or bytes per model unit); overflow is the capacity rows' slack."""

    lp: pulp.LpProblem
    prefix: list[list[pulp.LpVariable | int]]
    largest: dict[str, pulp.LpVariable]
    units: dict[str, float]
    overflow: pulp.LpVariable


def solve_ilp(problem: SplitProblem, solver: str, deadline: float) -> tuple[int, ...]:
    """Objectives 1 and 2 by MIP solves, often one (docs/split-ilp.md, "Solves")."""
    runs = _runs(problem)
    model = _build_model(problem, runs)
    slowest, largest = model.largest["time"], model.largest["memory"]
    least_bytes = _memory_lower_bound(problem, runs)
    largest.lowBound = least_bytes / model.units["memory"]
    if least_bytes <= problem.capacity_bytes:  # some split may fit
        tie_break = _distance_to_even(model, problem)
        lower = _time_lower_bound(problem, runs)
        slowest.lowBound = lower / model.units["time"]
        bounds = _tie_break(problem, runs, model, tie_break, lower, solver, deadline)
        if bounds is not None:
            return bounds
        slowest.upBound = None  # the lower bound is not reached, or nothing fits
        model.lp.setObjective(pulp.lpSum(slowest))
        if _run_mip(model.lp, solver, deadline, "bottleneck") == pulp.LpStatusOptimal:
            best = _read_boundaries(problem, runs, model)
            limit_s = evaluate_split(problem, best).bottleneck_s  # exact: solvers print ~8 digits
            return _tie_break(problem, runs, model, tie_break, limit_s, solver, deadline) or best
    slowest.upBound = None  # nothing fits: minimise the largest device
    model.overflow.upBound = None
    model.lp.setObjective(pulp.lpSum(largest))
    _run_mip(model.lp, solver, deadline, "largest memory", must_solve=True)
    return _read_boundaries(problem, runs, model)


def _tie_break(problem: SplitProblem, runs: list[_Run], model: _Model,
               tie_break: pulp.LpAffineExpression, limit_s: float, solver: str,
               deadline: float) -> tuple[int, ...] | None:
    """The closest-to-even split with bottleneck <= limit_s (+ TIE_RTOL); None if the
    solver finds none or its split is over by more (its feasibility tolerance is ~1e-6)."""
    model.largest["time"].upBound = limit_s / model.units["time"] * (1 + TIE_RTOL)
    model.lp.setObjective(tie_break)
    if _run_mip(model.lp, solver, deadline, "tie-break") != pulp.LpStatusOptimal:
        return None
    bounds = _read_boundaries(problem, runs, model)
    over = evaluate_split(problem, bounds).bottleneck_s > limit_s * (1 + TIE_RTOL)
    return None if over else bounds


def _time_lower_bound(problem: SplitProblem, runs: list[_Run]) -> float:
    """A valid lower bound on the bottleneck that knows layers are indivisible.

    Relaxation: the run with the most total time keeps whole layers (k_d on device
    d), every other layer is fluid except layers 0 and L-1, pinned to devices 0 and
    (C-1) % pp. So T >= total / pp and sum_d floor((T - pin_d) / t) >= m. The LP
    bound alone is total / pp, and the MIP then spends 100s of ms on the gap.
    """
    pp, L = problem.num_devices, problem.num_layers
    bound = max(math.fsum(problem.time_s) / pp, max(problem.time_s))
    big = max(runs, key=lambda run: run.length * run.time_s)
    if big.length == 1 or big.time_s == 0:
        return bound
    pins = [0.0] * pp
    for layer, device in ((0, 0), (L - 1, (problem.num_chunks - 1) % pp)):
        if not big.start <= layer < big.start + big.length:
            pins[device] += problem.time_s[layer]
    whole = [lambda T, p=p: math.floor((T - p) / big.time_s + 1e-9) for p in pins]
    while sum(max(0, f(bound)) for f in whole) < big.length:  # next step of the floors
        bound = min((f(bound) + 1) * big.time_s + p for f, p in zip(whole, pins))
    return bound


def _memory_lower_bound(problem: SplitProblem, runs: list[_Run]) -> float:
    """A valid lower bound on the largest device memory, in bytes.

    On device d every layer costs at least w + f_d * a (f_d: least in-flight count of
    its chunks), plus (f_c - f_d) * amin_c for each chunk c, amin_c being the least
    act_bytes chunk c can hold (it is non-empty). As in _time_lower_bound the
    costliest run keeps whole layers, layers 0 and L-1 are pinned, the rest is fluid
    at its cheapest; the least feasible peak M is found by bisection.
    """
    pp, L, C = problem.num_devices, problem.num_layers, problem.num_chunks
    f, w, a = problem.inflight, problem.weight_bytes, problem.act_bytes
    least = [min(f[d::pp]) for d in range(pp)]
    base = [problem.fixed_bytes[d] + math.fsum((f[c] - least[d]) * min(a[c:L - C + c + 1])
                                               for c in range(d, C, pp)) for d in range(pp)]
    big = max(runs, key=lambda run: run.length * (run.weight_bytes + min(least) * run.act_bytes))
    whole = range(big.start, big.start + big.length)
    for layer, d in ((0, 0), (L - 1, (C - 1) % pp)):
        base[d] += 0.0 if layer in whole else w[layer] + least[d] * a[layer]
    fluid = math.fsum(w[i] + min(least) * a[i] for i in range(1, L - 1) if i not in whole)
    unit = sorted((big.weight_bytes + least[d] * big.act_bytes, base[d]) for d in range(pp))

    def feasible(peak: float) -> bool:  # fill the cheapest devices with whole layers first
        left, spare = big.length, pp * peak - math.fsum(base) - fluid
        for cost, floor_bytes in unit:
            k = left if cost == 0 else min(left, math.floor((peak - floor_bytes) / cost))
            left, spare = left - k, spare - k * cost
        return left == 0 and spare >= 0

    lo, hi = max(base), max(base) + math.fsum(w) + max(f) * math.fsum(a) + 1.0
    while hi - lo > 1e-12 * hi:
        lo, hi = (lo, (lo + hi) / 2) if feasible((lo + hi) / 2) else ((lo + hi) / 2, hi)
    return lo


def _build_model(problem: SplitProblem, runs: list[_Run]) -> _Model:
    """Prefix-count variables, contiguity, and the device time and memory rows."""
    L, C = problem.num_layers, problem.num_chunks
    lp = pulp.LpProblem("stage_split", pulp.LpMinimize)
    prefix: list[list] = [[0] * len(runs)]
    for c in range(C - 1):  # chunk c ends at layer >= c + 1 and leaves >= C-1-c layers
        prefix.append([_bounded_int(lp, f"q_{c}_{r}", c + 1 - run.start,
                                    L - (C - 1 - c) - run.start, run.length)
                       for r, run in enumerate(runs)])
    prefix.append([run.length for run in runs])
    for c in range(C):
        now, before = prefix[c + 1], prefix[c]
        for r in range(len(runs)):
            _add(lp, now[r] >= before[r])  # counts are cumulative
        _add(lp, pulp.lpSum(now) - pulp.lpSum(before) >= 1)  # chunk c is non-empty
        _add_contiguity(lp, c, runs, now)
    cap, pp = problem.capacity_bytes, problem.num_devices
    spread = (math.fsum(problem.weight_bytes) + max(problem.inflight)
              * math.fsum(problem.act_bytes)) / pp  # a device's share, if no capacity
    units = {"time": max(math.fsum(problem.time_s) / pp, 1e-300),
             "memory": cap if math.isfinite(cap) else max(spread, 1.0)}
    largest = {kind: _new_var(lp, f"largest_{kind}") for kind in units}
    model = _Model(lp, prefix, largest, units, _new_var(lp, "overflow", 0, 0))
    _add_device_rows(model, problem, runs)
    return model


def _new_var(lp: pulp.LpProblem, name: str, low: float | None = None,
             high: float | None = None, cat: str = pulp.LpContinuous) -> pulp.LpVariable:
    """A variable of ``lp`` (PuLP >= 3.3 spells it add_variable; older has LpVariable)."""
    make = getattr(lp, "add_variable", None)
    return make(name, low, high, cat) if make else pulp.LpVariable(name, low, high, cat)


def _bounded_int(lp: pulp.LpProblem, name: str, low: int, high: int,
                 length: int) -> pulp.LpVariable | int:
    """An integer in [low, high] clamped to [0, length], or the constant if fixed."""
    low, high = min(max(low, 0), length), min(max(high, 0), length)
    return low if low == high else _new_var(lp, name, low, high, pulp.LpInteger)


def _add_contiguity(lp: pulp.LpProblem, c: int, runs: list[_Run], now: list) -> None:
    """Layers in chunks <= c form a prefix: run r + 1 starts only once run r is complete.

    done = 1 means "run r complete by chunk c"; for a one-layer run the prefix
    count is that binary itself (the y[i, c] prefix formulation).
    """
    low = [x if isinstance(x, int) else x.lowBound for x in now]
    high = [x if isinstance(x, int) else x.upBound for x in now]
    for r in range(len(runs) - 1):
        length = runs[r].length
        if length == 1:
            done = now[r]
        elif high[r] < length or low[r + 1] > 0:
            done = int(low[r + 1] > 0)  # forced either way
        else:
            done = _new_var(lp, f"done_{c}_{r}", 0, 1, pulp.LpInteger)
        _add(lp, now[r] >= length * done)
        _add(lp, now[r + 1] <= runs[r + 1].length * done)


def _add(lp: pulp.LpProblem, constraint: pulp.LpConstraint | bool) -> None:
    """Add a constraint; one between constants is checked instead."""
    if constraint is False:
        raise RuntimeError("split ILP: a constant constraint is violated; this is a bug")
    if constraint is not True:
        lp.addConstraint(constraint)


def _add_device_rows(model: _Model, problem: SplitProblem, runs: list[_Run]) -> None:
    """Per device: time <= largest time; memory <= largest memory and <= capacity.

    Time goes through integer per-device run counts n_d_r, on which the MIP
    branches: the bottleneck depends on them alone, not on the chunking.
    """
    pp, units, prefix = problem.num_devices, model.units, model.prefix
    counts: list[list[list]] = [[[] for _ in runs] for _ in range(pp)]
    mems: list[list] = [[problem.fixed_bytes[d] / units["memory"]] for d in range(pp)]
    for c in range(problem.num_chunks):
        for r, run in enumerate(runs):
            n = prefix[c + 1][r] - prefix[c][r]  # layers of run r in chunk c
            counts[c % pp][r].append(n)
            per_layer = run.weight_bytes + problem.inflight[c] * run.act_bytes
            mems[c % pp].append(per_layer / units["memory"] * n)
    for d in range(pp):
        terms = []
        for r, run in enumerate(runs):
            n = pulp.lpSum(counts[d][r])
            if not n.isNumericalConstant() and run.time_s > 0:
                total, n = n, _new_var(model.lp, f"n_{d}_{r}", 0, run.length, pulp.LpInteger)
                model.lp.addConstraint(n == total, f"count_{d}_{r}")
            terms.append(run.time_s / units["time"] * n)
        model.lp.addConstraint(pulp.lpSum(terms) <= model.largest["time"], f"time_{d}")
        memory = pulp.lpSum(mems[d])
        model.lp.addConstraint(memory <= model.largest["memory"], f"memory_{d}")
        if math.isfinite(problem.capacity_bytes):
            model.lp.addConstraint(memory <= 1 + model.overflow, f"capacity_{d}")


def _distance_to_even(model: _Model, problem: SplitProblem) -> pulp.LpAffineExpression:
    """Objective 2: sum over chunks of |start - c * L // C| (integer valued)."""
    terms = []
    for c, even in enumerate(_even_starts(problem)[1:], start=1):
        start = pulp.lpSum(model.prefix[c])  # layers in chunks <= c - 1
        gap = _new_var(model.lp, f"gap_{c}", 0)
        model.lp.addConstraint(gap >= start - even, f"gap_up_{c}")
        model.lp.addConstraint(gap >= even - start, f"gap_down_{c}")
        terms.append(gap)
    return pulp.lpSum(terms)


def mip_solver(solver: str, time_limit_s: float | None) -> pulp.LpSolver:
    """A PuLP solver proving optimality to MIP_GAP, quietly."""
    tol = dict(gapRel=MIP_GAP, gapAbs=MIP_GAP, timeLimit=time_limit_s, msg=False)
    if solver == "highs":  # deterministic whatever its thread count
        return pulp.HiGHS(**tol, mip_heuristic_run_feasibility_jump=False)  # ~4 ms, no gain
    # Not "threads 1": CBC then runs its parallel code with one worker, which hung
    # until the time limit in about 1 solve in 2000 here. Its default is serial.
    return pulp.PULP_CBC_CMD(**tol)


@contextlib.contextmanager
def _quiet_c_stdout():
    """Send file descriptor 1 to /dev/null: HiGHS prints its banner from C, once per
    process, before any option can silence it, and it would break `explain --json`."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


def _run_mip(lp: pulp.LpProblem, solver: str, deadline: float, phase: str, *,
             must_solve: bool = False) -> int:
    """Solve to proven optimality; returns Optimal, or Infeasible unless must_solve."""
    status = pulp.LpStatusNotSolved
    if time.perf_counter() < deadline:
        try:
            with _quiet_c_stdout():
                status = lp.solve(mip_solver(solver, deadline - time.perf_counter()))
        except pulp.PulpSolverError as exc:
            raise RuntimeError(f"split ILP solver {solver!r} failed: {exc}") from exc
        if lp.sol_status == pulp.LpSolutionOptimal or status == pulp.LpStatusInfeasible:
            if status == pulp.LpStatusOptimal or not must_solve:
                return status
            raise RuntimeError(f"split ILP {phase} phase is infeasible; this is a bug")
    if time.perf_counter() >= deadline - 1e-3 or lp.sol_status == pulp.LpSolutionIntegerFeasible:
        raise SplitTimeLimitError(
            f"the stage-split ILP ({len(lp.variables())} variables) did not prove its "
            f"{phase} optimal within time_limit_s; raise time_limit_s or use fewer chunks")
    raise RuntimeError(f"split ILP solver {solver!r} returned {pulp.LpStatus[status]!r} "
                       f"in the {phase} phase; this is a bug")


def _read_boundaries(problem: SplitProblem, runs: list[_Run], model: _Model) -> tuple[int, ...]:
    """Chunk starts from the prefix counts, checked against the run layout."""
    counts = [[round(pulp.value(q)) for q in row] for row in model.prefix]
    bounds = tuple(sum(row) for row in counts[:-1])
    for row, end in zip(counts[1:], bounds[1:] + (problem.num_layers,)):
        if row != [min(max(end - run.start, 0), run.length) for run in runs]:
            raise RuntimeError(f"split ILP returned non-contiguous counts {row}; this is a bug")
    chunk_layers(bounds, problem.num_layers)
    return bounds
