"""Pipeline schedules, the step DAG, its closed forms and the timeline plot.

See docs/schedules.md for what each test ties together.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autopar.cost.pipeline import (
    Action,
    action_orders,
    bubble_fraction,
    build_step_dag,
    dag_step_time,
    peak_activation_bytes,
    peak_inflight,
    simulate,
    simulate_shared,
    step_time,
)
from autopar.errors import AutoparError

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 3)]


def _as_tuples(orders):
    return [[(a.kind, a.chunk, a.microbatch) for a in order] for order in orders]


# ---------------------------------------------------------------- orders against torch


class _FakeStage:
    """Just enough of _PipelineStageBase for the schedules to build and run
    their orders without a process group: no p2p ops, and compute calls are
    recorded instead of run. ``is_last`` is False so no loss is computed."""

    def __init__(self, stage_index: int, num_stages: int, pp: int, log: list | None = None):
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_size, self.group_rank = pp, stage_index % pp
        self.is_first, self.is_last, self.has_backward = stage_index == 0, False, True
        self.log = log

    def clear_runtime_states(self):
        pass

    def get_fwd_recv_ops(self, mb):
        return []

    get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = get_fwd_recv_ops

    def forward_one_chunk(self, mb, *args, **kwargs):
        self.log.append(("F", self.stage_index, mb))

    def backward_one_chunk(self, mb, **kwargs):
        self.log.append(("B", self.stage_index, mb))

    def perform_reduce_grad(self, *args):
        pass


def _torch_single_stage_executed(cls, pp: int, m: int) -> list[list[tuple]]:
    """What ScheduleGPipe / Schedule1F1B._step_microbatches runs on each rank.

    We run the loop itself rather than read ``pipeline_order``: that IR is
    only for display, and Schedule1F1B's is off by one on the last rank in
    torch 2.13 (it starts at micro-batch 1 and ends at m).
    """
    orders = []
    for rank in range(pp):
        log: list = []
        schedule = cls(_FakeStage(rank, pp, pp, log), m, loss_fn=lambda out, target: out)
        schedule._stage_forward_initialized = schedule._stage_backward_initialized = True
        schedule._step_microbatches()
        orders.append(log)
    return orders


def _torch_interleaved(pp: int, v: int, m: int) -> list[list[tuple]]:
    """Compute actions of ScheduleInterleaved1F1B's lowered schedule, per rank.

    ``pipeline_order_with_comms`` is what its runtime executes; rank r's
    schedule object holds every rank's order, built from stage indices only.
    """
    from torch.distributed.pipelining import schedules as S

    stages = [_FakeStage(k * pp, pp * v, pp) for k in range(v)]
    schedule = S.ScheduleInterleaved1F1B(stages, m, loss_fn=lambda out, target: out)
    kinds = {S._ComputationType.FORWARD: "F", S._ComputationType.FULL_BACKWARD: "B"}
    compute = [[(kinds[a.computation_type], a.stage_index, a.microbatch_index)
                for a in schedule.pipeline_order_with_comms[rank] if a.computation_type in kinds]
               for rank in range(pp)]
    ir = [[(kinds[a.computation_type], a.stage_index, a.microbatch_index)
           for a in schedule.pipeline_order[rank] if a is not None] for rank in range(pp)]
    assert compute == ir
    return compute


@pytest.mark.parametrize("pp,m", [(1, 3), (2, 2), (3, 5), (4, 4), (4, 8), (5, 12)])
def test_gpipe_and_1f1b_orders_match_torch_execution(pp, m):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    assert _as_tuples(action_orders("gpipe", pp, 1, m)) == _torch_single_stage_executed(ScheduleGPipe, pp, m)
    assert _as_tuples(action_orders("1f1b", pp, 1, m)) == _torch_single_stage_executed(Schedule1F1B, pp, m)


def test_gpipe_order_matches_torch_when_m_below_pp():
    from torch.distributed.pipelining import ScheduleGPipe

    assert _as_tuples(action_orders("gpipe", 4, 1, 2)) == _torch_single_stage_executed(ScheduleGPipe, 4, 2)


@pytest.mark.parametrize("pp,v,m", [
    (2, 2, 4), (4, 2, 8), (4, 2, 16), (3, 3, 6), (4, 3, 8),  # m a multiple of pp
    (4, 2, 10), (4, 2, 6), (3, 2, 5),  # flex rounds: m // pp rounds must divide m
    (4, 2, 3), (4, 2, 1), (2, 4, 1),  # fewer micro-batches than ranks
    (1, 2, 3),
])
def test_interleaved_orders_match_torch(pp, v, m):
    assert _as_tuples(action_orders("interleaved_1f1b", pp, v, m)) == _torch_interleaved(pp, v, m)


def test_rejects_what_torch_rejects():
    from torch.distributed.pipelining import Schedule1F1B

    with pytest.raises(ValueError):
        Schedule1F1B(_FakeStage(0, 4, 4), 3)
    with pytest.raises(AutoparError, match="num_microbatches=3 < pp=4"):
        action_orders("1f1b", 4, 1, 3)
    # pp=4, m=9: rounds = 9 // 4 = 2, and 9 % 2 != 0.
    with pytest.raises(ValueError):
        _torch_interleaved(4, 2, 9)
    with pytest.raises(AutoparError, match=r"multiple of max\(1, num_microbatches // pp\) = 2; use 8 or 10"):
        action_orders("interleaved_1f1b", 4, 2, 9)


@pytest.mark.parametrize("args,match", [
    (("gpipe", 4, 2, 8), "virtual_stages=2"),
    (("1f1b", 4, 2, 8), "virtual_stages=2"),
    (("interleaved_1f1b", 4, 1, 8), "at least 2 chunks"),
    (("zb", 4, 1, 8), "unknown"),
    (("1f1b", 0, 1, 8), "pp=0"),
    (("1f1b", 4, 1, 0), "num_microbatches=0"),
])
def test_invalid_combinations(args, match):
    with pytest.raises(AutoparError, match=match):
        action_orders(*args)


def test_schedule_enum_accepted():
    from autopar.plan.types import Schedule

    assert action_orders(Schedule.ONE_F_ONE_B, 2, 1, 2) == action_orders("1f1b", 2, 1, 2)
    assert action_orders("1f1b", 2, 1, 2)[1][:2] == [Action("F", 1, 0), Action("B", 1, 0)]


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp,m", [(1, 1), (2, 2), (4, 4), (4, 7), (8, 16)])
@pytest.mark.parametrize("f,b", [(1.0, 2.0), (1.0, 1.0), (0.5, 3.0)])
def test_uniform_gpipe_1f1b_closed_form(schedule, pp, m, f, b):
    # Narayanan et al. 2021 §2.2.1: (m + p - 1)(f + b), i.e. m(f + b)(1 + (p - 1)/m).
    orders = action_orders(schedule, pp, 1, m)
    t = step_time(orders, [f] * pp, [b] * pp)
    assert t == pytest.approx((m + pp - 1) * (f + b))
    assert t == pytest.approx(m * (f + b) * (1 + bubble_fraction(schedule, pp, 1, m)))


@pytest.mark.parametrize("pp,v,m", [
    (2, 2, 2), (2, 2, 4), (4, 2, 4), (4, 2, 8), (4, 3, 12), (3, 4, 6), (8, 2, 16),
    (4, 2, 10), (3, 2, 5), (6, 3, 14),  # m >= pp but not a multiple: still exact
    (4, 2, 1), (4, 2, 3), (6, 3, 4), (2, 3, 1),  # m < pp
])
@pytest.mark.parametrize("f,b", [(1.0, 2.0), (1.0, 1.0), (2.0, 1.0)])
def test_uniform_interleaved_closed_form(pp, v, m, f, b):
    # Each chunk costs f/v and b/v. Derived from the DAG and exact for every
    # valid m >= pp: the step is m(f+b) + (p-1)(f+b)/v (the paper's bubble
    # (p-1)/(v m)). For m < pp a round holds only m micro-batches, so each
    # rank waits for micro-batch 0 to come back from the last rank: the step
    # is the chain of micro-batch 0 through all v*p chunks, (f+b)/v each, plus
    # m-1 more chunk-slots: (v p + m - 1)(f+b)/v. Example p=4, v=2, m=1, f=b=1:
    # 8 chunks x 1 s = 8 s, against the paper's 1*2 + 3*2/2 = 5 s.
    n = pp * v
    t = step_time(action_orders("interleaved_1f1b", pp, v, m), [f / v] * n, [b / v] * n)
    expected = (m * (f + b) + (pp - 1) * (f + b) / v if m >= pp
                else (v * pp + m - 1) * (f + b) / v)
    assert t == pytest.approx(expected)
    assert t == pytest.approx(m * (f + b) * (1 + bubble_fraction("interleaved_1f1b", pp, v, m)))


def test_bubble_fraction_values():
    assert bubble_fraction("1f1b", 4, 1, 8) == pytest.approx(3 / 8)
    assert bubble_fraction("gpipe", 8, 1, 2) == pytest.approx(7 / 2)
    assert bubble_fraction("interleaved_1f1b", 4, 2, 8) == pytest.approx(3 / 16)
    assert bubble_fraction("interleaved_1f1b", 4, 2, 1) == pytest.approx((2 * 3 + 0) / 2)
    with pytest.raises(AutoparError):
        bubble_fraction("gpipe", 4, 2, 8)


# ---------------------------------------------------------------- uneven stages


def test_uneven_1f1b_hand_worked():
    # 1F1B, pp=2, m=2; chunk 0: f=1, b=2; chunk 1: f=2, b=4; p2p 0.5.
    # rank 0 order F0.0 F0.1 B0.0 B0.1; rank 1 order F1.0 B1.0 F1.1 B1.1.
    #   F0.0 0-1, F0.1 1-2                     (rank 0 warm-up)
    #   F1.0 starts 1 + 0.5 = 1.5, ends 3.5
    #   B1.0 3.5-7.5; F1.1 (input at 2.5) waits for the rank: 7.5-9.5; B1.1 9.5-13.5
    #   B0.0 starts max(2, 7.5 + 0.5) = 8, ends 10; B0.1 starts 13.5 + 0.5 = 14, ends 16
    # step 16 s; rank busy 6 and 12 s; one micro-batch's chain 1+.5+2+4+.5+2 = 10 s.
    tl = simulate(action_orders("1f1b", 2, 1, 2), [1.0, 2.0], [2.0, 4.0], 0.5)
    spans = {(t.kind, t.chunk, t.microbatch): (t.start_s, t.end_s) for t in tl.tasks}
    assert spans == {
        ("F", 0, 0): (0, 1), ("F", 0, 1): (1, 2), ("F", 1, 0): (1.5, 3.5), ("B", 1, 0): (3.5, 7.5),
        ("F", 1, 1): (7.5, 9.5), ("B", 1, 1): (9.5, 13.5), ("B", 0, 0): (8, 10), ("B", 0, 1): (14, 16),
    }
    assert tl.step_s == 16.0
    assert tl.busy_s() == [6.0, 12.0]


def _random_case(rng: random.Random):
    schedule, v = rng.choice(SCHEDULES)
    pp = rng.randint(1, 5)
    m = rng.randint(pp if schedule == "1f1b" else 1, 10)
    if schedule == "interleaved_1f1b" and m % max(1, m // pp):
        m = pp * max(1, m // pp)
    n = pp * v
    fwd = [rng.uniform(0.1, 2.0) for _ in range(n)]
    bwd = [rng.uniform(0.1, 4.0) for _ in range(n)]
    p2p = [rng.choice([0.0, rng.uniform(0.0, 0.5)]) for _ in range(n - 1)]
    return action_orders(schedule, pp, v, m), fwd, bwd, p2p


def test_uneven_step_is_at_least_busy_time_and_critical_chain():
    rng = random.Random(0)
    for _ in range(200):
        orders, fwd, bwd, p2p = _random_case(rng)
        pp, n = len(orders), len(fwd)
        tl = simulate(orders, fwd, bwd, p2p)
        chain = sum(fwd) + sum(bwd) + 2 * sum(p2p[c] for c in range(n - 1) if c % pp != (c + 1) % pp)
        assert tl.step_s >= max(tl.busy_s()) - 1e-9
        assert tl.step_s >= chain - 1e-9
        for rank in range(pp):  # a rank runs one task at a time, in its order
            mine = [t for t in tl.tasks if t.rank == rank]
            assert [(t.kind, t.chunk, t.microbatch) for t in mine] == _as_tuples(orders)[rank]
            assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(mine, mine[1:]))


def test_uneven_gpipe_flow_shop_closed_form():
    # GPipe is a flow shop of identical jobs: the forwards finish at
    # sum(f) + (m-1) max(f) + hops; the backwards start on the last rank right
    # then and add sum(b) + (m-1) max(b) + hops.
    rng = random.Random(1)
    for _ in range(100):
        pp, m = rng.randint(1, 6), rng.randint(1, 9)
        f = [rng.uniform(0.1, 2) for _ in range(pp)]
        b = [rng.uniform(0.1, 4) for _ in range(pp)]
        hop = rng.uniform(0, 0.5)
        expected = sum(f) + sum(b) + (m - 1) * (max(f) + max(b)) + 2 * (pp - 1) * hop
        assert step_time(action_orders("gpipe", pp, 1, m), f, b, hop) == pytest.approx(expected)


def test_networkx_longest_path_equals_sweep():
    rng = random.Random(2)
    for _ in range(60):
        orders, fwd, bwd, p2p = _random_case(rng)
        dag = build_step_dag(orders, fwd, bwd, p2p)
        assert dag_step_time(dag) == pytest.approx(step_time(orders, fwd, bwd, p2p))


def test_deadlocking_and_malformed_orders_are_rejected():
    # rank 0 waits at B0.0 for B1.0; rank 1 waits at F1.1 for F0.1, which rank 0 runs after B0.0.
    cycle = [[Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)],
             [Action("F", 1, 1), Action("F", 1, 0), Action("B", 1, 0), Action("B", 1, 1)]]
    with pytest.raises(AutoparError, match=r"deadlocks: rank 0 at B\(chunk 0, mb 0\), rank 1 at F\(chunk 1, mb 1\)"):
        simulate(cycle, [1, 1], [1, 1])
    with pytest.raises(AutoparError, match="cycle"):
        build_step_dag(cycle, [1, 1], [1, 1])
    missing = [order[:-1] for order in action_orders("1f1b", 2, 1, 2)]
    with pytest.raises(AutoparError, match="exactly once"):
        simulate(missing, [1, 1], [1, 1])
    with pytest.raises(AutoparError, match="duration per chunk"):
        simulate(action_orders("1f1b", 2, 1, 2), [1, 1], [1])
    with pytest.raises(AutoparError, match="one per boundary"):
        simulate(action_orders("1f1b", 2, 1, 2), [1, 1], [1, 1], [0.1, 0.1])


def test_shared_speeds_of_one_are_the_longest_path():
    """With a device per rank (every speed 1) the processor-sharing run is the sweep's longest path."""
    rng = random.Random(5)
    for _ in range(40):
        orders, fwd, bwd, p2p = _random_case(rng)
        shared = simulate_shared(orders, fwd, bwd, [1.0] * (len(orders) + 1), p2p)
        assert shared.step_s == pytest.approx(step_time(orders, fwd, bwd, p2p), rel=1e-9)
        assert sorted(shared.busy_s()) == pytest.approx(sorted(simulate(orders, fwd, bwd, p2p).busy_s()))


