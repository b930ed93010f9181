"""Host memory of loading a checkpoint: plain transformers against from_pretrained under autopar, per rank.

    python benchmarks/bench_load_memory.py                  # GPT-2 124M: plain, pp4, tp2pp2, dp4; table
    python benchmarks/bench_load_memory.py --json
    python benchmarks/bench_load_memory.py --save           # benchmarks/results/load_memory_<date>.json
    python benchmarks/bench_load_memory.py --layouts tp2pp2 --before tp2pp2

What (issue acceptance 3, second half): a saved checkpoint loaded with
``AutoModelForCausalLM.from_pretrained`` under
``autopar.enable_advanced_parallelization`` reads only the tensors (and parts
of tensors) this rank holds, so a rank's peak host memory is about its shard,
not the model. The model is GPT-2 124M in its default shape (12 layers,
hidden 768, vocab 50257, 1024 positions, tied head; fp32, about 500 MB),
random weights, saved once with ``save_pretrained`` (one ``model.safetensors``)
to a temporary folder (``--dir`` keeps and reuses one).

How: each case runs in fresh processes. The plain case is one ``python``
process calling transformers' own ``from_pretrained``. Each autopar layout
(``pp4``, ``tp2pp2``, ``dp4`` (FSDP2), or any ``dpXtpYppZ``) is
``python -m torch.distributed.run --nproc-per-node 4`` (gloo, CPU,
OMP_NUM_THREADS=1) with the layout pinned; every rank loads and exits. Per
process: the baseline is the resident set (``/proc/self/statm``) after the
imports (torch, transformers, autopar, the model's module) and the process
group; the peak is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after
loading (the high-water mark of the whole process, imports included); the
shard is the bytes of the parameters the rank holds (each once). Every
parameter is read once (summed) before the peak is taken: transformers' own
loader leaves parameters as views of the file's memory map, resident only
once used (``peak_rss_untouched`` in the JSON is the peak before). The reader's
own counters give the file bytes it read and whether any tensor was read
whole. ``--before LAYOUT`` runs a layout also through the loader as it was
before this benchmark's change: each tensor read whole through safetensors'
memory map (``safe_open(...).get_tensor``), transformed, then cut by
``distribute_tensor``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 4
DEFAULT_LAYOUTS = "pp4,tp2pp2,dp4"
MiB = 2**20


def parse_args():
    parser = argparse.ArgumentParser(description="host memory of from_pretrained, plain vs autopar per rank")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"comma list of dpXtpYppZ layouts over "
                        f"{WORLD} ranks (default {DEFAULT_LAYOUTS}; a missing factor is 1)")
    parser.add_argument("--before", default="tp2pp2", help="comma list of layouts also run through the "
                        "previous whole-tensor loader ('' for none)")
    parser.add_argument("--dir", default=None, help="folder for the saved checkpoint (kept and reused); "
                        "default a temporary folder, removed at the end")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/load_memory_<date>.json")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launched case")
    parser.add_argument("--worker", choices=["plain", "autopar"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--layout", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--old-loader", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def dims(layout: str) -> dict:
    found = dict(re.findall(r"(dp|tp|pp)(\d+)", layout))
    if not found or "".join(f"{k}{v}" for k, v in found.items()) != layout:
        raise SystemExit(f"bad layout {layout!r}: use e.g. pp4, tp2pp2, dp4, dp2tp2")
    out = {k: int(found.get(k, 1)) for k in ("dp", "tp", "pp")}
    if out["dp"] * out["tp"] * out["pp"] != WORLD:
        raise SystemExit(f"layout {layout!r} is not {WORLD} ranks")
    return out


# ------------------------------------------------------------------------------------------------------------
# the measured processes

def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def touch(tensors) -> None:
    """Read every element: transformers may leave parameters as untouched views of the file's memory map,
    resident only once used (the peak counts them as a model in use holds them)."""
    import torch

    with torch.no_grad():
        for t in tensors:
            float(t.detach().sum())


class OldMmapSource:
    """The loader before acceptance 3: every tensor read whole through safetensors' memory map."""

    def __init__(self, folder, aliases):
        from safetensors import safe_open

        self.aliases = aliases
        self.handle = safe_open(str(Path(folder) / "model.safetensors"), framework="pt", device="cpu")
        self.names = set(self.handle.keys())

    def keys(self):
        return self.names

    def get(self, name):
        from autopar.execute.weights import _resolve

        return self.handle.get_tensor(_resolve(name, self.names, self.aliases))


