"""Search optimality: the pruned search against costing every candidate of the space.

    python benchmarks/bench_search_optimality.py           # table
    python benchmarks/bench_search_optimality.py --save    # benchmarks/results/search_optimality_<date>.json

For each problem (models from the presets, A100-80GB and H100 nodes of 8, 8 to 64 GPUs, the CLI's default
batch of 8 sequences per GPU), every candidate of autopar.plan.space is costed exactly (its stage split
and the schedule's DAG, autopar.plan.search.Planner.evaluate) and the fastest that fits is the oracle.
The search is run twice: ``robust=False`` must find the oracle's step time (gap 0), and the default
robust choice must lie within the cost model's stated error of it (autopar.cost.constants.MODEL_ERROR).
Also recorded: candidates, how many the search costed exactly, and both wall times.
tests/test_search.py checks the same on smaller problems in every test run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autopar.cluster import PRESETS  # noqa: E402
from autopar.cost import constants as C  # noqa: E402
from autopar.plan.search import Planner, search  # noqa: E402
from autopar.plan.space import enumerate_candidates  # noqa: E402
from autopar.plan.types import Pins  # noqa: E402
from autopar.profile.analytic import profile_analytic  # noqa: E402
from autopar.profile.config import load_arch  # noqa: E402

PROBLEMS = [("gpt2", "a100-80gb", 8, 1024), ("gpt2-xl", "a100-40gb", 16, 1024),
            ("cerebras-gpt-1.3b", "a100-80gb", 32, 2048), ("llama-3-8b", "h100-80gb", 64, 2048),
            ("megatron-gpt-18.4b", "a100-40gb", 32, 2048), ("llama-3-70b", "h100-80gb", 64, 4096)]
"""(model preset, cluster preset, GPUs, sequence length): data parallelism wins the first four, the last
two need tensor or pipeline parallelism to fit."""


def oracle(profile, cluster, batch: int):
    """The fastest fitting layout of the whole space, every candidate costed exactly."""
    planner = Planner(profile, cluster, global_batch_size=batch, pins=Pins())
    best, count = None, 0
    for cand in enumerate_candidates(profile, cluster, global_batch_size=batch, pins=Pins()):
        ev = planner.evaluate(cand)
        count += 1
        if ev is not None and ev.cost.fits and (best is None or ev.cost.step_time_s < best.cost.step_time_s):
            best = ev
    return best, count


def run(model: str, preset: str, gpus: int, seq: int) -> dict:
    profile = profile_analytic(load_arch(model), seq_len=seq)
    cluster = PRESETS[preset].with_gpus(gpus)
    batch = 8 * gpus
    start = time.perf_counter()
    best, candidates = oracle(profile, cluster, batch)
    oracle_s = time.perf_counter() - start
    start = time.perf_counter()
    fastest = search(profile, cluster, global_batch_size=batch, alternatives=False, robust=False)
    search_s = time.perf_counter() - start
    robust = search(profile, cluster, global_batch_size=batch, alternatives=False)
    gap = fastest.best.cost.step_time_s / best.cost.step_time_s - 1
    robust_gap = robust.best.cost.step_time_s / best.cost.step_time_s - 1
    return {"model": model, "cluster": preset, "gpus": gpus, "global_batch": batch, "seq_len": seq,
            "candidates": candidates, "search_costed": fastest.evaluated, "oracle_s": oracle_s,
            "search_s": search_s, "oracle": best.plan.describe(), "oracle_step_s": best.cost.step_time_s,
            "search": fastest.best.plan.describe(), "gap": gap, "robust": robust.best.plan.describe(),
            "robust_gap": robust_gap, "robust_within_model_error": robust_gap <= C.MODEL_ERROR + 1e-12}


def main() -> None:
    p = argparse.ArgumentParser(description="pruned search against exhaustive costing")
    p.add_argument("--save", action="store_true")
    args = p.parse_args()
    rows = [run(*problem) for problem in PROBLEMS]
    for r in rows:
        print(f"{r['model']:18s} {r['gpus']:3d} x {r['cluster']:10s} {r['candidates']:5d} candidates, "
              f"{r['search_costed']:4d} costed by the search ({r['search_s']:.2f} s vs {r['oracle_s']:.1f} s): "
              f"gap {r['gap']:+.2%}, robust choice {r['robust_gap']:+.2%} ({r['robust']})")
    if args.save:
        out = ROOT / "benchmarks" / "results" / f"search_optimality_{datetime.date.today().isoformat()}.json"
        out.write_text(json.dumps({"benchmark": "search_optimality", "command": " ".join(["python", *sys.argv]),
                                   "model_error": C.MODEL_ERROR, "problems": rows}, indent=1) + "\n")
        print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
