"""The cost model's compute terms against one process on this machine, term by term (issue 11).

    python benchmarks/bench_cost_terms.py --cluster cluster.json [--model benchmarks/data/gpt2-8x256.json]
    python benchmarks/bench_cost_terms.py --cluster cluster.json --save

Where `bench_predicted_vs_measured.py` says a layout's prediction is off, this says which term: one
process (one thread, the machine otherwise idle, as calibrate's kernel tables were taken) runs the
model's forward + backward at every micro-batch size the planner considers, the LM head (+ loss) and
one block alone, and the AdamW step; each is set beside the same term of the cost model on the
calibrated cluster (autopar.cost.layers.layer_costs per sequence times the micro-batch; the optimizer
step before the sharing factor). Nothing here is a layout's step: no collective, no pipeline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from autopar.cost.data_parallel import optimizer_rate, optimizer_step_s  # noqa: E402
from autopar.cost.layers import CostOptions, layer_costs  # noqa: E402
from autopar.launch import Launch, launch_cluster  # noqa: E402
from autopar.plan.types import Precision  # noqa: E402
from autopar.profile.analytic import profile_analytic  # noqa: E402
from autopar.profile.config import load_arch  # noqa: E402
from autopar.profile.measured import build_model  # noqa: E402
from autopar.profile.types import LayerKind, Recompute  # noqa: E402

SEQ = 128
REPS = 5


def best_of(fn, reps: int = REPS) -> float:
    """The fastest of ``reps`` runs after one warm-up (other processes only add time)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def predicted(profile, cluster, mb: int) -> dict[str, float]:
    """Per micro-batch of ``mb`` sequences: the model's forward + backward and its LM head's and one block's."""
    costs = layer_costs(profile, cluster, tp=1, sequence_parallel=False, recompute=Recompute.NONE,
                        opts=CostOptions(), micro_batch_size=mb)
    total = mb * sum(c.fwd_s + c.bwd_s for c in costs)
    head = mb * sum(c.fwd_s + c.bwd_s for c in costs if c.kind is LayerKind.LM_HEAD)
    block = next(mb * (c.fwd_s + c.bwd_s) for c in costs if c.kind is LayerKind.BLOCK)
    return {"model_s": total, "lm_head_s": head, "block_s": block}


def measured(model, mb: int, vocab: int) -> dict[str, float]:
    ids = torch.randint(0, vocab, (mb, SEQ))

    def step() -> None:
        model(ids, labels=ids, use_cache=False).loss.backward()

    head = model.get_output_embeddings()
    hidden = torch.randn(mb, SEQ, head.in_features, requires_grad=True)

    def lm_head() -> None:
        logits = head(hidden).float()
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)).backward()

    block = model.base_model.h[0] if hasattr(model.base_model, "h") else model.base_model.layers[0]
    x = torch.randn(mb, SEQ, head.in_features, requires_grad=True)

    def one_block() -> None:
        out = block(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    return {"model_s": best_of(step), "lm_head_s": best_of(lm_head), "block_s": best_of(one_block)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cluster", required=True, help="a calibrated cluster JSON (autopar calibrate)")
    p.add_argument("--model", action="append", default=None)
    p.add_argument("--micro-batches", default="1,2,4,8,16")
    p.add_argument("--save", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = args.model or ["benchmarks/data/gpt2-8x256.json", "examples/cerebras-gpt-tiny"]
    cluster, _ = launch_cluster(Launch(world_size=4, cluster=args.cluster, precision=Precision.FP32, dtype_bytes=4,
                                       model_type="gpt2"))
    out = {"benchmark": "cost_terms", "date": datetime.date.today().isoformat(), "cluster": args.cluster,
           "calibration": cluster.calibration, "load_avg_1min": os.getloadavg()[0], "models": {}}
    for ref in models:
        arch = load_arch(ref)
        profile = profile_analytic(arch, seq_len=SEQ, dtype_bytes=4, attention="sdpa", device_type="cpu")
        model = build_model(arch, dtype_bytes=4)
        rows = []
        for mb in (int(x) for x in args.micro_batches.split(",")):
            pred, meas = predicted(profile, cluster, mb), measured(model, mb, arch.vocab_size)
            rows.append({"micro_batch_size": mb, **{f"predicted_{k}": v for k, v in pred.items()},
                         **{f"measured_{k}": v for k, v in meas.items()}})
            print(f"{arch.name} mb {mb:2d}: " + ", ".join(
                f"{k.removesuffix('_s')} {pred[k]:.3f}/{meas[k]:.3f} s ({pred[k] / meas[k]:.2f}x)" for k in pred),
                flush=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for q in model.parameters():
            q.grad = torch.zeros_like(q)
        opt_meas = best_of(opt.step)
        params = sum(q.numel() for q in model.parameters())
        plan_like = type("P", (), {"dp": 1, "zero_stage": 0, "precision": Precision.FP32})()
        rate = optimizer_rate(cluster.device, CostOptions().memory_efficiency)
        tensors = sum(1 for _ in model.parameters())
        opt_pred = optimizer_step_s(plan_like, params, rate, tensors, cluster.overhead_s("adamw_tensor"))
        print(f"{arch.name} AdamW step: predicted {opt_pred:.3f} s, measured {opt_meas:.3f} s "
              f"({opt_pred / opt_meas:.2f}x)")
        ratios = {k: statistics.median(r[f"predicted_{k}"] / r[f"measured_{k}"] for r in rows)
                  for k in ("model_s", "lm_head_s", "block_s")}
        out["models"][arch.name] = {"rows": rows, "optimizer": {"predicted_s": opt_pred, "measured_s": opt_meas},
                                    "median_ratio": ratios}
    if args.save:
        path = ROOT / "benchmarks" / "results" / f"cost_terms_{out['date']}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
