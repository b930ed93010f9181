"""The vectorised sweeps give the step DAG's longest path exactly as the task-by-task simulation does."""

from __future__ import annotations

import random

import pytest

from autopar.cost.model import _simulate, pipeline_step_s
from autopar.cost.pipeline import action_orders, peak_inflight
from autopar.cost.schedule_sweep import interleaved_peak_inflight, sweep_step_s
from autopar.errors import AutoparError
from autopar.plan.types import Schedule


def _chunks(rng: random.Random, n: int, kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Forward and backward times of n chunks: random, equal, or balanced with a heavy first and last chunk
    (the planner's splits: embedding and LM head)."""
    if kind == "equal":
        return (1.0,) * n, (2.0,) * n
    if kind == "random":
        fwd = tuple(rng.uniform(0.1, 2.0) for _ in range(n))
        return fwd, tuple(f * rng.uniform(1.5, 3.0) for f in fwd)
    fwd = [rng.uniform(0.99, 1.01) for _ in range(n)]
    fwd[0], fwd[-1] = fwd[0] * 1.05, fwd[-1] * 1.3
    return tuple(fwd), tuple(2 * f for f in fwd)


def _cases(schedule: Schedule):
    for pp in (2, 3, 4, 5, 8):
        for v in ((1,) if schedule is not Schedule.INTERLEAVED_1F1B else (2, 3, 4)):
            for m in (1, 2, pp - 1, pp, pp + 1, 2 * pp, 3 * pp + 2, 5 * pp, 12 * pp, 13 * pp, 25 * pp + 1):
                try:
                    action_orders(schedule, pp, v, m)
                except AutoparError:
                    continue
                yield pp, v, m


@pytest.mark.parametrize("schedule", list(Schedule))
def test_sweep_equals_full_simulation(schedule):
    """Short and long steps (the long ones jump whole periods), random and near-balanced uneven chunks."""
    rng = random.Random(7)
    swept = 0
    for pp, v, m in _cases(schedule):
        for kind in ("random", "equal", "planner"):
            fwd, bwd = _chunks(rng, pp * v, kind)
            fast = sweep_step_s(schedule, fwd, bwd, pp, v, m)
            if fast is None:  # not swept (1F1B with m < pp, interleaved with short rounds): simulated instead
                continue
            swept += 1
            assert fast == pytest.approx(_simulate(schedule, fwd, bwd, pp, v, m), rel=1e-9), (pp, v, m, kind)
    assert swept > 40


def test_sweep_declines_what_it_does_not_cover():
    fwd, bwd = (1.0,) * 8, (2.0,) * 8
    assert sweep_step_s(Schedule.INTERLEAVED_1F1B, fwd, bwd, 4, 2, 3) is None  # rounds of 3 < pp = 4
    assert sweep_step_s(Schedule.ONE_F_ONE_B, fwd[:1], bwd[:1], 1, 1, 4) is None  # pp = 1
    assert pipeline_step_s(Schedule.INTERLEAVED_1F1B, fwd, bwd, 4, 2, 3) == pytest.approx(
        _simulate(Schedule.INTERLEAVED_1F1B, fwd, bwd, 4, 2, 3), rel=1e-12)


def test_sweep_of_a_long_step_is_fast_and_equals_the_extrapolated_simulation():
    """pp = 64, m = 4096 (524k tasks): the sweep jumps the steady phase. Reference: the simulation at 4, 6
    and 8 rounds of pp micro-batches, whose steps grow by the same amount every two rounds, extrapolated."""
    import time

    fwd = tuple(1.0 + 0.01 * (c % 3) for c in range(64))
    bwd = tuple(2 * f for f in fwd)
    start = time.perf_counter()
    step = sweep_step_s(Schedule.ONE_F_ONE_B, fwd, bwd, 64, 1, 4096)
    assert time.perf_counter() - start < 0.2
    a, b, c = (_simulate(Schedule.ONE_F_ONE_B, fwd, bwd, 64, 1, r * 64) for r in (4, 6, 8))
    assert c - b == pytest.approx(b - a, rel=1e-12)
    assert step == pytest.approx(c + (64 - 8) // 2 * (c - b), rel=1e-12)


def test_interleaved_peak_inflight_equals_the_order_walk():
    for pp in range(1, 7):
        for v in range(2, 5):
            for m in [*range(1, 3 * pp + 3), 4 * pp, 8 * pp]:
                try:
                    orders = action_orders(Schedule.INTERLEAVED_1F1B, pp, v, m)
                except AutoparError:
                    continue
                assert interleaved_peak_inflight(pp, v, m) == tuple(
                    float(x) for x in peak_inflight(orders, pp * v)), (pp, v, m)
