"""``autopar bench SCRIPT``: the user's unchanged training script under each layout.

Each layout is one torchrun launch of the script through autopar.bench.script_worker, its pins in
``$AUTOPAR_OPTIONS``. The first launch runs autopar's own choice and tells the driver the model, batch
and sequence length the script planned for; the search's top k and the pinned layouts are planned from
those (autopar.bench.layouts) and launched next. Rounds repeat every launch, the order rotated, so a slow
spell of the machine hits every layout alike. The baseline is plain DDP of the same model, batch and
sequence length on generated batches (autopar.bench.bench_worker), one launch per round like the others.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from autopar.bench.layouts import Job, Layout, choose_layouts
from autopar.errors import AutoparError
from autopar.plan.types import Precision


def launch_script(req, layout: Layout, folder: Path, tag: str) -> list[dict]:
    """One launch of the script under ``layout``; every rank's record."""
    from autopar.bench.launcher import job_env, run_job, torchrun_command
    from autopar.execute.options import OPTIONS_ENV

    out = folder / tag
    target = ["-m", "autopar.bench.script_worker", str(out), str(req.warmup), str(req.steps), str(req.script),
              *req.script_args]
    env = job_env(req.nproc, {OPTIONS_ENV: json.dumps({"log_every": 0, **layout.options})})
    run_job(torchrun_command(req.nproc, target), f"bench {layout.name}", env=env)
    files = sorted(folder.glob(f"{tag}.rank*.json"), key=lambda p: int(p.suffixes[-2][5:]))
    if len(files) != req.nproc:
        raise AutoparError(f"bench {layout.name}: {len(files)} of {req.nproc} ranks reported; did the script "
                           "train (call optimizer.step()) on every rank?")
    return [json.loads(p.read_text()) for p in files]


def step_times(ranks: list[dict], warmup: int) -> list[float]:
    """Seconds of each timed step: the time between step ends, the slowest rank's."""
    per_rank = [[b - a for a, b in zip(r["step_ends"], r["step_ends"][1:])][warmup:] for r in ranks]
    return [max(ts) for ts in zip(*per_rank)]


def job_of(first: dict, req, device_type: str, device) -> Job:
    """The job the script planned for (its model, batch, sequence length, precision)."""
    from autopar.profile.config import arch_from_dict

    if first.get("plan") is None:
        raise AutoparError(f"{req.script}: no model built under autopar was seen; does the script call "
                           "autopar.enable_advanced_parallelization() before building its model?")
    plan, config = first["plan"], first["config"]
    arch = arch_from_dict(config.get("_name_or_path") or config["model_type"], config)
    return Job(arch=arch, world_size=req.nproc, ranks_per_node=req.nproc, global_batch=plan["global_batch_size"],
               seq_len=plan["seq_len"], precision=Precision(plan["precision"]), cluster=req.cluster,
               device_type=device_type, device=device if req.cluster is None else None,
               memory_headroom=req.memory_headroom)


def entry(layout: Layout, launches: list[list[dict]], warmup: int) -> dict:
    """The layout's entry in the worker format autopar.bench.results reads."""
    first = launches[0][0]
    memory = [r["memory"] | {"pp_rank": r.get("pp_rank", 0)} if r["memory"] else None for r in launches[0]]
    if any(m is None for m in memory):
        raise AutoparError(f"bench {layout.name}: the script ran fewer than --warmup + 1 steps (the last counts "
                           "memory); lower --warmup")
    return {"name": layout.name, "kind": layout.kind, "options": layout.options, "planned": layout.planned,
            "layout": first.get("layout"), "plan": first.get("plan"), "plan_digest": first.get("plan_digest"),
            "predicted": first.get("predicted"), "times_s": [step_times(ranks, warmup + 1) for ranks in launches],
            "losses": first["losses"], "memory": memory}


def run_script(req, device_type: str, device, pinned: list[dict]) -> tuple[Job, list[dict]]:
    """Run every layout's launches, interleaved over rounds; (the job, the layouts' entries)."""
    from autopar.bench.run import run_synthetic

    chosen = Layout(name="autopar", kind="chosen")
    with tempfile.TemporaryDirectory(prefix="autopar_bench_script_") as tmp:
        folder = Path(tmp)
        launches: dict[str, list] = {chosen.name: [launch_script(req, chosen, folder, "autopar.0")]}
        job = job_of(launches[chosen.name][0][0], req, device_type, device)
        others = choose_layouts(job, top=req.top, pinned=pinned, chosen=False, baseline=False)
        layouts = [chosen, *others] + ([Layout(name="ddp", kind="ddp")] if req.baseline else [])
        ddp_runs: list[dict] = []
        for r in range(req.rounds):
            order = [layouts[(r + j) % len(layouts)] for j in range(len(layouts))]
            for layout in order:
                if r == 0 and layout is chosen:
                    continue
                if layout.kind == "ddp":
                    ddp_runs.append(run_synthetic(_one_round(req), job, [layout])[0])
                else:
                    launches.setdefault(layout.name, []).append(
                        launch_script(req, layout, folder, f"{_slug(layout.name)}.{r}"))
    entries = [entry(x, launches[x.name], req.warmup) for x in layouts if x.kind != "ddp"]
    if ddp_runs:
        base = ddp_runs[0] | {"times_s": [t for run in ddp_runs for t in run["times_s"]]}
        entries.append(base)
    return job, entries


def _one_round(req):
    from dataclasses import replace

    return replace(req, rounds=1, trace=None)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
