"""Fit the cost model's one fitted constant, KERNEL_SUSTAINED, to the development sets, and check it.

    python benchmarks/calibrate.py             # fit on both sets, then print the per-row table
    python benchmarks/calibrate.py --check     # the table with the constants in code (no fit)
    python benchmarks/calibrate.py --cross     # fit on each development group, predict the others
    python benchmarks/calibrate.py --markdown  # tables as markdown (docs/cost-model.md)

The development sets are Megatron-LM SC'21 Table 1 and development set 2 (MosaicML's MPT FSDP table,
Korthikanti et al. 2022's Table 5): autopar.calibrate. Every other constant is physical, from a
datasheet, a paper or a measurement named where it is defined (autopar/cost/constants.py,
autopar/cluster.py, autopar/cost/kernels.py). KERNEL_SUSTAINED, the fraction of the kernels' benchmarked
rates a training step sustains, is the value on a grid (0.60 to 1.00, refined to 0.005) that minimises the
mean squared log error of the pinned predictions over every row (least squares on the ratio predicted /
published); each row is priced with its run's stated runtime features (``PublishedRun.runtime``), never
with a constant of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autopar.calibrate import load_dev_sets, predict_published  # noqa: E402
from autopar.cost import constants as C  # noqa: E402

COARSE = [round(0.60 + 0.02 * i, 3) for i in range(21)]  # 0.60 .. 1.00


def predicted_s(run, sustained: float) -> float:
    """The pinned prediction of ``run`` with KERNEL_SUSTAINED = ``sustained`` and its own runtime."""
    return predict_published(run, replace(run.runtime, kernel_sustained=sustained)).best.cost.step_time_s


def loss(runs, sustained: float) -> float:
    """Mean squared log error of the pinned predictions."""
    return statistics.fmean(math.log(predicted_s(r, sustained) / r.iteration_time_s) ** 2 for r in runs)


def fit(runs) -> float:
    """KERNEL_SUSTAINED minimising :func:`loss` on ``runs``: a 0.02 grid, then 0.005 around its best."""
    best = min(COARSE, key=lambda g: loss(runs, g))
    fine = [round(best + 0.005 * i, 3) for i in range(-3, 4) if 0.0 < best + 0.005 * i <= 1.0]
    return min(fine, key=lambda g: loss(runs, g))


def table(runs, sustained: float) -> list[dict]:
    rows = []
    for run in runs:
        cost = predict_published(run, replace(run.runtime, kernel_sustained=sustained)).best.cost
        rows.append({"id": run.id, "group": run.group, "published_s": run.iteration_time_s,
                     "predicted_s": cost.step_time_s, "error": cost.step_time_s / run.iteration_time_s - 1,
                     "fits": cost.fits, "peak_gib": max(cost.peak_memory_bytes) / 2**30,
                     "published_tflops": run.tflops_per_gpu, "predicted_tflops": cost.hardware_tflops_per_gpu})
    return rows


def summary(rows) -> dict:
    errors = [abs(r["error"]) for r in rows]
    return {"rows": len(rows), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}


def cross_groups(runs) -> list[dict]:
    """The generalisation check of docs/cost-model.md: for each development group, fit on it alone and
    predict the others, and fit on the others and predict it."""
    groups = sorted({r.group for r in runs})
    out = []
    for group in groups:
        inside = [r for r in runs if r.group == group]
        outside = [r for r in runs if r.group != group]
        alone, others = fit(inside), fit(outside)
        out.append({"group": group,
                    "fitted_on_it": {"kernel_sustained": alone, "it": summary(table(inside, alone)),
                                     "others": summary(table(outside, alone))},
                    "fitted_on_the_others": {"kernel_sustained": others, "others": summary(table(outside, others)),
                                             "it": summary(table(inside, others))}})
    return out


def _print_rows(rows, markdown: bool) -> None:
    if markdown:
        print("| row | published s | predicted s | error | TFLOP/s published | predicted | peak GiB | fits |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['id']} | {r['published_s']:.2f} | {r['predicted_s']:.2f} | {r['error']:+.1%} | "
                  f"{r['published_tflops']:.0f} | {r['predicted_tflops']:.0f} | {r['peak_gib']:.1f} | {r['fits']} |")
    else:
        print(f"{'row':34s} {'published s':>12s} {'predicted s':>12s} {'error':>7s} {'TFLOP/s pub':>11s} "
              f"{'pred':>6s} {'peak GiB':>8s} fits")
        for r in rows:
            print(f"{r['id']:34s} {r['published_s']:12.2f} {r['predicted_s']:12.2f} {r['error']:+7.1%} "
                  f"{r['published_tflops']:11.0f} {r['predicted_tflops']:6.0f} {r['peak_gib']:8.1f} {r['fits']}")
    for group in sorted({r["group"] for r in rows}):
        s = summary([r for r in rows if r["group"] == group])
        print(f"{group}: median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%} ({s['rows']} rows)")
    s = summary(rows)
    print(f"all: median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%} ({s['rows']} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only print the table for the constants in code")
    parser.add_argument("--cross", action="store_true", help="fit on each group and predict the others")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown (docs/cost-model.md)")
    args = parser.parse_args()
    runs = load_dev_sets()
    if args.cross:
        result = cross_groups(runs)
        if args.json:
            print(json.dumps(result, indent=1))
            return
        for c in result:
            a, b = c["fitted_on_it"], c["fitted_on_the_others"]
            print(f"{c['group']}: fitted on it alone (KERNEL_SUSTAINED={a['kernel_sustained']}): it median "
                  f"{a['it']['median_abs_error']:.1%} max {a['it']['max_abs_error']:.1%}; the others median "
                  f"{a['others']['median_abs_error']:.1%} max {a['others']['max_abs_error']:.1%}")
            print(f"    fitted on the others (KERNEL_SUSTAINED={b['kernel_sustained']}): the others median "
                  f"{b['others']['median_abs_error']:.1%} max {b['others']['max_abs_error']:.1%}; it median "
                  f"{b['it']['median_abs_error']:.1%} max {b['it']['max_abs_error']:.1%}")
        return
    sustained = C.KERNEL_SUSTAINED
    if not args.check:
        sustained = fit(runs)
        print(f"fit: KERNEL_SUSTAINED={sustained} (mean squared log error {loss(runs, sustained):.5f}; "
              f"in code: {C.KERNEL_SUSTAINED})")
    rows = table(runs, sustained)
    if args.json:
        print(json.dumps({"kernel_sustained": sustained, "rows": rows, "summary": summary(rows)}, indent=1))
        return
    _print_rows(rows, args.markdown)


if __name__ == "__main__":
    main()
