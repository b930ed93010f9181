"""Planner speed: full searches on issue 10's reference problems, and `explain` as a whole process.

    python benchmarks/bench_planner.py                 # table
    python benchmarks/bench_planner.py --json          # the rows as JSON
    python benchmarks/bench_planner.py --quick         # the four named problems only (no 70B-405B sweep)

Targets (issue 10, acceptance 4; issue 2 before it), each searched as `autopar explain` does (the CLI's
cluster, memory headroom, default batch of 8 sequences per GPU and sequence length, alternatives
included but timed apart):

- GPT-3 175B on 1024 A100-80GB in 8-GPU nodes, global batch 1536, seq 2048: planning_time_s < 1 s;
- a 1T model (Megatron-LM's 1008B row: 128 layers, hidden 25600) on 3072 GPUs, batch 3072: < 5 s;
- `autopar explain megatron-gpt-1t --gpus 512` (batch 4096) as a whole process: < 5 s wall;
- llama-3-70b and llama-3-405b on 64 to 16384 GPUs at the default batch: planning_time_s < 1 s.

planning_time_s is the search's own clock (wall), from enumerating the layouts to the robust choice; the
process row includes Python's start-up and imports. cpu_s is the search's process time: on a shared
machine the wall clock also counts other processes' turns.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autopar.errors import AutoparError  # noqa: E402
from autopar.explain.run import (  # noqa: E402
    DEFAULT_SEQUENCES_PER_GPU,
    explain_launch,
    make_pins,
    profile_model,
    resolve_seq_len,
)
from autopar.launch import launch_cluster  # noqa: E402
from autopar.plan.search import search  # noqa: E402
from autopar.profile.config import load_arch  # noqa: E402

NAMED = [  # model, GPUs, global batch (None: the CLI's default), target planning_time_s
    ("gpt3-175b", 1024, 1536, 1.0),
    ("megatron-gpt-1t", 3072, 3072, 5.0),
]
SWEEP_MODELS = ("llama-3-70b", "llama-3-405b")
SWEEP_GPUS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
SWEEP_TARGET_S = 1.0
PROCESS = ["autopar", "explain", "megatron-gpt-1t", "--gpus", "512"]
PROCESS_TARGET_S = 5.0


def bench_search(model: str, gpus: int, batch: int | None, split_solver: str = "auto") -> dict:
    """One search as `autopar explain MODEL --gpus GPUS [--global-batch BATCH]` runs it."""
    arch = load_arch(model)
    spec, planning = launch_cluster(explain_launch(model_type=arch.model_type, gpus=gpus), make_pins())
    batch = batch or DEFAULT_SEQUENCES_PER_GPU * spec.world_size
    row = {"model": model, "gpus": gpus, "global_batch": batch,
           "command": f"autopar explain {model} --gpus {gpus} --global-batch {batch}"}
    start = time.perf_counter()
    profile = profile_model(arch, resolve_seq_len(arch, None), "analytic", "sdpa", planning)
    row["profile_s"] = time.perf_counter() - start
    cpu = time.process_time()
    try:
        result = search(profile, spec, global_batch_size=batch, pins=planning.pins, split_solver=split_solver)
    except AutoparError as err:  # a model that fits no layout of this cluster: the error is the answer
        return row | {"planning_time_s": time.perf_counter() - start - row["profile_s"],
                      "cpu_s": time.process_time() - cpu, "error": str(err)}
    best = result.best
    return row | result.search_dict() | {
        "cpu_s": time.process_time() - cpu, "plan": best.plan.describe(), "step_time_s": best.cost.step_time_s,
        "mfu": best.cost.mfu, "fastest": result.fastest.plan.describe() if result.fastest else None,
        "choice_reason": result.choice_reason, "alternatives": len(result.alternatives)}


def bench_process() -> dict:
    start = time.perf_counter()
    proc = subprocess.run(PROCESS, capture_output=True, text=True)
    return {"command": " ".join(PROCESS), "wall_s": time.perf_counter() - start, "exit_code": proc.returncode}


def _line(r: dict) -> str:
    ok = "ok" if r["planning_time_s"] < r["target_s"] else "OVER TARGET"
    head = (f"{r['model']:16s} {r['gpus']:6d} GPUs batch {r['global_batch']:6d}: planning {r['planning_time_s']:.2f} s "
            f"(cpu {r['cpu_s']:.2f} s; target < {r['target_s']:.0f} s, {ok})")
    if "error" in r:
        return f"{head} -> {r['error'][:90]}"
    return (f"{head}, alternatives +{r['alternatives_time_s']:.2f} s; {r['candidates']} layouts, "
            f"{r['evaluated']}+{r['robust_costed']} costed, {r['split_solves']} splits -> {r['plan']}, "
            f"step {r['step_time_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description="planner benchmark")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the named problems only")
    parser.add_argument("--split-solver", default="auto",
                        help="auto (exact chain DP), highs or cbc (the PuLP ILP), dp")
    args = parser.parse_args()
    cases = [(m, g, b, t) for m, g, b, t in NAMED]
    if not args.quick:
        cases += [(m, g, None, SWEEP_TARGET_S) for m in SWEEP_MODELS for g in SWEEP_GPUS]
    rows = []
    for model, gpus, batch, target in cases:
        rows.append(bench_search(model, gpus, batch, args.split_solver) | {"target_s": target})
        if not args.json:
            print(_line(rows[-1]), flush=True)
    proc = bench_process() | {"target_s": PROCESS_TARGET_S}
    if args.json:
        print(json.dumps({"searches": rows, "process": proc}, indent=1))
        return
    ok = "ok" if proc["wall_s"] < proc["target_s"] else "OVER TARGET"
    print(f"process: `{proc['command']}` {proc['wall_s']:.2f} s wall (target < {proc['target_s']:.0f} s, {ok}), "
          f"exit {proc['exit_code']}")


if __name__ == "__main__":
    main()
