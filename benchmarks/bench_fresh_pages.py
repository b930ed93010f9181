"""Fresh pages per training step on CPU ranks: counted, faulted, and priced (autopar.cost.fresh_pages).

    torchrun --nproc-per-node 4 benchmarks/bench_fresh_pages.py [--model benchmarks/data/gpt2-8x256.json]
        [--cluster CLUSTER.json] [--global-batch 16] [--layout "dp=4 mb=1 zero=3" ...] [--json OUT.json]

For each layout, built by the one line on the model (fp32, 128 tokens a sequence, synthetic tokens) with
``torch.optim.AdamW``, every rank reports per step:

- ``counted``: allocations of at least ``FRESH_MAP_BYTES`` (glibc's largest mmap threshold) in one step
  under torch.profiler (``profile_memory``), split into matmul outputs (``aten::mm``/``addmm``/``bmm``,
  whose cost ``autopar calibrate``'s matmul rows measure) and the rest;
- ``faulted``: minor page faults (``getrusage``) times the page size, and the kernel (sys) seconds, over
  ``--steps`` steps;
- ``priced``: the bytes the cost model maps in fresh for the rank's pipeline stage
  (``StageCost.fresh_page_bytes``).

The executor keeps a CPU rank's heap by default (autopar.execute.heap [Note: the CPU heap]): a step then
faults nothing in after the first ones, and nothing is priced. What this benchmark counts is glibc's own
heap: run it with ``AUTOPAR_CPU_HEAP=release`` (for torchrun's ranks, which autopar's launchers do not
start). The rest of the counted bytes is what the model should price, and the faulted bytes are what the step
touches anew; where the model prices an allocation the step never touches, or misses one, the columns say
so. The constants behind the count (autopar.cost.constants, "Fresh pages") were read off this benchmark's
allocations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

MIB = 2**20
LAYOUTS = ["dp=4 mb=4 zero=0", "dp=4 mb=1 zero=3", "dp=4 mb=4 zero=3", "dp=2 tp=2", "tp=4",
           "dp=2 pp=2 schedule=interleaved_1f1b", "tp=2 pp=2 schedule=interleaved_1f1b", "pp=4 schedule=1f1b"]
"""The layouts of benchmarks/bench_predicted_vs_measured.py's table (the first: torch's DDP under the one
line)."""
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def _counted(step) -> tuple[float, float]:
    """(matmul outputs, the rest): bytes of allocations of at least FRESH_MAP_BYTES in one ``step``."""
    from torch.profiler import ProfilerActivity, profile

    from autopar.cost.constants import FRESH_MAP_BYTES

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    matmul = rest = 0.0
    for event in prof.events():
        size = event.self_cpu_memory_usage
        if size >= FRESH_MAP_BYTES:
            if event.name in MATMULS:
                matmul += size
            else:
                rest += size
    return matmul, rest


def _faulted(step, steps: int) -> tuple[float, float]:
    """(bytes faulted in, kernel seconds) per step over ``steps`` steps."""
    page = resource.getpagesize()
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_minflt - before.ru_minflt) * page / steps, (after.ru_stime - before.ru_stime) / steps


def run_layout(layout: str, config: dict, cluster, batch: int, steps: int) -> dict:
    import transformers

    import autopar
    from autopar.bench.layouts import parse_layout
    from autopar.cost.model import estimate
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict

    autopar.enable_advanced_parallelization(global_batch_size=batch, seq_len=128, precision="fp32", log_every=0,
                                            **parse_layout(layout))
    try:
        torch.manual_seed(0)
        hf = transformers.AutoConfig.for_model(config["model_type"],
                                               **{k: v for k, v in config.items() if k != "model_type"})
        model = transformers.AutoModelForCausalLM.from_config(hf)
    finally:
        autopar.disable_advanced_parallelization()
    optim = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, hf.vocab_size, (batch, 128), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids, use_cache=False)[0].backward()
        optim.step()
        model.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    matmul, rest = _counted(step)
    faulted, sys_s = _faulted(step, steps)
    plan = model._autopar.plan
    profile = profile_analytic(arch_from_dict("bench", config), seq_len=128, dtype_bytes=4, device_type="cpu")
    stage = (dist.get_rank() // plan.tp) % plan.pp
    priced = estimate(profile, cluster, plan).stages[stage].fresh_page_bytes
    return {"layout": layout, "plan": plan.describe(),
            "rank": dist.get_rank(), "stage": stage, "counted_matmul_mib": matmul / MIB,
            "counted_rest_mib": rest / MIB, "faulted_mib": faulted / MIB, "sys_s": sys_s,
            "priced_mib": priced / MIB}


def main() -> None:
    from autopar.cluster import load_cluster
    from autopar.schema import load_json_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "benchmarks" / "data" / "gpt2-8x256.json"))
    p.add_argument("--cluster", default="cpu", help="a cluster JSON or preset (the count does not depend on it)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--layout", action="append", help="pinned layout (repeatable); default: the bench's table")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from autopar.bench.layouts import parse_layout
    from autopar.errors import AutoparError

    try:  # every layout checked before any rank starts
        for layout in args.layout or LAYOUTS:
            parse_layout(layout)
    except AutoparError as err:
        sys.exit(f"bench_fresh_pages: {err}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    config = {k: v for k, v in load_json_file(Path(args.model), "model config").items() if not k.startswith("_")}
    cluster = load_cluster(args.cluster)
    if not cluster.device.fresh_page_bytes_per_s:  # any rate: the bytes are counted where one is priced
        cluster = dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, fresh_page_bytes_per_s=1e9))
    rows = []
    for layout in args.layout or LAYOUTS:
        row = run_layout(layout, config, cluster, args.global_batch, args.steps)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, row)
        rows += gathered
        if dist.get_rank() == 0:
            print(f"{layout}:", flush=True)
            for r in gathered:
                print(f"  rank {r['rank']} (stage {r['stage']}): counted {r['counted_rest_mib']:7.0f} MiB "
                      f"(+ {r['counted_matmul_mib']:5.0f} in matmuls)  priced {r['priced_mib']:7.0f} MiB  "
                      f"faulted {r['faulted_mib']:7.0f} MiB in {r['sys_s']:.2f} s of kernel time", flush=True)
    if dist.get_rank() == 0 and args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "fresh_pages", "model": args.model,
                                               "global_batch": args.global_batch, "rows": rows}, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