def worker(args) -> None:
    import torch
    import transformers
    import transformers.models.gpt2.modeling_gpt2

    record: dict = {}
    if args.worker == "plain":
        record.update(rank=0, baseline_rss=rss_now(), baseline_peak=peak_rss())
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(args.dir)
        record["load_s"] = time.perf_counter() - start
        record["peak_rss_untouched"] = peak_rss()
        touch(model.parameters())
        record["peak_rss"] = peak_rss()
        record["shard_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        Path(args.out).write_text(json.dumps(record))
        return
    import torch.distributed as dist

    import autopar
    from autopar.execute import weights

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    record.update(rank=rank, baseline_rss=rss_now(), baseline_peak=peak_rss())
    sources = []
    if args.old_loader:
        class Source(OldMmapSource):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                sources.append(self)
    else:
        class Source(weights.SafetensorsSource):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                sources.append(self)
    weights.SafetensorsSource = Source
    autopar.enable_advanced_parallelization(global_batch_size=8, seq_len=128, log_every=0, recompute="none",
                                            **dims(args.layout))
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.dir)
    record["load_s"] = time.perf_counter() - start
    local = [p.to_local() if isinstance(p, torch.distributed.tensor.DTensor) else p for p in model.parameters()]
    touch(local)
    record["peak_rss"] = peak_rss()
    record["shard_bytes"] = sum(t.numel() * t.element_size() for t in local)
    record["plan"] = model._autopar.plan.describe()
    if len(sources) != 1:
        raise SystemExit(f"from_pretrained made {len(sources)} safetensors sources, expected 1")
    source = sources[0]
    if not args.old_loader:
        record.update(bytes_read=source.bytes_read, bytes_used=source.bytes_used, whole_reads=source.whole_reads)
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------
# the driver

def save_checkpoint(folder: Path) -> None:
    import torch
    import transformers

    if (folder / "model.safetensors").is_file():
        return
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder, safe_serialization=True)


def checkpoint_bytes(folder: Path) -> int:
    import struct

    with open(folder / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(args, folder: Path, tmp: Path, layout: str | None, old: bool) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = tmp / f"{layout or 'plain'}{'_old' if old else ''}.json"
    me = str(Path(__file__).resolve())
    if layout is None:
        cmd = [sys.executable, me, "--worker", "plain", "--dir", str(folder), "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), me, "--worker", "autopar", "--layout", layout,
               "--dir", str(folder), "--out", str(out), *(["--old-loader"] if old else [])]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise SystemExit(f"case {layout or 'plain'} failed ({proc.returncode}):\n{tail}")
    files = [out] if layout is None else [Path(f"{out}.rank{r}") for r in range(WORLD)]
    rows = [json.loads(f.read_text()) for f in files]
    for row in rows:
        row.update(case="plain transformers" if layout is None else layout + (" (before)" if old else ""),
                   loader="transformers" if layout is None else ("whole tensors, mmap" if old else "local boxes"),
                   launch_wall_s=wall, load_above_baseline=row["peak_rss"] - row["baseline_rss"])
    return rows


def print_table(record: dict) -> None:
    whole = record["model_bytes"]
    print(f"{record['model']}: checkpoint {whole / MiB:.0f} MiB ({record['checkpoint']}); {record['command']}")
    print(f"{'case':22s} {'rank':>4s} {'baseline':>9s} {'peak':>8s} {'peak-base':>9s} {'shard':>8s} "
          f"{'read':>8s} {'whole':>5s} {'load s':>7s}  plan")
    for r in record["rows"]:
        read = f"{r['bytes_read'] / MiB:7.0f}M" if "bytes_read" in r else f"{'-':>8s}"
        print(f"{r['case']:22s} {r['rank']:4d} {r['baseline_rss'] / MiB:8.0f}M {r['peak_rss'] / MiB:7.0f}M "
              f"{r['load_above_baseline'] / MiB:8.0f}M {r['shard_bytes'] / MiB:7.0f}M {read} "
              f"{r.get('whole_reads', '-')!s:>5s} {r['load_s']:7.2f}  {r.get('plan', '')}")
    print("MiB; baseline: RSS after imports; peak: ru_maxrss; shard: this rank's parameters; read: file bytes "
          "this rank read; whole: tensors read whole")


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker(args)
        return
    layouts = [x for x in args.layouts.split(",") if x]
    before = [x for x in args.before.split(",") if x]
    for layout in layouts + before:
        dims(layout)
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_memory_"))
    folder = Path(args.dir) if args.dir else tmp / "gpt2-124m"
    try:
        start = time.perf_counter()
        save_checkpoint(folder)
        save_s = time.perf_counter() - start
        rows = run_case(args, folder, tmp, None, False)
        for layout in layouts:
            rows += run_case(args, folder, tmp, layout, False)
        for layout in before:
            rows += run_case(args, folder, tmp, layout, True)
        record = {"model": "gpt2-124m (GPT2Config defaults, fp32, random)", "world": WORLD,
                  "model_bytes": checkpoint_bytes(folder), "checkpoint": "one model.safetensors",
                  "save_s": save_s, "date": datetime.date.today().isoformat(),
                  "command": "python benchmarks/bench_load_memory.py " + " ".join(sys.argv[1:]),
                  "host": {"cpus": os.cpu_count(), "torch_threads_per_rank": 1}, "rows": rows}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        print_table(record)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"load_memory_{record['date']}.json"
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"saved {out.relative_to(RESULTS.parent.parent)}", file=sys.stderr)


if __name__ == "__main__":
    main()
