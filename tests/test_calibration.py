"""The cost model against the development set: Megatron-LM SC'21 Table 1."""

from __future__ import annotations

import pytest

from autopar.calibrate import MEGATRON_2021, dev_cluster, eq3_flops, load_dev_set, predict_published
from autopar.cost.constants import MODEL_ERROR
from autopar.plan.search import search

RUNS = load_dev_set()
TOLERANCE = 0.15
"""Issue 2's acceptance: each published iteration time predicted within 15%."""


def test_dev_set_has_ten_rows_and_eq3_reproduces_the_files_derived_times():
    import json

    from autopar.calibrate import DEV_SET

    derived = {c["id"]: c["derived"]["iteration_time_s_from_eq3"] for c in json.loads(DEV_SET.read_text())["cases"]}
    assert len(RUNS) == 10
    for run in RUNS:
        assert run.iteration_time_s == pytest.approx(derived[run.id], rel=2e-3)
    # Row 1 by hand: 96*512*2048*24*2304^2*(1 + 2048/13824 + 51200/552960) = 1.547e16 FLOPs,
    # over 32 GPUs at 137 TFLOP/s each = 3.528 s.
    assert eq3_flops(24, 2304, 51200, 2048, 512) / (32 * 137e12) == pytest.approx(3.528, rel=1e-3)


@pytest.mark.parametrize("run", RUNS, ids=[r.id for r in RUNS])
def test_published_layout_predicted_within_15_percent(run):
    best = predict_published(run).best
    plan, pins = best.plan, run.pins
    assert (plan.tp, plan.pp, plan.dp, plan.micro_batch_size, plan.virtual_stages) == (
        pins.tp, pins.pp, pins.dp, pins.micro_batch_size, pins.virtual_stages)
    assert best.cost.fits, f"{run.id}: published layout predicted not to fit in 80 GiB"
    error = best.cost.step_time_s / run.iteration_time_s - 1
    assert abs(error) <= TOLERANCE, f"{run.id}: predicted {best.cost.step_time_s:.2f} s, published {run.iteration_time_s:.2f} s"


@pytest.mark.parametrize("run", RUNS, ids=[r.id for r in RUNS])
def test_unpinned_plan_is_at_least_as_fast_and_fits(run):
    published = predict_published(run).best.cost
    result = search(run.profile, dev_cluster(run), global_batch_size=run.global_batch_size,
                    opts=MEGATRON_2021, alternatives=False)
    ours, fastest = result.best.cost, (result.fastest or result.best).cost
    assert ours.fits
    assert fastest.step_time_s <= published.step_time_s * (1 + 1e-9)
    # The plan itself may be the more robust one inside the model's error, and then says so
    # (autopar.plan.robust [Note: robust choice]; issue 10, acceptance 2).
    assert ours.step_time_s <= published.step_time_s * (1 + 1e-9) or (
        result.choice_reason and ours.step_time_s <= fastest.step_time_s * (1 + MODEL_ERROR))
