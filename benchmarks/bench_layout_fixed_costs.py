"""Fixed cost per block, and outside the blocks, of each parallel layout on this machine (issue 11: what the
cost model lacked).

    torchrun --nproc-per-node 4 benchmarks/bench_layout_fixed_costs.py [--model benchmarks/data/gpt2-8x256.json]
                                                                       [--cluster CLUSTER.json] [--json OUT.json]

The primitive ``autopar calibrate`` runs (autopar.bench.primitives.layout_fixed_rows): the model's family
shrunk until its compute is negligible, built with 1 and with 3 blocks under the one line for each layout
(tp = 1, 2, 4 with the rest data parallel, ZeRO 0; dp = world at ZeRO 3), one sequence of each of
``FIXED_TOKENS`` (8 and 512 tokens) forward and backward, the slowest rank's time; per block the difference
over two blocks, so embedding, LM head and loss cancel; outside the blocks the 1-block model's time less one
block's (calibrate's ``rest_fixed``). Beside each, what the cost model prices for the same tiny models on ``--cluster`` (the same pricing
calibrate stores, autopar.bench.calibrate): on a cluster without ``measured.layout_fixed`` the gap is the
per-block fixed cost of DTensor dispatch, redistributions and FSDP2 / replicate hooks that no other term
counts (docs/bench.md, "What the CPU figures show"); on one that holds it, the price includes the
calibration's own figure, and the two columns check that calibration against a fresh measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from autopar.bench.calibrate import price_tiny_models  # noqa: E402
from autopar.bench.primitives import layout_fixed_rows  # noqa: E402
from autopar.profile.config import load_arch  # noqa: E402
from autopar.schema import load_json_file  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "benchmarks" / "data" / "gpt2-8x256.json"))
    p.add_argument("--cluster", default=str(ROOT / "benchmarks" / "results" / "cluster_cpu_2026-11-30.json"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    arch = load_arch(args.model)
    layouts = [(tp, world // tp, 0) for tp in (1, 2, 4) if world % tp == 0] + [(1, world, 3)]
    rows = layout_fixed_rows({**(arch.raw or {}), "model_type": arch.model_type}, layouts, torch.device("cpu"))
    if dist.get_rank() == 0:
        data = load_json_file(Path(args.cluster), "cluster JSON")
        priced, rest = price_tiny_models(rows, data)
        out = []
        for (tp, dp, zero, tokens, measured_ms, priced_ms), (*_, rest_ms, rest_priced_ms) in zip(priced, rest):
            print(f"dp{dp} tp{tp} zero{zero} {tokens} tokens: measured {measured_ms:.1f} ms a block, "
                  f"priced {priced_ms:.1f} ms; outside the blocks {rest_ms:.1f} ms, priced {rest_priced_ms:.1f} ms",
                  flush=True)
            out.append({"tp": tp, "dp": dp, "zero": zero, "tokens": tokens, "per_block_s": measured_ms / 1e3,
                        "predicted_per_block_s": priced_ms / 1e3, "outside_blocks_s": rest_ms / 1e3,
                        "predicted_outside_blocks_s": rest_priced_ms / 1e3})
        if args.json:
            Path(args.json).write_text(json.dumps({"benchmark": "layout_fixed_costs", "model": arch.name,
                                                   "world": world, "cluster": args.cluster, "rows": out}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
