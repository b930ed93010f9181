"""``autopar bench``: run layouts, set their measurements beside the cost model's predictions.

Two ways to run (docs/bench.md):

- synthetic (``--model PRESET|config.json``): every layout in one torchrun job on generated batches
  (autopar.bench.bench_worker), interleaved over rounds, with a plain-DDP baseline;
- a training script (``autopar bench train.py``): each layout is one torchrun launch of the unchanged
  script with its pins in ``$AUTOPAR_OPTIONS`` (autopar.bench.script_worker times the steps between
  ``optimizer.step()`` calls), the launches interleaved round by round; the baseline is plain DDP on
  the script's model, batch and sequence length, on generated batches.

Then the record (autopar.bench.results), the table, ``--json``, ``--plot``, ``--compare``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from autopar.bench import results as R
from autopar.bench.layouts import Job, Layout, choose_layouts, parse_layout
from autopar.errors import AutoparError
from autopar.plan.types import Precision


@dataclass(kw_only=True)
class BenchRequest:
    """What ``autopar bench`` was asked (the CLI's options, checked)."""

    nproc: int
    model: str | None = None
    script: Path | None = None
    script_args: list[str] = field(default_factory=list)
    global_batch: int | None = None
    seq_len: int | None = None
    precision: str | None = None
    cluster: str | None = None
    memory_headroom: float = 0.1
    top: int = 1
    layouts: list[str] = field(default_factory=list)
    chosen: bool = True
    baseline: bool = True
    warmup: int = 2
    steps: int = 10
    rounds: int = 3
    trace: Path | None = None
    command: str = ""


def detect_device() -> tuple[str, object, str]:
    """(``cuda`` or ``cpu``, the GPU's DeviceSpec or None, a name for the record), as the executor sees it."""
    import torch

    if torch.cuda.is_available():
        from autopar.execute.runtime import cuda_device_spec

        spec = cuda_device_spec(torch.device("cuda", 0))
        return "cuda", spec, f"{spec.name} (nccl)"
    return "cpu", None, f"cpu, {os.cpu_count()} cores (gloo)"


def synthetic_job(req: BenchRequest, device_type: str, device) -> Job:
    from autopar.explain.run import DEFAULT_SEQUENCES_PER_GPU, resolve_seq_len
    from autopar.profile.config import load_arch

    arch = load_arch(req.model)
    precision = Precision(req.precision or ("bf16" if device_type == "cuda" else "fp32"))
    return Job(arch=arch, world_size=req.nproc, ranks_per_node=req.nproc,
               global_batch=req.global_batch or DEFAULT_SEQUENCES_PER_GPU * req.nproc,
               seq_len=resolve_seq_len(arch, req.seq_len), precision=precision, cluster=req.cluster,
               device_type=device_type, device=device if req.cluster is None else None,
               memory_headroom=req.memory_headroom)


def run_synthetic(req: BenchRequest, job: Job, layouts: list[Layout]) -> list[dict]:
    """Every layout in one torchrun job (autopar.bench.bench_worker); the worker's layout entries."""
    from autopar.bench.launcher import job_env, run_job, torchrun_command

    with tempfile.TemporaryDirectory(prefix="autopar_bench_") as tmp:
        spec = {"config": {**(job.arch.raw or {}), "model_type": job.arch.model_type},
                "global_batch": job.global_batch, "seq_len": job.seq_len, "precision": job.precision.value,
                "cluster": job.cluster, "memory_headroom": job.memory_headroom,
                "layouts": [x.to_spec() for x in layouts], "warmup": req.warmup, "steps": req.steps,
                "rounds": req.rounds, "trace_dir": str(req.trace) if req.trace else None,
                "out": str(Path(tmp) / "out.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        cmd = torchrun_command(req.nproc, ["-m", "autopar.bench.bench_worker", str(Path(tmp) / "spec.json")])
        run_job(cmd, "bench", env=job_env(req.nproc))
        raw = json.loads(Path(spec["out"]).read_text())
    for entry, layout in zip(raw["layouts"], layouts):
        entry["planned"] = layout.planned
    return raw["layouts"]


def build_record(req: BenchRequest, job: Job, entries: list[dict], device_name: str, load_before: float,
                 ticks_before: tuple[int, int] | None = None, cpu_heap: str | None = None) -> dict:
    """The bench record (docs/bench.md) from the workers' entries; ``cpu_heap``: what the CPU ranks' heap
    did (autopar.execute.heap [Note: the CPU heap]), None on GPUs."""
    tokens = job.global_batch * job.seq_len
    flops = R.mfu_flops(entries)
    layouts = [R.layout_record(e, tokens, flops) for e in entries]
    calibration = next((e["predicted"].get("calibration") for e in entries if e.get("predicted")), None)
    import torch

    return {
        "format": R.BENCH_FORMAT, "format_version": R.BENCH_FORMAT_VERSION, "command": req.command,
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "where": {"host": socket.gethostname(), "device": device_name, "cpus": os.cpu_count(),
                  "platform": platform.platform(), "torch": torch.__version__,
                  "autopar": __import__("autopar").__version__,
                  "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
                  "cpu_steal_share": R.steal_share(ticks_before, R.host_cpu_ticks()),
                  "cpu_heap": cpu_heap},
        "job": {"model": job.arch.name, "config": job.arch.raw,
                "script": str(req.script) if req.script else None, "world_size": job.world_size,
                "ranks_per_node": job.ranks_per_node, "global_batch": job.global_batch, "seq_len": job.seq_len,
                "precision": job.precision.value, "cluster": job.cluster, "calibration": calibration,
                "calibration_cpu_heap": calibration_cpu_heap(job.cluster) if cpu_heap else None},
        "settings": {"warmup": req.warmup, "steps": req.steps, "rounds": req.rounds, "interleaved": True},
        "layouts": layouts,
        "summary": R.summary(layouts),
    }


def calibration_cpu_heap(cluster: str | None) -> str | None:
    """What the CPU heap did while ``autopar calibrate`` measured ``cluster`` (a cluster JSON's
    ``measured.where.cpu_heap``): ``released`` for calibrations before autopar kept the heap (2026-12-01),
    None for a preset or a cluster nobody calibrated."""
    if not cluster or not cluster.endswith(".json") or not Path(cluster).is_file():
        return None
    measured = json.loads(Path(cluster).read_text()).get("measured") or {}
    where = measured.get("where") or {}
    return where.get("cpu_heap") or ("released" if where.get("device_type") == "cpu" else None)


def run_bench(req: BenchRequest) -> dict:
    """Plan the layouts, run them, return the record (see the module docstring)."""
    load_before, ticks_before = os.getloadavg()[0], R.host_cpu_ticks()
    pinned = [parse_layout(text) for text in req.layouts]
    device_type, device, device_name = detect_device()
    if req.script is not None:
        from autopar.bench.script_bench import run_script

        if req.trace is not None:
            raise AutoparError("--trace profiles layouts on synthetic batches; use it with --model (the script's "
                               "model and batch), not with a script")

        job, entries = run_script(req, device_type, device, pinned)
    else:
        if req.model is None:
            raise AutoparError("autopar bench needs a training script or --model PRESET|config.json "
                               "(synthetic batches); pass one")
        job = synthetic_job(req, device_type, device)
        layouts = choose_layouts(job, top=req.top, pinned=pinned, chosen=req.chosen, baseline=req.baseline)
        entries = run_synthetic(req, job, layouts)
    _warn_replanned(entries)
    from autopar.execute.heap import policy

    return build_record(req, job, entries, device_name, load_before, ticks_before,
                        cpu_heap=policy() if device_type == "cpu" else None)


def _warn_replanned(entries: list[dict]) -> None:
    for e in entries:
        if e["kind"] in ("top", "pinned") and e.get("planned") and e.get("layout") != e["planned"]:
            print(f"autopar bench: {e['name']}: planned {e['planned']} but the executor ran {e['layout']}",
                  file=sys.stderr)


def default_command() -> str:
    return "autopar " + shlex.join(sys.argv[1:])
