"""Predicted against measured step time on this machine, and the regret of autopar's choice (issue 11).

    python benchmarks/bench_predicted_vs_measured.py                 # calibrate, then bench both models
    python benchmarks/bench_predicted_vs_measured.py --cluster benchmarks/results/cluster_cpu_DATE.json
    python benchmarks/bench_predicted_vs_measured.py --save          # keep the JSON in benchmarks/results/

What (acceptance 1-2 of issue 11): ``autopar calibrate -n 4`` measures this machine's primitives (the
GPT-2-shape model's matmul shapes among them; the example's model is never shown to it), then ``autopar
bench`` runs the layouts of the issue's table on 4 gloo ranks, fp32, for two models:

- ``gpt2-8x256`` (benchmarks/data/gpt2-8x256.json: GPT-2's vocabulary, 8 layers, hidden 256), global batch
  16 x 128 tokens;
- the example's model (examples/cerebras-gpt-tiny), global batch 8 x 128 (its script's), a shape
  calibrate never saw.

Each layout runs ``--warmup`` steps, then ``--rounds`` interleaved rounds of ``--steps`` steps; the
record (docs/bench.md) holds every step time, the predicted terms, memory and losses. The summary gives,
per model: each layout's predicted / measured ratio (target within 25%), the Spearman correlation of the
predicted and measured order with layouts inside each other's p25-p75 tied (target >= 0.8), autopar's
choice against the best measured layout (target within 10%) and against plain DDP (no slower beyond the
spread). A noisy machine (other processes on the 2 cores) shows as wide spreads and a high load average,
both recorded; rerun then.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GPT2 = "benchmarks/data/gpt2-8x256.json"
EXAMPLE = "examples/cerebras-gpt-tiny"
WORLD = 4
TABLE = ["dp=4 mb=1 zero=3", "dp=4 mb={per_rank} zero=3", "dp=2 tp=2", "dp=2 pp=2 schedule=interleaved_1f1b",
         "tp=2 pp=2 schedule=interleaved_1f1b", "tp=4", "pp=4 schedule=1f1b"]
"""The issue's table (its DDP row is bench's baseline); ``{per_rank}``: the whole per-rank batch."""
MODELS = {GPT2: 16, EXAMPLE: 8}
"""Model -> global batch (128 tokens a sequence)."""


def autopar(*args: str) -> None:
    cmd = [sys.executable, "-m", "autopar", *args]
    print("$ autopar " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def bench(model: str, batch: int, cluster: Path, out: Path, args) -> dict:
    layouts = []
    for layout in TABLE:
        layouts += ["--layout", layout.format(per_rank=batch // WORLD)]
    autopar("bench", "--model", model, "-n", str(WORLD), "--seq-len", "128", "--global-batch", str(batch),
            "--precision", "fp32", "--cluster", str(cluster), *layouts, "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--rounds", str(args.rounds), "--json", str(out),
            "--plot", str(out.with_suffix(".png")))
    return json.loads(out.read_text())


def summarise(record: dict) -> dict:
    rows = []
    for x in record["layouts"]:
        st = x["measured"]["step_time"]
        rows.append({"layout": x["layout"], "name": x["name"], "predicted_s": (x["predicted"] or {}).get("step_time_s"),
                     "measured_median_s": st["median_s"], "p25_s": st["p25_s"], "p75_s": st["p75_s"],
                     "round_medians_s": st["round_medians_s"], "ratio": x["ratio"],
                     "within_25pct": x["ratio"] is not None and abs(x["ratio"] - 1) <= 0.25,
                     "memory_ratio": [c["ratio"] for c in x["memory_check"]]})
    return {"model": record["job"]["model"], "rows": rows, **record["summary"],
            "load_avg_1min": record["where"]["load_avg_1min"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cluster", type=Path, help="a calibrated cluster JSON (default: calibrate now)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--save", action="store_true", help="keep the JSON files in benchmarks/results/")
    args = p.parse_args()
    date = datetime.date.today().isoformat()
    folder = RESULTS if args.save else Path(os.environ.get("TMPDIR", "/tmp"))
    folder.mkdir(exist_ok=True)
    cluster = args.cluster
    if cluster is None:
        cluster = folder / f"cluster_cpu_{date}.json"
        autopar("calibrate", "-n", str(WORLD), "--out", str(cluster), "--model", GPT2, "--seq-len", "128",
                "--global-batch", str(MODELS[GPT2]))
    out = {"benchmark": "predicted_vs_measured", "date": date, "cluster": str(cluster.relative_to(ROOT))
           if cluster.is_relative_to(ROOT) else str(cluster), "command": " ".join(sys.argv), "models": {}}
    for model, batch in MODELS.items():
        name = Path(model).stem.replace(".", "_")
        record = bench(model, batch, cluster, folder / f"bench_{name}_{date}.json", args)
        out["models"][model] = summarise(record)
    path = folder / f"predicted_vs_measured_{date}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    for model, s in out["models"].items():
        print(f"\n{model}: Spearman {s['spearman']}, regret {s.get('regret')}, vs DDP {s.get('vs_ddp')}, "
              f"load {s['load_avg_1min']}")
        for r in s["rows"]:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
            print(f"  {r['layout'][:60]:60s} pred {r['predicted_s'] or 0:6.2f} s  meas {r['measured_median_s']:6.2f} s "
                  f"({r['p25_s']:.2f}-{r['p75_s']:.2f})  ratio {ratio}")
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