def test_shared_speeds_hand_worked_gpipe():
    """GPipe, pp 2, m 2, forward and backward 1 each, two ranks at once at half speed: F(0,0) alone 0-1;
    F(0,1) with F(1,0) 1-3; F(1,1) alone 3-4; B(1,0) alone 4-5; B(0,0) with B(1,1) 5-7; B(0,1) alone 7-8.
    A device each: (m + p - 1)(f + b) = 6."""
    orders = action_orders("gpipe", 2, 1, 2)
    timeline = simulate_shared(orders, [1, 1], [1, 1], [1.0, 1.0, 0.5])
    assert timeline.step_s == pytest.approx(8.0)
    spans = {(t.kind, t.chunk, t.microbatch): (t.start_s, t.end_s) for t in timeline.tasks}
    assert spans[("F", 0, 1)] == pytest.approx((1, 3)) and spans[("B", 0, 0)] == pytest.approx((5, 7))
    assert simulate_shared(orders, [1, 1], [1, 1], [1.0, 1.0, 1.0]).step_s == pytest.approx(6.0)


def test_shared_speeds_never_shorten_a_step_and_bad_speeds_are_refused():
    rng = random.Random(6)
    for _ in range(30):
        orders, fwd, bwd, p2p = _random_case(rng)
        pp = len(orders)
        speeds = [1.0] + [min(1.0, 2 / k) for k in range(1, pp + 1)]
        assert simulate_shared(orders, fwd, bwd, speeds, p2p).step_s >= step_time(orders, fwd, bwd, p2p) - 1e-9
    orders = action_orders("1f1b", 2, 1, 2)
    for bad in ([1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.5, 1.0]):
        with pytest.raises(AutoparError, match="speeds"):
            simulate_shared(orders, [1, 1], [1, 1], bad)
    cycle = [[Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)],
             [Action("F", 1, 1), Action("F", 1, 0), Action("B", 1, 0), Action("B", 1, 1)]]
    with pytest.raises(AutoparError, match="deadlocks"):
        simulate_shared(cycle, [1, 1], [1, 1], [1.0, 1.0, 1.0])


