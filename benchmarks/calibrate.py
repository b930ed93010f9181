"""Fit the cost model's one fitted constant, GEMM_EFFICIENCY, to the development set.

    python benchmarks/calibrate.py            # fit, then print the table
    python benchmarks/calibrate.py --check    # only print the table with the constants in code

The development set is Megatron-LM SC'21 Table 1 (autopar.calibrate). Step
time is affine in 1/GEMM_EFFICIENCY and 1/MEMORY_EFFICIENCY for a fixed split
(matmul seconds + memory-bound seconds + communication), so each row is costed
at three points to get its three coefficients; GEMM_EFFICIENCY is the value on
a fine grid with the least maximum relative error, MEMORY_EFFICIENCY stays at
its physical value (autopar/cost/constants.py), and the result is checked with
the full model. ``--both`` also frees MEMORY_EFFICIENCY, to show how flat the
fit is (docs/cost-model.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autopar.calibrate import MEGATRON_2021, load_dev_set, predict_published  # noqa: E402

from autopar.cost import constants as C  # noqa: E402

GRID = [round(0.30 + 0.005 * i, 3) for i in range(341)]  # 0.30 .. 2.00


def _coefficients(run) -> tuple[float, float, float]:
    """(a, b, c) with step = a / eta_gemm + b / eta_mem + c for this row."""
    def at(g: float, m: float) -> float:
        return predict_published(run, replace(MEGATRON_2021, gemm_efficiency=g, memory_efficiency=m)).best.cost.step_time_s
    base, g2, m2 = at(1.0, 1.0), at(0.5, 1.0), at(1.0, 0.5)
    a, b = g2 - base, m2 - base
    return a, b, base - a - b


def fit(runs, free_memory: bool = False) -> tuple[float, float, float]:
    """(max relative error, gemm efficiency, memory efficiency) of the minimax fit."""
    coeffs = [_coefficients(r) for r in runs]
    best = None
    for g in GRID:
        for m in (GRID if free_memory else [C.MEMORY_EFFICIENCY]):
            err = max(abs((a / g + b / m + c) / r.iteration_time_s - 1) for (a, b, c), r in zip(coeffs, runs))
            if best is None or (err, g, m) < best:
                best = (err, g, m)
    return best


def table(runs, opts) -> list[dict]:
    rows = []
    for run in runs:
        res = predict_published(run, opts)
        cost = res.best.cost
        rows.append({"id": run.id, "published_s": run.iteration_time_s, "predicted_s": cost.step_time_s,
                     "error": cost.step_time_s / run.iteration_time_s - 1, "fits": cost.fits,
                     "peak_gib": max(cost.peak_memory_bytes) / 2**30, "published_tflops": run.tflops_per_gpu,
                     "predicted_tflops": cost.hardware_tflops_per_gpu})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only print the table for the constants in code")
    parser.add_argument("--both", action="store_true", help="fit MEMORY_EFFICIENCY too")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown (docs/cost-model.md)")
    args = parser.parse_args()
    runs = load_dev_set()
    opts = MEGATRON_2021
    if not args.check:
        err, g, m = fit(runs, free_memory=args.both)
        print(f"fit: GEMM_EFFICIENCY={g} MEMORY_EFFICIENCY={m} (max |error| {err:.1%} on the affine model)")
        opts = replace(opts, gemm_efficiency=g, memory_efficiency=m)
    rows = table(runs, opts)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    if args.markdown:
        print("| row | published s | predicted s | error | TFLOP/s published | predicted | peak GiB | fits |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['id']} | {r['published_s']:.2f} | {r['predicted_s']:.2f} | {r['error']:+.1%} | "
                  f"{r['published_tflops']:.0f} | {r['predicted_tflops']:.0f} | {r['peak_gib']:.1f} | {r['fits']} |")
        print(f"\nmax |error| {max(abs(r['error']) for r in rows):.1%}")
        return
    print(f"{'row':18s} {'published s':>12s} {'predicted s':>12s} {'error':>7s} {'TFLOP/s pub':>11s} "
          f"{'pred':>6s} {'peak GiB':>8s} fits")
    for r in rows:
        print(f"{r['id']:18s} {r['published_s']:12.2f} {r['predicted_s']:12.2f} {r['error']:+7.1%} "
              f"{r['published_tflops']:11.0f} {r['predicted_tflops']:6.0f} {r['peak_gib']:8.1f} {r['fits']}")
    print(f"max |error| {max(abs(r['error']) for r in rows):.1%}")


if __name__ == "__main__":
    main()
