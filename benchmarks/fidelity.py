"""The cost model against every published development run, pinned and unpinned.

    python benchmarks/fidelity.py            # table, summary; writes benchmarks/results/fidelity_<date>.json
    python benchmarks/fidelity.py --json     # the JSON on stdout as well
    python benchmarks/fidelity.py --no-write

For each row of both development sets (Megatron-LM SC'21 Table 1, development set 2: autopar.calibrate):

- pinned: autopar's prediction for the published layout (``predict_published``), its error against the
  published step time, and whether it is predicted to fit (every row ran, so "does not fit" is an error);
- unpinned: autopar's own plan for the same model, cluster, batch and precision (``predict_unpinned``):
  whether it is predicted at least as fast as the published layout, and fits;
- where one model has several layouts on one kind of GPU, the Spearman rank correlation between the
  published and the predicted order of their cost per token (GPU-seconds per token), and the same over
  all rows;
- rows that need a feature autopar cannot price are listed in one line each, not priced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autopar.calibrate import dev_cluster, load_dev_sets, predict_published, predict_unpinned  # noqa: E402
from autopar.cost import constants as C  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def unpinned_verdict(result, published_s: float) -> str | None:
    """Why autopar's own plan fails acceptance 2 against the published layout's ``published_s``, or None:
    it fits and is predicted at least as fast, or the planner marked it the more robust choice
    (autopar.plan.robust) over a plan that is, within the model's stated error (``MODEL_ERROR``)."""
    ours = result.best.cost
    if not ours.fits:
        return "does not fit"
    if ours.step_time_s <= published_s * (1 + 1e-9):
        return None
    fastest = result.fastest
    if (result.choice_reason and fastest is not None and fastest.cost.step_time_s <= published_s * (1 + 1e-9)
            and ours.step_time_s <= fastest.cost.step_time_s * (1 + C.MODEL_ERROR)):
        return None
    return f"predicted {ours.step_time_s / published_s - 1:+.1%} slower than the published layout"


def evaluate(run) -> dict:
    """One row, pinned and unpinned."""
    pinned = predict_published(run).best
    unpinned = predict_unpinned(run)
    ours = unpinned.best
    tokens = run.global_batch_size * run.profile.seq_len
    gpus = dev_cluster(run).world_size
    cost = pinned.cost
    return {
        "id": run.id, "group": run.group, "model": run.profile.name, "gpu": dev_cluster(run).device.name,
        "gpus": gpus, "layout": pinned.plan.describe(),
        "published_s": run.iteration_time_s, "predicted_s": cost.step_time_s,
        "error": cost.step_time_s / run.iteration_time_s - 1,
        "published_gpu_s_per_token": run.iteration_time_s * gpus / tokens,
        "predicted_gpu_s_per_token": cost.step_time_s * gpus / tokens,
        "fits": cost.fits, "peak_gib": max(cost.peak_memory_bytes) / 2**30,
        "capacity_gib": dev_cluster(run).device.memory_bytes / 2**30,
        "breakdown_s": cost.breakdown(),
        "unpinned_layout": ours.plan.describe(), "unpinned_s": ours.cost.step_time_s, "unpinned_fits": ours.cost.fits,
        "unpinned_fastest_s": (unpinned.fastest or ours).cost.step_time_s, "unpinned_reason": unpinned.choice_reason,
        "unpinned_problem": unpinned_verdict(unpinned, cost.step_time_s),
    }


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks); None for fewer than two rows."""
    if len(a) < 2:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else None


def layout_orders(rows: list[dict]) -> list[dict]:
    """Spearman per model and GPU kind with several layouts, on the cost per token."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["gpu"]), []).append(r)
    out = []
    for (model, gpu), rs in sorted(groups.items()):
        if len(rs) < 2:
            continue
        rho = spearman([r["published_gpu_s_per_token"] for r in rs], [r["predicted_gpu_s_per_token"] for r in rs])
        out.append({"model": model, "gpu": gpu, "layouts": len(rs), "spearman": rho})
    return out


def summarise(rows: list[dict]) -> dict:
    def stats(rs: list[dict]) -> dict:
        errors = [abs(r["error"]) for r in rs]
        return {"rows": len(rs), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}

    orders = layout_orders(rows)
    return {
        "all": stats(rows),
        "by_group": {g: stats([r for r in rows if r["group"] == g]) for g in sorted({r["group"] for r in rows})},
        "layout_orders": orders,
        "spearman_all_rows": spearman([r["published_gpu_s_per_token"] for r in rows],
                                      [r["predicted_gpu_s_per_token"] for r in rows]),
        "predicted_not_to_fit": [r["id"] for r in rows if not r["fits"]],
        "unpinned_problems": {r["id"]: r["unpinned_problem"] for r in rows if r["unpinned_problem"]},
        "unpinned_robust_choices": [r["id"] for r in rows if r["unpinned_reason"]],
    }


def _print(rows: list[dict], summary: dict, skipped: list[str]) -> None:
    print(f"{'row':34s} {'published s':>11s} {'predicted s':>11s} {'error':>7s} {'peak/cap GiB':>13s} "
          f"{'unpinned s':>10s}  unpinned plan")
    for r in rows:
        print(f"{r['id']:34s} {r['published_s']:11.2f} {r['predicted_s']:11.2f} {r['error']:+7.1%} "
              f"{r['peak_gib']:6.1f}/{r['capacity_gib']:<6.1f} {r['unpinned_s']:10.2f}  {r['unpinned_layout']}"
              + ("" if r["fits"] else "  PREDICTED NOT TO FIT") + (" (robust choice)" if r["unpinned_reason"] else ""))
    for line in skipped:
        print(f"not priced: {line}")
    for name, s in [*summary["by_group"].items(), ("all", summary["all"])]:
        print(f"{name}: median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%} ({s['rows']} rows)")
    for o in summary["layout_orders"]:
        print(f"layout order {o['model']} on {o['gpu']} ({o['layouts']} layouts): Spearman {o['spearman']:+.2f}")
    print(f"cost per token over all rows: Spearman {summary['spearman_all_rows']:+.3f}")
    print(f"predicted not to fit (all ran): {summary['predicted_not_to_fit'] or 'none'}")
    print(f"unpinned plan predicted slower than the published layout (not a marked robust choice within the "
          f"model's error) or not fitting: {summary['unpinned_problems'] or 'none'}")
    print(f"unpinned plans the planner chose as the more robust within the model's error: "
          f"{summary['unpinned_robust_choices'] or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON too")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    args = parser.parse_args()
    rows, skipped = [], []
    for run in load_dev_sets():
        if run.unsupported:
            skipped.append(f"{run.id}: {run.unsupported}")
            continue
        rows.append(evaluate(run))
    summary = summarise(rows)
    result = {"date": datetime.date.today().isoformat(), "rows": rows, "not_priced": skipped, "summary": summary}
    _print(rows, summary, skipped)
    if args.json:
        print(json.dumps(result, indent=1))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"fidelity_{result['date']}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
