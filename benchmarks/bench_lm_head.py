"""The LM head and its loss on one CPU rank, measured against the cost model, across logits sizes.

    python benchmarks/bench_lm_head.py --cluster CLUSTER.json [--json OUT.json]

For GPT-2's head at width 256 and two vocabularies (4096: the example's; 50257: GPT-2's), at micro-batches
whose fp32 logits run from 4 MiB (from the heap) to 196 MiB (mapped anew by glibc on every call), one
process times ``lm_head(h)`` and transformers' ``ForCausalLMLoss`` forward and backward (fastest of 7
samples), and prints what the cost model charges for the same micro-batch on ``--cluster``: the head's
forward and backward (its matmuls at the measured matmul rates, the loss's counted traffic at
``device.loss_TBps``) plus, on a calibrated CPU, the loss's fresh pages at ``device.fresh_pages_GBps``
(autopar.cost.fresh_pages). A loss rate timed over freshly mapped logits charges every size the faults of
a large one; timed from the heap and with the faults priced apart, each size pays what it maps. The
process runs on glibc's own heap (it never starts the executor, whose CPU heap keeps its pages:
autopar.execute.heap), so compare it with a calibration made with ``AUTOPAR_CPU_HEAP=release``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SEQ, WIDTH = 128, 256
CASES = [(4096, 2), (4096, 8), (50257, 1), (50257, 4), (50257, 8)]
"""(vocabulary, micro-batch): fp32 logits of 4, 16, 24.5, 98 and 196 MiB."""


def measured_s(vocab: int, batch: int) -> float:
    from transformers.loss.loss_utils import ForCausalLMLoss

    head = torch.nn.Linear(WIDTH, vocab, bias=False)
    hidden = torch.randn(batch, SEQ, WIDTH, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, SEQ))

    def step() -> None:
        ForCausalLMLoss(head(hidden), labels, vocab).backward()
        hidden.grad = None
        head.weight.grad = None

    for _ in range(2):
        step()
    samples = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(3):
            step()
        samples.append((time.perf_counter() - start) / 3)
    return min(samples)


def priced_s(vocab: int, batch: int, cluster) -> tuple[float, float]:
    """(the head's forward + backward, of which fresh pages) for one micro-batch, as the cost model
    prices it (one rank, no parallelism)."""
    from autopar.cost.fresh_pages import chunk_fresh_bytes
    from autopar.cost.layers import CostOptions, layer_costs
    from autopar.plan.types import Plan, Precision, Schedule, StagePlan
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict
    from autopar.profile.types import LayerKind, Recompute

    arch = arch_from_dict("head", {"model_type": "gpt2", "n_embd": WIDTH, "n_layer": 1, "n_head": 4,
                                   "vocab_size": vocab, "n_positions": SEQ, "tie_word_embeddings": False})
    profile = profile_analytic(arch, seq_len=SEQ, dtype_bytes=4, device_type="cpu")
    costs = layer_costs(profile, cluster, tp=1, sequence_parallel=False, recompute=Recompute.NONE,
                        opts=CostOptions(), micro_batch_size=batch)
    head = [c for c in costs if c.kind is LayerKind.LM_HEAD]
    names = tuple(n for n, _ in profile.flat_layers())
    plan = Plan(dp=1, tp=1, pp=1, micro_batch_size=batch, num_microbatches=1, schedule=Schedule.ONE_F_ONE_B,
                virtual_stages=1, recompute=Recompute.NONE, zero_stage=0, stages=(StagePlan(index=0, layers=names),),
                global_batch_size=batch, seq_len=SEQ, precision=Precision.FP32, sequence_parallel=False)
    rate = cluster.device.fresh_page_bytes_per_s
    fresh = sum(chunk_fresh_bytes(head, plan)) / rate if rate else 0.0
    return batch * (head[0].fwd_s + head[0].bwd_s) + fresh, fresh


def main() -> None:
    from autopar.cluster import load_cluster

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cluster", required=True, help="a cluster JSON from autopar calibrate (or a preset)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    cluster = load_cluster(args.cluster)
    rows = []
    for vocab, batch in CASES:
        measured = measured_s(vocab, batch)
        priced, fresh = priced_s(vocab, batch, cluster)
        mib = batch * SEQ * vocab * 4 / 2**20
        rows.append({"vocab": vocab, "micro_batch": batch, "logits_mib": mib, "measured_s": measured,
                     "priced_s": priced, "priced_fresh_s": fresh})
        print(f"vocab {vocab:6d} x {batch} sequences ({mib:5.1f} MiB of logits): measured {measured * 1e3:7.2f} ms, "
              f"priced {priced * 1e3:7.2f} ms (fresh pages {fresh * 1e3:6.2f}), ratio {priced / measured:.2f}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "lm_head", "cluster": args.cluster,
                                               "calibration": cluster.calibration, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
