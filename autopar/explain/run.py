"""`autopar explain`: profile -> search -> report (and plot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from autopar.cluster import ClusterSpec, load_cluster
from autopar.errors import AutoparError
from autopar.plan.types import Pins, Schedule
from autopar.profile.config import ArchConfig, load_arch
from autopar.profile.types import ModelProfile, Recompute
from autopar.schema import escape_text

DEFAULT_SEQ_LEN = 2048
DEFAULT_SEQUENCES_PER_GPU = 8
MIN_REPORT_WIDTH = 150
"""Columns of the report when stdout is not a terminal (rich would use 80)."""
MAX_PLOT_TASKS = 20_000
"""Bars the --plot timeline draws (2 x pp x virtual stages x micro-batches):
matplotlib takes about a second per few thousand, and past this many they are
thinner than a pixel."""


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise AutoparError(f"{flag} {value}: must be a positive integer")


def resolve_seq_len(arch: ArchConfig, seq_len: int | None) -> int:
    """--seq-len, or 2048 capped by the model's context; refused past a learned position table."""
    _positive("--seq-len", seq_len)
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, arch.max_position_embeddings)
    if arch.learned_positions and seq_len > arch.max_position_embeddings:
        raise AutoparError(f"--seq-len {seq_len} exceeds {arch.name}'s {arch.max_position_embeddings} learned "
                           f"positions; use at most {arch.max_position_embeddings}")
    return seq_len


def profile_model(arch: ArchConfig, seq_len: int, profiler: str, attention: str) -> ModelProfile:
    """The analytic profile (no torch), or the meta-device one (builds the HF model)."""
    if profiler == "meta":
        print(f"profiling {escape_text(arch.name)} on the meta device (imports torch and transformers)...",
              file=sys.stderr)
        from autopar.profile.meta import profile_meta

        return profile_meta(arch, seq_len=seq_len, attention=attention)
    from autopar.profile.analytic import profile_analytic

    return profile_analytic(arch, seq_len=seq_len, attention=attention)


def make_pins(tp=None, pp=None, dp=None, micro_batch=None, virtual_stages=None, schedule=None,
              recompute=None, zero=None, sequence_parallel=None, tp_across_nodes=False) -> Pins:
    return Pins(tp=tp, pp=pp, dp=dp, micro_batch_size=micro_batch, virtual_stages=virtual_stages,
                schedule=Schedule(getattr(schedule, "value", schedule)) if schedule is not None else None,
                recompute=Recompute(getattr(recompute, "value", recompute)) if recompute is not None else None,
                zero_stage=zero, sequence_parallel=sequence_parallel, tp_inter_node=tp_across_nodes)


def resolve_cluster(cluster: str | None, gpus: int | None, nodes: int | None,
                    gpus_per_node: int | None) -> ClusterSpec:
    for flag, value in (("--gpus", gpus), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        _positive(flag, value)
    return load_cluster(cluster).with_gpus(gpus, nodes, gpus_per_node)


def run_explain(*, model: str, cluster: str | None, gpus: int | None, nodes: int | None,
                gpus_per_node: int | None, global_batch: int | None, seq_len: int | None, profiler,
                attention, json_out: bool, plot: Path | None, alternatives: bool, split_solver: str = "auto",
                measure: bool = False, **pin_args) -> None:
    from autopar.plan.search import search

    arch = load_arch(model)
    spec = resolve_cluster(cluster, gpus, nodes, gpus_per_node)
    seq = resolve_seq_len(arch, seq_len)
    _positive("--global-batch", global_batch)
    batch = global_batch or DEFAULT_SEQUENCES_PER_GPU * spec.world_size
    profile = profile_model(arch, seq, getattr(profiler, "value", profiler), getattr(attention, "value", attention))
    pins = make_pins(**pin_args)
    opts = measured_options(arch, profile, spec, pins) if measure else None
    result = search(profile, spec, global_batch_size=batch, pins=pins, alternatives=alternatives,
                    split_solver=split_solver, opts=opts)
    if plot is not None:
        check_plot_size(result.best.plan)
    if json_out:
        from autopar.explain.report import result_dict

        print(json.dumps(result_dict(result, profile, spec), allow_nan=False))
    else:
        from rich.console import Console

        from autopar.explain.report import render

        console = Console()
        if not console.is_terminal:  # piped or captured: wide enough for the tables
            console = Console(width=MIN_REPORT_WIDTH)
        render(result, profile, spec, console)
    if plot is not None:
        path = write_plot(plot, result.best, profile, spec, opts)
        print(f"wrote {path}", file=sys.stderr)


def measured_options(arch: ArchConfig, profile: ModelProfile, spec: ClusterSpec, pins: Pins):
    """Time one block on this machine's device for every TP degree the search may use."""
    import torch

    from autopar.cost.layers import CostOptions
    from autopar.plan.space import tp_options
    from autopar.profile.measured import measure_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("--measure: no CUDA device here; timing blocks on the CPU, which prices the cluster's GPUs "
              "as this CPU", file=sys.stderr)
    tps = tp_options(profile, spec, spec.world_size, pins)
    print(f"--measure: timing one {escape_text(arch.name)} block on {device} at tp {tps}...", file=sys.stderr)
    return CostOptions(measured_block_s=measure_blocks(arch, seq_len=profile.seq_len, tps=tps, device=device))


def check_plot_size(plan) -> None:
    """Refuse a --plot whose timeline has more bars than can be drawn (before anything is printed)."""
    tasks = 2 * plan.pp * plan.virtual_stages * plan.num_microbatches
    if tasks > MAX_PLOT_TASKS:
        raise AutoparError(
            f"--plot: the plan's timeline has {tasks:,} forward/backward bars ({plan.num_microbatches:,} "
            f"micro-batches), more than {MAX_PLOT_TASKS:,} can be drawn; drop --plot or use a smaller "
            "--global-batch or a larger --micro-batch")


def write_plot(path: Path, best, profile: ModelProfile, spec: ClusterSpec, opts=None) -> Path:
    """Timeline of the best plan's step (the task DAG, with the estimate's cost options) and its memory per rank."""
    from autopar.cost.model import chunk_times
    from autopar.cost.pipeline import action_orders, simulate
    from autopar.explain.plot import plot_plan

    plan = best.plan
    fwd, bwd, p2p = chunk_times(profile, spec, plan, opts)
    orders = action_orders(plan.schedule.value, plan.pp, plan.virtual_stages, plan.num_microbatches)
    timeline = simulate(orders, fwd, bwd, p2p)
    parts = {name: [s.memory_bytes[name] for s in best.cost.stages]
             for name in ("weights", "grads", "optimizer", "activations", "transient", "reserve")}
    return plot_plan(path, timeline, parts, spec.device.memory_bytes, f"{profile.name}: {plan.describe()}")