def test_step_time_is_fast_for_a_large_pipeline():
    orders = action_orders("interleaved_1f1b", 64, 2, 512)  # 131k tasks, twice the brief's 65k
    start = time.perf_counter()
    t = step_time(orders, [0.5] * 128, [1.0] * 128, 0.0)
    elapsed = time.perf_counter() - start
    assert t == pytest.approx(512 * 3 + 63 * 3 / 2)
    assert elapsed < 5.0, f"step_time took {elapsed:.2f} s for 131k tasks"


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("pp,m", [(1, 1), (4, 4), (4, 9), (6, 20)])
def test_peak_inflight_1f1b_and_gpipe(pp, m):
    assert peak_inflight(action_orders("1f1b", pp, 1, m), pp) == tuple(float(min(pp - s, m)) for s in range(pp))
    assert peak_inflight(action_orders("gpipe", pp, 1, m), pp) == (float(m),) * pp


def test_peak_inflight_interleaved_hand_count():
    # pp=2, v=2, m=4 (chunks 0, 2 on rank 0; 1, 3 on rank 1):
    # rank 0: F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 B2.2 B2.3 B0.2 B0.3
    #   chunk 0 holds 1, 2, .., 4 after F0.3 (B0.0 comes later): peak 4
    #   chunk 2 holds 2 after F2.1, 0 after B2.1, 2 again after F2.3: peak 2
    #   both: F0.0..F0.2 with F2.0, F2.1 = 5, then B/F pairs keep 4-5: peak 5 < 4 + 2
    # rank 1: F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 B1.2 B1.3
    #   chunk 1 peaks at 3 (after F1.2 and F1.3); chunk 3 never holds more than 1; both: 3
    orders = action_orders("interleaved_1f1b", 2, 2, 4)
    assert [" ".join(f"{a.kind}{a.chunk}.{a.microbatch}" for a in o) for o in orders] == [
        "F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 B2.2 B2.3 B0.2 B0.3",
        "F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 B1.2 B1.3",
    ]
    assert peak_inflight(orders, 4) == (4.0, 3.0, 2.0, 1.0)
    assert peak_activation_bytes(orders, [1.0] * 4) == (5.0, 3.0)
    assert peak_activation_bytes(orders, [10.0, 1.0, 100.0, 1.0]) == (10 * 2 + 100 * 2 + 10, 3.0)


