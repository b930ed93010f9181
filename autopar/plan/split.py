"""Pipeline stage split: cut an ordered list of layers into pp * v contiguous chunks.

Chunk c runs on pipeline rank c % pp (interleaved placement, Narayanan et al.
2021 §2.2.2). The split minimises the bottleneck rank time under a per-rank
memory capacity. The formulation, its tractability and the oracle tests are in
docs/split-ilp.md.

[Note: split objective and tie-break]
Objectives are applied in order, each one optimal given the ones before:
  1. fits (every rank within capacity_bytes): least bottleneck seconds;
     nothing fits: least largest-rank bytes (so the overflow shown is minimal);
  2. least sum of chunk start indices (cuts as early as possible);
  3. dp path: lexicographically earliest boundaries; ILP path: the solver's own
     choice, deterministic for a given solver version (threads=1, no time limit hit).
A solve that hits time_limit_s raises instead of returning a speed-dependent split.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pulp

from autopar.errors import AutoparError

SOLVERS = ("auto", "highs", "cbc", "dp")
"""Accepted ``solver`` names; "dp" is exact for virtual_stages == 1 only."""
MIP_TOL = 1e-10
"""Gap and feasibility tolerance (in scaled units, ~relative) asked of both MIP
solvers, so that their optima agree with the brute-force oracle to 1e-9."""


TIE_RTOL = 1e-10
"""The tie-break phase keeps the first objective within this relative slack of its
optimum (exact, from the first phase's split): room for the solver's rounding."""


class SplitTimeLimitError(AutoparError):
    """The ILP did not prove optimality within ``time_limit_s``."""


@dataclass(frozen=True, kw_only=True)
class SplitProblem:
    """Layers, in model order, to cut into num_devices * virtual_stages chunks."""

    time_s: tuple[float, ...]
    """Seconds per micro-batch (forward + backward) of each layer on its device."""
    weight_bytes: tuple[float, ...]
    """Static bytes of each layer: parameters, gradients, optimizer share."""
    act_bytes: tuple[float, ...]
    """Activation bytes each layer keeps per in-flight micro-batch."""
    num_devices: int
    """Pipeline-parallel degree pp."""
    virtual_stages: int = 1
    """Chunks per device v; chunk c runs on device c % pp."""
    inflight: tuple[float, ...]
    """Peak in-flight micro-batches of each chunk (len pp * v)."""
    capacity_bytes: float
    """Memory per device; ``math.inf`` disables the memory check."""
    fixed_bytes: tuple[float, ...] = ()
    """Extra bytes per device (buffers, workspace); empty means zeros."""

    def __post_init__(self) -> None:
        for name in ("num_devices", "virtual_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AutoparError(f"SplitProblem {name}={value!r}; use an integer >= 1")
        layers = len(self.time_s)
        if layers < self.num_chunks:
            raise AutoparError(
                f"cannot split {layers} layers into num_devices * virtual_stages = "
                f"{self.num_devices} * {self.virtual_stages} = {self.num_chunks} non-empty chunks; "
                f"use at most {layers} chunks (fewer pipeline stages or virtual stages)")
        fixed = self.fixed_bytes or (0.0,) * self.num_devices
        for name, values, length in (("time_s", self.time_s, layers),
                                     ("weight_bytes", self.weight_bytes, layers),
                                     ("act_bytes", self.act_bytes, layers),
                                     ("inflight", self.inflight, self.num_chunks),
                                     ("fixed_bytes", fixed, self.num_devices)):
            object.__setattr__(self, name, _checked_floats(name, values, length))
        cap = self.capacity_bytes
        if not isinstance(cap, (int, float)) or math.isnan(cap) or cap <= 0:
            raise AutoparError(f"SplitProblem capacity_bytes={cap!r}; use a number > 0 "
                               "(math.inf for no memory limit)")

    @property
    def num_layers(self) -> int:
        """L, the number of layers."""
        return len(self.time_s)

    @property
    def num_chunks(self) -> int:
        """C = pp * v."""
        return self.num_devices * self.virtual_stages


@dataclass(frozen=True, kw_only=True)
class SplitSolution:
    """A split and its per-device cost (exact sums, math.fsum)."""

    boundaries: tuple[int, ...]
    """Start layer index of each chunk; boundaries[0] == 0."""
    device_time_s: tuple[float, ...]
    """Seconds per micro-batch of each device, summed over its chunks."""
    device_memory_bytes: tuple[float, ...]
    """Peak bytes of each device, fixed_bytes included."""
    bottleneck_s: float
    """max(device_time_s)."""
    fits: bool
    """Every device within capacity_bytes; if False the split minimises the largest device."""
    solver: str
    """"dp", "highs", "cbc" or "trivial"."""
    solve_time_s: float
    """Wall time of solve_split."""


def _checked_floats(name: str, values: tuple[float, ...], length: int) -> tuple[float, ...]:
    """Return ``values`` as floats, raising if the length or any value is bad."""
    if len(values) != length:
        raise AutoparError(f"SplitProblem {name} has {len(values)} entries; {length} expected")
    out = tuple(float(x) for x in values)
    bad = [x for x in out if not (math.isfinite(x) and x >= 0)]
    if bad:
        raise AutoparError(f"SplitProblem {name} holds {bad[0]!r}; values must be finite and >= 0")
    return out


def chunk_layers(boundaries: tuple[int, ...] | list[int], num_layers: int) -> list[range]:
    """Layer index ranges of each chunk, e.g. ``(0, 3, 5), 7 -> [0..2, 3..4, 5..6]``.

    Raises:
        AutoparError: boundaries do not start at 0 or are not strictly increasing below num_layers.
    """
    b = list(boundaries)
    if not b or b[0] != 0 or any(x >= y for x, y in zip(b, b[1:])) or b[-1] >= num_layers:
        raise AutoparError(f"split boundaries {tuple(b)} for {num_layers} layers; they must "
                           f"start at 0 and increase strictly, each below {num_layers}")
    return [range(s, e) for s, e in zip(b, b[1:] + [num_layers])]


def evaluate_split(problem: SplitProblem, boundaries: tuple[int, ...], *,
                   solver: str = "given", solve_time_s: float = 0.0) -> SplitSolution:
    """Per-device time and memory of a split, summed exactly (math.fsum)."""
    pp = problem.num_devices
    times: list[list[float]] = [[] for _ in range(pp)]
    mems: list[list[float]] = [[problem.fixed_bytes[d]] for d in range(pp)]
    for c, rng in enumerate(chunk_layers(boundaries, problem.num_layers)):
        weight = math.fsum(problem.weight_bytes[i] for i in rng)
        act = math.fsum(problem.act_bytes[i] for i in rng)
        times[c % pp].extend(problem.time_s[i] for i in rng)
        mems[c % pp].append(weight + problem.inflight[c] * act)
    device_time = tuple(math.fsum(t) for t in times)
    device_mem = tuple(math.fsum(m) for m in mems)
    return SplitSolution(boundaries=tuple(boundaries), device_time_s=device_time,
                         device_memory_bytes=device_mem, bottleneck_s=max(device_time),
                         fits=max(device_mem) <= problem.capacity_bytes, solver=solver,
                         solve_time_s=solve_time_s)


def solve_split(problem: SplitProblem, *, solver: str = "auto",
                time_limit_s: float = 10.0) -> SplitSolution:
    """Optimal split of ``problem`` (see [Note: split objective and tie-break]).

    Args:
        problem: layers, devices and memory.
        solver: "auto" (dp when v == 1, else HiGHS, else CBC), "highs", "cbc" or "dp".
        time_limit_s: wall-clock budget for the ILP, all phases together.

    Returns:
        The split; ``fits`` is False when no split fits in capacity_bytes.

    Raises:
        AutoparError: unknown or unavailable solver, or "dp" with virtual_stages > 1.
        SplitTimeLimitError: the ILP did not prove optimality within time_limit_s.
        RuntimeError: the MIP solver failed.
    """
    start = time.perf_counter()
    name = _pick_solver(problem, solver)
    if problem.num_chunks in (1, problem.num_layers):  # exactly one split exists
        name, bounds = "trivial", tuple(range(problem.num_chunks))
    elif name == "dp":
        bounds = _solve_dp(problem)
    else:
        bounds = _solve_ilp(problem, name, start + time_limit_s)
    return evaluate_split(problem, bounds, solver=name,
                          solve_time_s=time.perf_counter() - start)


def _pick_solver(problem: SplitProblem, solver: str) -> str:
    """Resolve "auto" and check that the named solver can run."""
    if solver not in SOLVERS:
        raise AutoparError(f"split solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if solver == "dp" and problem.virtual_stages > 1:
        raise AutoparError(f"split solver 'dp' needs virtual_stages == 1, got "
                           f"{problem.virtual_stages}; use solver='auto', 'highs' or 'cbc'")
    if solver == "auto":
        if problem.virtual_stages == 1:
            return "dp"
        solver = "highs" if pulp.HiGHS(msg=False).available() else "cbc"
    if not _mip_solver(solver, None).available():
        raise AutoparError(f"split solver {solver!r} is not available; install highspy "
                           "(pip install highspy) or use solver='cbc'")
    return solver


# ---------------------------------------------------------------- dp (v == 1)


def _solve_dp(problem: SplitProblem) -> tuple[int, ...]:
    """Exact split for v == 1, where each chunk is a device and costs are per chunk.

    Segment [p, q) costs are (L+1) x (L+1) matrices from prefix sums; a min-max
    dynamic program over chunks gives the optimum, a min-sum one the tie-break.
    """
    L, pp = problem.num_layers, problem.num_devices
    valid = np.triu(np.ones((L + 1, L + 1), dtype=bool), k=1)
    seg = [np.where(valid, _segment_sums(x), np.inf)
           for x in (problem.time_s, problem.weight_bytes, problem.act_bytes)]
    mem = [seg[1] + problem.inflight[c] * seg[2] + problem.fixed_bytes[c] for c in range(pp)]
    costs = [np.where(m <= problem.capacity_bytes, seg[0], np.inf) for m in mem]
    best = _minmax_value(costs)
    if not math.isfinite(best):  # nothing fits: minimise the largest device instead
        costs = mem
        best = _minmax_value(costs)
    return _earliest_split([cost <= best for cost in costs])


def _segment_sums(values: tuple[float, ...]) -> np.ndarray:
    """[p, q] = sum of values[p:q] (meaningful for q > p)."""
    prefix = np.concatenate(([0.0], np.cumsum(values)))
    return prefix[None, :] - prefix[:, None]


def _minmax_value(costs: list[np.ndarray]) -> float:
    """Least over splits of the largest chunk cost; costs[c][p, q] is chunk c = [p, q)."""
    n = costs[0].shape[0]
    best = np.full(n, np.inf)
    best[-1] = 0.0  # after the last chunk all layers are covered
    for cost in reversed(costs):
        best = np.maximum(cost, best[None, :]).min(axis=1)
    return float(best[0])


def _earliest_split(allowed: list[np.ndarray]) -> tuple[int, ...]:
    """Split using only allowed[c][p, q] chunks: least sum of starts, then lexicographic."""
    n = allowed[0].shape[0]
    tails = [np.full(n, np.inf)]
    tails[0][-1] = 0.0
    for ok in reversed(allowed):  # tails[k]: least sum of starts of the last k chunks
        tails.append(np.arange(n) + np.where(ok, tails[-1][None, :], np.inf).min(axis=1))
    if not math.isfinite(tails[-1][0]):
        raise RuntimeError("split dp found no split at its own optimum; this is a bug")
    bounds = [0]
    for c in range(len(allowed) - 1):
        rest = tails[len(allowed) - 1 - c]
        bounds.append(int(np.argmin(np.where(allowed[c][bounds[-1]], rest, np.inf))))
    return tuple(bounds)


# ---------------------------------------------------------------- ILP (any v)


@dataclass(frozen=True)
class _Run:
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
            last = runs[-1]
            runs[-1] = _Run(last.start, last.length + 1, *key)
        else:
            runs.append(_Run(i, 1, *key))
    return runs


@dataclass(frozen=True)
class _Model:
    """The ILP of docs/split-ilp.md, ready to take a primary objective."""

    lp: pulp.LpProblem
    prefix: list[list[pulp.LpAffineExpression | int]]
    """prefix[c][r]: layers of run r in chunks <= c (c = -1 .. C-1, shifted by one)."""
    device_time: list[pulp.LpAffineExpression]
    """Per device, in units of ``time_unit`` seconds."""
    device_mem: list[pulp.LpAffineExpression]
    """Per device, in units of ``mem_unit`` bytes, fixed bytes included."""
    time_unit: float
    mem_unit: float


def _solve_ilp(problem: SplitProblem, solver: str, deadline: float) -> tuple[int, ...]:
    """Lexicographic ILP: bottleneck (or largest memory), then sum of chunk starts."""
    model, primary = _primary_model(problem, memory=False)
    if _run_mip(model.lp, solver, deadline) == pulp.LpStatusInfeasible:
        model, primary = _primary_model(problem, memory=True)  # nothing fits
        _require_optimal(_run_mip(model.lp, solver, deadline), "largest memory")
    first = evaluate_split(problem, _read_boundaries(problem, model))
    exact = max(first.device_memory_bytes) / model.mem_unit if primary.name == "largest_memory" \
        else first.bottleneck_s / model.time_unit  # solvers report values to ~8 digits only
    primary.upBound = exact * (1 + TIE_RTOL)
    model.lp.setObjective(pulp.lpSum(q for row in model.prefix[1:-1] for q in row))
    _require_optimal(_run_mip(model.lp, solver, deadline), "tie-break")
    return _read_boundaries(problem, model)


def _primary_model(problem: SplitProblem, *, memory: bool) -> tuple[_Model, pulp.LpVariable]:
    """The model with its first objective: bottleneck time within capacity, or largest memory."""
    model = _build_model(problem, _runs(problem))
    lp = model.lp
    if memory:
        primary = pulp.LpVariable("largest_memory")
        loads, limit = model.device_mem, []
    else:
        lower = max(math.fsum(problem.time_s) / problem.num_devices, max(problem.time_s))
        primary = pulp.LpVariable("bottleneck", lowBound=lower / model.time_unit)
        loads, limit = model.device_time, model.device_mem
    lp.setObjective(pulp.lpSum(primary))
    for d, expr in enumerate(loads):
        lp.addConstraint(expr <= primary, f"load_{d}")
    if math.isfinite(problem.capacity_bytes):
        for d, expr in enumerate(limit):
            lp.addConstraint(expr <= problem.capacity_bytes / model.mem_unit, f"mem_{d}")
    return model, primary


def _build_model(problem: SplitProblem, runs: list[_Run]) -> _Model:
    """Variables and contiguity constraints; device time and memory as expressions."""
    L, C = problem.num_layers, problem.num_chunks
    lp = pulp.LpProblem("stage_split", pulp.LpMinimize)
    prefix: list[list[pulp.LpAffineExpression | int]] = [[0] * len(runs)]
    for c in range(C - 1):  # chunk c ends at layer >= c + 1 and leaves >= C-1-c layers
        prefix.append([_bounded_int(f"q_{c}_{r}", c + 1 - run.start,
                                    L - (C - 1 - c) - run.start, run.length)
                       for r, run in enumerate(runs)])
    prefix.append([run.length for run in runs])
    for c in range(C):
        now, before = prefix[c + 1], prefix[c]
        for r in range(len(runs)):
            _add(lp, now[r] >= before[r])  # counts are cumulative
        _add(lp, pulp.lpSum(now) - pulp.lpSum(before) >= 1)  # chunk c is non-empty
        _add_contiguity(lp, c, runs, now)
    time_unit = max(math.fsum(problem.time_s) / problem.num_devices, 1e-300)
    cap = problem.capacity_bytes
    mem_unit = cap if math.isfinite(cap) else max(max(problem.weight_bytes), 1.0)
    times, mems = _device_terms(lp, problem, runs, prefix, time_unit, mem_unit)
    return _Model(lp, prefix, times, mems, time_unit, mem_unit)


def _bounded_int(name: str, low: int, high: int, length: int) -> pulp.LpVariable | int:
    """An integer in [low, high] clamped to [0, length], or the constant if fixed."""
    low, high = min(max(low, 0), length), min(max(high, 0), length)
    return low if low == high else pulp.LpVariable(name, low, high, pulp.LpInteger)


def _add_contiguity(lp: pulp.LpProblem, c: int, runs: list[_Run], now: list) -> None:
    """Layers in chunks <= c form a prefix: run r + 1 starts only once run r is complete.

    A binary done[r] means "run r complete by chunk c"; for a single-layer run the
    prefix count itself is that binary (the y[i, c] prefix formulation).
    """
    for r in range(len(runs) - 1):
        cur, nxt, length = now[r], now[r + 1], runs[r].length
        if length == 1:
            done = cur
        elif _bound(cur, "upBound") < length or _bound(nxt, "lowBound") > 0:
            done = int(_bound(nxt, "lowBound") > 0)  # forced either way
        else:
            done = pulp.LpVariable(f"done_{c}_{r}", cat=pulp.LpBinary)
        _add(lp, cur >= length * done)
        _add(lp, nxt <= runs[r + 1].length * done)


def _bound(x: pulp.LpVariable | int, which: str) -> int:
    """Lower or upper bound of a prefix count (the value itself for a constant)."""
    return x if isinstance(x, int) else getattr(x, which)


def _add(lp: pulp.LpProblem, constraint) -> None:
    """Add a constraint, skipping those between constants (checked instead)."""
    if isinstance(constraint, bool):
        if not constraint:
            raise RuntimeError("split ILP: constant constraint violated; this is a bug")
        return
    lp += constraint


def _device_terms(lp: pulp.LpProblem, problem: SplitProblem, runs: list[_Run], prefix: list,
                  time_unit: float, mem_unit: float) -> tuple[list, list]:
    """Per-device time and memory as linear expressions of the prefix counts.

    Time goes through integer per-device run counts, on which the MIP branches:
    the bottleneck depends on them alone, not on how a device's layers are chunked.
    """
    pp = problem.num_devices
    counts: list[list[list]] = [[[] for _ in runs] for _ in range(pp)]
    mems: list[list] = [[problem.fixed_bytes[d] / mem_unit] for d in range(pp)]
    for c in range(problem.num_chunks):
        for r, run in enumerate(runs):
            count = prefix[c + 1][r] - prefix[c][r]  # layers of run r in chunk c
            per_layer = run.weight_bytes + problem.inflight[c] * run.act_bytes
            counts[c % pp][r].append(count)
            mems[c % pp].append(per_layer / mem_unit * count)
    times = []
    for d in range(pp):
        total = []
        for r, run in enumerate(runs):
            expr = pulp.lpSum(counts[d][r])
            if expr.isNumericalConstant() or run.time_s == 0:
                total.append(run.time_s / time_unit * expr)
                continue
            n = pulp.LpVariable(f"n_{d}_{r}", 0, run.length, pulp.LpInteger)
            lp.addConstraint(n == expr)
            total.append(run.time_s / time_unit * n)
        times.append(pulp.lpSum(total))
    return times, [pulp.lpSum(m) for m in mems]


def _mip_solver(solver: str, time_limit_s: float | None) -> pulp.LpSolver:
    """A PuLP solver with tight gaps and one thread (deterministic)."""
    tol = dict(gapRel=MIP_TOL, gapAbs=MIP_TOL, threads=1, timeLimit=time_limit_s, msg=False)
    if solver == "highs":
        return pulp.HiGHS(**tol, mip_feasibility_tolerance=MIP_TOL,
                          primal_feasibility_tolerance=MIP_TOL)
    return pulp.PULP_CBC_CMD(**tol, options=[f"primalTolerance {MIP_TOL}",
                                             f"integerTolerance {MIP_TOL}"])


def _run_mip(lp: pulp.LpProblem, solver: str, deadline: float) -> int:
    """Solve; return the PuLP status, raising on a time limit or a solver failure."""
    left = deadline - time.perf_counter()
    if left <= 0:
        raise SplitTimeLimitError("the stage-split ILP ran out of time_limit_s before "
                                  "finishing; raise time_limit_s or use fewer chunks")
    try:
        status = lp.solve(_mip_solver(solver, left))
    except pulp.PulpSolverError as exc:
        raise RuntimeError(f"split ILP solver {solver!r} failed: {exc}") from exc
    if status == pulp.LpStatusOptimal and lp.sol_status == pulp.LpSolutionOptimal:
        return status
    if status == pulp.LpStatusInfeasible:
        return status
    if time.perf_counter() >= deadline - 1e-3 or lp.sol_status == pulp.LpSolutionIntegerFeasible:
        raise SplitTimeLimitError(
            f"the stage-split ILP ({len(lp.variables())} variables) did not prove "
            f"optimality in its time limit; raise time_limit_s or use fewer chunks")
    raise RuntimeError(f"split ILP solver {solver!r} returned status "
                       f"{pulp.LpStatus[status]!r} ({lp.sol_status}); this is a bug")


def _require_optimal(status: int, phase: str) -> None:
    """Later phases are feasible by construction: infeasibility is a bug."""
    if status != pulp.LpStatusOptimal:
        raise RuntimeError(f"split ILP {phase} phase returned {pulp.LpStatus[status]!r}")


def _read_boundaries(problem: SplitProblem, model: _Model) -> tuple[int, ...]:
    """Chunk starts from the prefix counts, checked against the run layout."""
    counts = [[round(pulp.value(q)) for q in row] for row in model.prefix]
    bounds = tuple(sum(row) for row in counts[:-1])
    runs = _runs(problem)
    for row, end in zip(counts[1:], bounds[1:] + (problem.num_layers,)):
        expected = [min(max(end - run.start, 0), run.length) for run in runs]
        if row != expected:
            raise RuntimeError(f"split ILP returned non-contiguous counts {row}; this is a bug")
    chunk_layers(bounds, problem.num_layers)
    return bounds
