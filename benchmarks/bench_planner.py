"""Planner speed: full searches on the issue's reference problems, and `explain` as a whole process.

    python benchmarks/bench_planner.py           # table
    python benchmarks/bench_planner.py --json

Cases (issue 2, acceptance 2): GPT-3 175B on 1024 A100-80GB in 8-GPU nodes,
global batch 1536, seq 2048 (target: planning_time_s < 1 s), and a 1T model
(Megatron-LM's 1008B row: 128 layers, hidden 25600) on 3072 GPUs, global
batch 3072 (target: < 5 s). Each is searched in full, alternatives included,
as `autopar explain` does. Planning time excludes the Python start-up and
imports, which the process timing below includes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autopar.cluster import PRESETS  # noqa: E402
from autopar.plan.search import search  # noqa: E402
from autopar.profile.analytic import profile_analytic  # noqa: E402
from autopar.profile.config import load_arch  # noqa: E402

CASES = [
    ("gpt3-175b", 1024, 1536, 2048, 1.0),
    ("megatron-gpt-1t", 3072, 3072, 2048, 5.0),
]
PROCESS = ["autopar", "explain", "cerebras-gpt-13b", "--gpus", "16"]
PROCESS_TARGET_S = 8.0


def bench_search(model: str, gpus: int, batch: int, seq: int, split_solver: str = "auto") -> dict:
    start = time.perf_counter()
    profile = profile_analytic(load_arch(model), seq_len=seq)
    profile_s = time.perf_counter() - start
    result = search(profile, PRESETS["a100-80gb"].with_gpus(gpus), global_batch_size=batch,
                    split_solver=split_solver)
    best = result.best
    return {"model": model, "gpus": gpus, "global_batch": batch, "profile_s": profile_s,
            **result.search_dict(), "plan": best.plan.describe(), "step_time_s": best.cost.step_time_s,
            "mfu": best.cost.mfu, "alternatives": len(result.alternatives)}


def bench_process() -> dict:
    start = time.perf_counter()
    proc = subprocess.run(PROCESS, capture_output=True, text=True)
    return {"command": " ".join(PROCESS), "wall_s": time.perf_counter() - start, "exit_code": proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description="planner benchmark")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--split-solver", default="auto",
                        help="auto (exact chain DP), highs or cbc (the PuLP ILP), dp")
    args = parser.parse_args()
    rows = [bench_search(*case[:4], split_solver=args.split_solver) | {"target_s": case[4]} for case in CASES]
    proc = bench_process() | {"target_s": PROCESS_TARGET_S}
    if args.json:
        print(json.dumps({"searches": rows, "process": proc}, indent=1))
        return
    for r in rows:
        ok = "ok" if r["planning_time_s"] < r["target_s"] else "OVER TARGET"
        print(f"{r['model']:16s} {r['gpus']:5d} GPUs  planning {r['planning_time_s']:.2f} s (target < {r['target_s']:.0f} s, {ok}), "
              f"alternatives +{r['alternatives_time_s']:.2f} s; "
              f"{r['candidates']} layouts, {r['evaluated']} costed, {r['split_solves']} splits ({args.split_solver}), "
              f"{r['alternatives']} alternatives -> {r['plan']}, step {r['step_time_s']:.2f} s, MFU {r['mfu']:.1%}")
    ok = "ok" if proc["wall_s"] < proc["target_s"] else "OVER TARGET"
    print(f"process: `{proc['command']}` {proc['wall_s']:.2f} s wall (target < {proc['target_s']:.0f} s, {ok}), "
          f"exit {proc['exit_code']}")


if __name__ == "__main__":
    main()
