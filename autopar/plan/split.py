"""Pipeline stage split: cut an ordered list of layers into pp * v contiguous chunks.

Chunk c runs on pipeline rank c % pp (interleaved placement, Narayanan et al.
2021 §2.2.2). Formulation, tractability, oracle tests and solve times:
docs/split-ilp.md.

[Note: split objective and tie-break]
  1. If some split fits (every device within capacity_bytes): least bottleneck
     device time. If none fits: least largest-device memory (smallest overflow).
  2. Among those: least sum over chunks c of |start_c - c * L // C|, the split
     closest to the even layer split (Megatron's default). The ILP skips this
     step when nothing fits.
  3. "dp" (v == 1): lexicographically earliest boundaries. ILP: the solver's
     pick, deterministic for a given solver version.
The dp is exact; the ILP treats bottlenecks within TIE_RTOL as equal. A solve
that hits time_limit_s raises rather than return a speed-dependent split.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pulp

from autopar.errors import AutoparError

SOLVERS = ("auto", "highs", "cbc", "dp")
"""Accepted ``solver`` names; "dp" is exact for virtual_stages == 1 only."""
MIP_GAP = 1e-10
"""Relative and absolute MIP gap (scaled units) for both solvers: prove optimality.
Feasibility tolerances stay at the solvers' defaults (about 1e-6): HiGHS 1.16 at
1e-10 declared feasible tie-break models infeasible."""
TIE_RTOL = 1e-9
"""ILP: splits within this relative slack of the least bottleneck count as optimal."""


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
        layers, pp, v = len(self.time_s), self.num_devices, self.virtual_stages
        if layers < pp * v:
            raise AutoparError(
                f"cannot split {layers} layers into num_devices * virtual_stages = {pp} * {v} "
                f"= {pp * v} non-empty chunks; use at most {layers} chunks (lower pp or v)")
        for name, length in (("time_s", layers), ("weight_bytes", layers),
                             ("act_bytes", layers), ("inflight", pp * v), ("fixed_bytes", pp)):
            values = getattr(self, name) or ((0.0,) * pp if name == "fixed_bytes" else ())
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
    """A split and its per-device cost (sums are exact: math.fsum)."""

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
    """"dp", "highs", "cbc" or "trivial" (only one split exists)."""
    solve_time_s: float
    """Wall time of solve_split."""


def _checked_floats(name: str, values: tuple[float, ...], length: int) -> tuple[float, ...]:
    """``values`` as floats, raising if the length or a value is bad."""
    if len(values) != length:
        raise AutoparError(f"SplitProblem {name} has {len(values)} entries; {length} expected")
    out = tuple(float(x) for x in values)
    bad = [x for x in out if not (math.isfinite(x) and x >= 0)]
    if bad:
        raise AutoparError(f"SplitProblem {name} holds {bad[0]!r}; values must be finite and >= 0")
    return out


def chunk_layers(boundaries: tuple[int, ...] | list[int], num_layers: int) -> list[range]:
    """Layer ranges of each chunk: ``(0, 3, 5), 7 -> [range(0, 3), range(3, 5), range(5, 7)]``.

    Raises:
        AutoparError: boundaries do not start at 0 or do not increase strictly below num_layers.
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
        time_limit_s: wall-clock budget for the ILP, all its solves together.

    Returns:
        The split; ``fits`` is False when no split fits in capacity_bytes.

    Raises:
        AutoparError: unknown or unavailable solver, "dp" with virtual_stages > 1, or
            time_limit_s <= 0.
        SplitTimeLimitError: the ILP did not prove optimality within time_limit_s.
        RuntimeError: the MIP solver failed.
    """
    start = time.perf_counter()
    name = _pick_solver(problem, solver, time_limit_s)
    if problem.num_chunks in (1, problem.num_layers):  # exactly one split exists
        name, bounds = "trivial", tuple(range(problem.num_chunks))
    elif name == "dp":
        bounds = _solve_dp(problem)
    else:
        from autopar.plan.split_ilp import solve_ilp

        bounds = solve_ilp(problem, name, start + time_limit_s)
    return evaluate_split(problem, bounds, solver=name, solve_time_s=time.perf_counter() - start)


def _pick_solver(problem: SplitProblem, solver: str, time_limit_s: float) -> str:
    """Check the arguments, resolve "auto", and check that the solver can run."""
    if solver not in SOLVERS:
        raise AutoparError(f"split solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if not time_limit_s > 0:
        raise AutoparError(f"split time_limit_s={time_limit_s!r}; use a number of seconds > 0")
    if solver == "dp" and problem.virtual_stages > 1:
        raise AutoparError(f"split solver 'dp' needs virtual_stages == 1, got "
                           f"{problem.virtual_stages}; use solver='auto', 'highs' or 'cbc'")
    if solver == "auto" and problem.virtual_stages == 1:
        return "dp"
    if solver == "auto":
        solver = "highs" if pulp.HiGHS(msg=False).available() else "cbc"
    from autopar.plan.split_ilp import mip_solver

    if solver != "dp" and not mip_solver(solver, None).available():
        raise AutoparError(f"split solver {solver!r} is not available; install highspy "
                           "(pip install highspy) or use solver='cbc'")
    return solver


def _even_starts(problem: SplitProblem) -> list[int]:
    """Start of each chunk in the even layer split: c * L // C."""
    return [c * problem.num_layers // problem.num_chunks for c in range(problem.num_chunks)]


def _solve_dp(problem: SplitProblem) -> tuple[int, ...]:
    """Exact split for v == 1, where each chunk is a device and every cost is per chunk.

    Chunk c starts at c + k for k < w = L - C + 1 (each chunk holds a layer), so
    its costs are w x w matrices [k, j] for chunk [c + k, c + 1 + j), from prefix
    sums. A min-max dynamic program over chunks gives objective 1, a min-sum one
    objective 2. Work is C * w^2: small when C is near L as well as when C is small.
    """
    C, cap = problem.num_chunks, problem.capacity_bytes
    costs = _segments(problem.time_s, C)
    if math.isfinite(cap):
        inflight = np.asarray(problem.inflight)[:, None, None]
        mem = _segments(problem.weight_bytes, C) + inflight * _segments(problem.act_bytes, C)
        mem += np.asarray(problem.fixed_bytes)[:, None, None]  # v == 1: one chunk per device
        costs = np.where(mem <= cap, costs, np.inf)
    best = _minmax_value(costs)
    if not math.isfinite(best):  # nothing fits: minimise the largest device instead
        costs, best = mem, _minmax_value(mem)
    return _closest_to_even(costs <= best, _even_starts(problem))


def least_peak_and_bottleneck(problem: SplitProblem) -> tuple[float, float]:
    """For v == 1: (least over splits of the largest chunk's memory, least over splits that fit of the slowest
    chunk's time, inf when none fits), the values solve_split's DP reaches before its tie-break. For v > 1
    chunks are the problem's devices here too, so the memory is a chunk's, at most its device's."""
    C = problem.num_chunks
    mem = _segments(problem.weight_bytes, C) + np.asarray(problem.inflight)[:, None, None] * _segments(
        problem.act_bytes, C)
    times = np.where(mem <= problem.capacity_bytes, _segments(problem.time_s, C), np.inf)
    return _minmax_value(mem), _minmax_value(times)


@lru_cache(maxsize=64)
def _segments(values: tuple[float, ...], num_chunks: int) -> np.ndarray:
    """[c, k, j]: the sum of ``values`` over chunk c = layers [c + k, c + 1 + j), inf where j < k (read-only;
    cached: the planner's problems share their layer tuples)."""
    w = len(values) - num_chunks + 1
    starts = np.arange(num_chunks)[:, None] + np.arange(w)[None, :]  # chunk c starts at c + k
    prefix = np.concatenate(([0.0], np.cumsum(values)))
    seg = prefix[starts + 1][:, None, :] - prefix[starts][:, :, None]
    seg[:, np.arange(w)[None, :] < np.arange(w)[:, None]] = np.inf
    seg.flags.writeable = False
    return seg


def _minmax_value(costs: np.ndarray) -> float:
    """Least over splits of the largest chunk cost (costs[c][k, j] as in _solve_dp)."""
    best = np.full(costs[0].shape[0], np.inf)  # best[j]: the chunks after, from c + 1 + j
    best[-1] = 0.0  # after the last chunk: layer L, every layer covered
    for cost in reversed(costs):
        best = np.maximum(cost, best[None, :]).min(axis=1)
    return float(best[0])


def _closest_to_even(allowed: np.ndarray, even: list[int]) -> tuple[int, ...]:
    """Split of allowed[c][k, j] chunks: least sum |start - even|, then lexicographic."""
    w = allowed[0].shape[0]
    tails = [np.full(w, np.inf)]  # tails[-1][k]: least cost of the chunks from c + k on
    tails[0][-1] = 0.0
    for c in reversed(range(len(allowed))):
        step = np.where(allowed[c], tails[-1][None, :], np.inf).min(axis=1)
        tails.append(np.abs(c + np.arange(w) - even[c]) + step)
    if not math.isfinite(tails[-1][0]):
        raise RuntimeError("split dp found no split at its own optimum; this is a bug")
    bounds = [0]
    for c in range(len(allowed) - 1):  # argmin takes the first, i.e. earliest, tie
        rest = np.where(allowed[c][bounds[-1] - c], tails[len(allowed) - 1 - c], np.inf)
        bounds.append(c + 1 + int(np.argmin(rest)))
    return tuple(bounds)