@pytest.mark.parametrize("pp,v,m", [(4, 2, 8), (4, 4, 16), (8, 2, 16), (3, 3, 6),
                                    (4, 2, 10), (4, 2, 3), (2, 3, 1)])
def test_interleaved_rank_peak_is_warmup_plus_one(pp, v, m):
    # A rank holds every warm-up forward and then runs one more F before its
    # first B: warmup + 1 chunk-activations, capped at all m*v of them
    # (warmup = (v-1) per_round + 2(pp-1-rank), torch's _get_warmup_ops).
    orders = action_orders("interleaved_1f1b", pp, v, m)
    per_round = m // max(1, m // pp)
    expected = tuple(float(min((v - 1) * per_round + 2 * (pp - 1 - r) + 1, m * v)) for r in range(pp))
    assert peak_activation_bytes(orders, [1.0] * (pp * v)) == expected
    if m % pp == 0:
        # In units of one whole stage (a chunk holds 1/v of it), rank 0 holds
        # pp (1 + (pp-1)/(pp v)): the interleaved memory factor quoted by
        # Korthikanti et al. 2022; e.g. pp=4, v=2: 4 (1 + 3/8) = 5.5 against 4 for 1F1B.
        stage_units = peak_activation_bytes(orders, [1.0 / v] * (pp * v))[0]
        assert stage_units == pytest.approx(pp * (1 + (pp - 1) / (pp * v)))


