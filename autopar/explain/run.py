"""`autopar explain`: profile -> search -> report (and plot)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from autopar.cluster import DEFAULT_CLUSTER, ClusterSpec
from autopar.errors import AutoparError
from autopar.launch import DEFAULT_MEMORY_HEADROOM, Launch, Planning, launch_cluster
from autopar.plan.types import Pins, Precision, Schedule
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


def profile_model(arch: ArchConfig, seq_len: int, profiler: str, attention: str,
                  planning: Planning | None = None) -> ModelProfile:
    """The analytic profile (no torch), or the meta-device one (builds the HF model), at the launch's
    precision and for its kernels (``planning``; default bf16 on CUDA)."""
    dtype_bytes = planning.dtype_bytes if planning else 2
    if profiler == "meta":
        print(f"profiling {escape_text(arch.name)} on the meta device (imports torch and transformers)...",
              file=sys.stderr)
        from autopar.profile.meta import profile_meta

        return profile_meta(arch, seq_len=seq_len, dtype_bytes=dtype_bytes, attention=attention)
    from autopar.profile.analytic import profile_analytic

    return profile_analytic(arch, seq_len=seq_len, dtype_bytes=dtype_bytes, attention=attention,
                            device_type=planning.device_type if planning else "cuda")


def make_pins(tp=None, pp=None, dp=None, micro_batch=None, virtual_stages=None, schedule=None,
              recompute=None, zero=None, sequence_parallel=None, tp_across_nodes=False) -> Pins:
    return Pins(tp=tp, pp=pp, dp=dp, micro_batch_size=micro_batch, virtual_stages=virtual_stages,
                schedule=Schedule(getattr(schedule, "value", schedule)) if schedule is not None else None,
                recompute=Recompute(getattr(recompute, "value", recompute)) if recompute is not None else None,
                zero_stage=zero, sequence_parallel=sequence_parallel, tp_inter_node=tp_across_nodes)


def explain_launch(*, model_type: str | None, cluster: str | None = None, gpus: int | None = None,
                   nodes: int | None = None, gpus_per_node: int | None = None, memory_headroom: float | None = None,
                   precision: Precision | None = None, from_env: bool = False) -> Launch:
    """The launch explain plans for ([Note: explain = run] in autopar/launch.py): the flags, or with
    ``from_env`` torchrun's environment read by the executor's own functions (imports torch to detect
    the device, as the executor does)."""
    for flag, value in (("--gpus", gpus), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        _positive(flag, value)
    headroom = DEFAULT_MEMORY_HEADROOM if memory_headroom is None else memory_headroom
    precision = None if precision is None else Precision(precision)
    if not from_env:
        return Launch(world_size=gpus, nodes=nodes, ranks_per_node=gpus_per_node, cluster=cluster or DEFAULT_CLUSTER,
                      memory_headroom=headroom, precision=precision, model_type=model_type)
    if (gpus, nodes, gpus_per_node) != (None, None, None):
        raise AutoparError("--from-env takes the world from torchrun's WORLD_SIZE and LOCAL_WORLD_SIZE; "
                           "drop --gpus, --nodes and --gpus-per-node (or drop --from-env)")
    if "WORLD_SIZE" not in os.environ:
        print("--from-env: WORLD_SIZE is not set; planning a world of one process, as the executor does under "
              "plain python", file=sys.stderr)
    from autopar.execute.runtime import executor_launch, runtime_from_env

    return executor_launch(runtime_from_env(os.environ), cluster=cluster, memory_headroom=headroom,
                           precision=precision, model_type=model_type)


def run_explain(*, model: str, cluster: str | None, gpus: int | None, nodes: int | None,
                gpus_per_node: int | None, global_batch: int | None, seq_len: int | None, profiler,
                attention, json_out: bool, plot: Path | None, alternatives: bool, split_solver: str = "auto",
                measure: bool = False, memory_headroom: float | None = None, precision: str | None = None,
                from_env: bool = False, **pin_args) -> None:
    from autopar.plan.search import search

    arch = load_arch(model)
    launch = explain_launch(model_type=arch.model_type, cluster=cluster, gpus=gpus, nodes=nodes,
                            gpus_per_node=gpus_per_node, memory_headroom=memory_headroom, precision=precision,
                            from_env=from_env)
    spec, planning = launch_cluster(launch, make_pins(**pin_args))
    seq = resolve_seq_len(arch, seq_len)
    _positive("--global-batch", global_batch)
    batch = global_batch or DEFAULT_SEQUENCES_PER_GPU * spec.world_size
    profile = profile_model(arch, seq, getattr(profiler, "value", profiler), getattr(attention, "value", attention),
                            planning)
    pins = planning.pins
    opts = measured_options(arch, profile, spec, pins) if measure else None
    result = search(profile, spec, global_batch_size=batch, pins=pins, alternatives=alternatives,
                    split_solver=split_solver, opts=opts, progress=sys.stderr.isatty())
    if plot is not None:
        check_plot_size(result.best.plan)
    from autopar.plan.unpriced import unpriced_features

    not_priced = unpriced_features(arch.raw)
    if json_out:
        from autopar.explain.report import result_dict

        print(json.dumps(result_dict(result, profile, spec, planning, not_priced), allow_nan=False))
    else:
        from rich.console import Console

        from autopar.explain.report import render

        console = Console()
        if not console.is_terminal:  # piped or captured: wide enough for the tables
            console = Console(width=MIN_REPORT_WIDTH)
        render(result, profile, spec, console, planning, not_priced)
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
    from autopar.cost.model import chunk_times, shared_speeds
    from autopar.cost.pipeline import action_orders, simulate, simulate_shared
    from autopar.explain.plot import plot_plan

    plan = best.plan
    fwd, bwd, p2p = chunk_times(profile, spec, plan, opts)
    orders = action_orders(plan.schedule.value, plan.pp, plan.virtual_stages, plan.num_microbatches)
    speeds = shared_speeds(plan, spec)  # ranks sharing their cores: the DAG the estimate runs
    timeline = simulate_shared(orders, fwd, bwd, speeds, p2p) if speeds else simulate(orders, fwd, bwd, p2p)
    parts = {name: [s.memory_bytes[name] for s in best.cost.stages]
             for name in ("weights", "grads", "optimizer", "activations", "transient", "reserve")}
    return plot_plan(path, timeline, parts, spec.device.memory_bytes, f"{profile.name}: {plan.describe()}")
