"""Fixed cost per block of each parallel layout on this machine (issue 11: what the cost model lacks).

    torchrun --nproc-per-node 4 benchmarks/bench_layout_fixed_costs.py [--model benchmarks/data/gpt2-8x256.json]
                                                                       [--json OUT.json]

The model's own family, shrunk until its compute is negligible (heads 2 x tp, head width 8, MLP 4x,
vocabulary 64 x tp, one micro-batch of one 8-token sequence), is built with 1 and with 3 blocks under the
one line for each layout (tp = 1, 2, 4 with the rest data parallel, ZeRO 0; and dp = world at ZeRO 3), and
the forward + backward is timed between barriers (median of 10 after 2 warm-up steps; the slowest rank's,
as a step waits for it). Per block: (t(3 blocks) - t(1 block)) / 2, so the embedding, LM head and loss
cancel. Next to it, what the cost model prices for the same tiny models on the calibrated cluster
(``--cluster``): the gap is the per-block fixed cost of DTensor dispatch, redistributions and FSDP2 / replicate
hooks that no cost term counts yet (docs/bench.md, "What the CPU figures show").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

import autopar  # noqa: E402
from autopar.profile.config import load_arch  # noqa: E402

SEQ = 8
STEPS, WARMUP = 12, 2
WIDTH_KEYS = {"gpt2": ("n_embd", "n_head", None, "n_inner", "n_layer", "n_positions"),
              "decoder": ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                          "num_hidden_layers", "max_position_embeddings")}
"""Config keys of the widths, per raw-config style: GPT-2's and transformers' common decoder names."""


def tiny_config(arch, tp: int, layers: int):
    """The model's config with its widths shrunk (structure kept) and ``layers`` blocks."""
    raw = {k: v for k, v in (arch.raw or {}).items() if not k.startswith("_")}
    hidden, heads, kv, ffn, depth, positions = WIDTH_KEYS["gpt2" if "n_embd" in raw else "decoder"]
    n_heads = 2 * tp
    raw.update({hidden: 8 * n_heads, heads: n_heads, ffn: 32 * n_heads, depth: layers, "vocab_size": 64 * tp,
                positions: 64})
    if kv:
        raw[kv] = tp if raw.get(kv, n_heads) != raw.get(heads) else n_heads
        raw["head_dim"] = 8
    raw.pop("bos_token_id", None), raw.pop("eos_token_id", None)
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    config.use_cache = False
    return config


def step_s(arch, tp: int, dp: int, zero: int, layers: int) -> float:
    """Median seconds of one forward + backward of the tiny model under the layout (slowest rank)."""
    autopar.enable_advanced_parallelization(global_batch_size=dp, seq_len=SEQ, tp=tp, dp=dp, pp=1,
                                            micro_batch_size=1, zero_stage=zero, log_every=0, check_batch=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, tp, layers))
    autopar.disable_advanced_parallelization()
    ids = torch.randint(0, 64, (dp, SEQ), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(STEPS):
        dist.barrier()
        start = time.perf_counter()
        model(ids, labels=ids, use_cache=False)[0].backward()
        model.zero_grad(set_to_none=True)
        dist.barrier()
        times.append(time.perf_counter() - start)
    t = torch.tensor([statistics.median(times[WARMUP:])], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item()), model._autopar.plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "benchmarks" / "data" / "gpt2-8x256.json"))
    p.add_argument("--cluster", default=str(ROOT / "benchmarks" / "results" / "cluster_cpu_2026-11-30.json"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    arch = load_arch(args.model)
    layouts = [(tp, world // tp, 0) for tp in (1, 2, 4) if world % tp == 0] + [(1, world, 3)]
    rows = []
    for tp, dp, zero in layouts:
        (t1, plan1), (t3, plan3) = (step_s(arch, tp, dp, zero, n) for n in (1, 3))
        row = {"tp": tp, "dp": dp, "zero": zero, "layout": plan3.describe(), "step_1_block_s": t1, "step_3_blocks_s": t3,
               "per_block_s": (t3 - t1) / 2}
        if rank == 0:
            from autopar.cluster import load_cluster
            from autopar.cost.model import estimate
            from autopar.profile.analytic import profile_analytic
            from autopar.profile.config import arch_from_dict

            cluster = load_cluster(args.cluster)
            predicted = []
            for n, plan in ((1, plan1), (3, plan3)):
                cfg = tiny_config(arch, tp, n).to_dict()
                tiny = arch_from_dict(f"tiny-{n}", {**cfg, "model_type": arch.model_type})
                predicted.append(estimate(profile_analytic(tiny, seq_len=SEQ, dtype_bytes=4), cluster,
                                          plan).step_time_s)
            row["predicted_per_block_s"] = (predicted[1] - predicted[0]) / 2
            print(f"dp{dp} tp{tp} zero{zero}: measured {row['per_block_s'] * 1e3:.1f} ms a block, priced "
                  f"{row['predicted_per_block_s'] * 1e3:.1f} ms (whole tiny step: 1 block {t1 * 1e3:.0f} ms, "
                  f"3 blocks {t3 * 1e3:.0f} ms)", flush=True)
        rows.append(row)
    if rank == 0 and args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "layout_fixed_costs", "model": arch.name,
                                               "world": world, "cluster": args.cluster, "rows": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