# ---------------------------------------------------------------- plot and import weight


def _memory(pp: int) -> dict:
    gib = 2**30
    return {"weights": [10 * gib] * pp, "grads": [5 * gib] * pp, "optimizer": [20 * gib] * pp,
            "activations": [(30 - 5 * r) * gib for r in range(pp)], "reserve": [2 * gib] * pp}


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_plan_writes_file(tmp_path, suffix):
    from autopar.explain.plot import plot_plan

    tl = simulate(action_orders("interleaved_1f1b", 4, 2, 8), [0.01] * 8, [0.02] * 8, 0.001)
    path = plot_plan(tmp_path / f"plan{suffix}", tl, _memory(4), 80 * 2**30, "pp4 interleaved_1f1b(v=2)")
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data[:2000]


def test_plot_plan_rejects_bad_input(tmp_path):
    from autopar.explain.plot import plot_plan

    tl = simulate(action_orders("1f1b", 2, 1, 2), [1, 1], [1, 1])
    with pytest.raises(AutoparError, match="use .png or .svg"):
        plot_plan(tmp_path / "plan.pdf", tl, _memory(2), 1.0, "t")
    with pytest.raises(AutoparError, match="one per rank"):
        plot_plan(tmp_path / "plan.png", tl, _memory(3), 1.0, "t")


def test_importing_pipeline_and_plot_stays_light():
    code = ("import sys, autopar.cost.pipeline, autopar.explain.plot; "
            "heavy = [m for m in ('torch', 'matplotlib', 'networkx') if m in sys.modules]; "
            "assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
