"""What `autopar explain` shows: one JSON object for machines, rich tables for people.

The JSON shape is documented in docs/plan-format.md.
"""

from __future__ import annotations

import math
import re

from autopar.cluster import ClusterSpec
from autopar.launch import Planning
from autopar.plan.search import SearchResult
from autopar.profile.types import ModelProfile
from autopar.schema import escape_text

GIB = 1024**3


def compact_layers(names: tuple[str, ...] | list[str]) -> str:
    """``transformer.h.0 .. transformer.h.9`` -> ``transformer.h.0-9``; others listed."""
    out: list[str] = []
    run_prefix, run_start, run_end = None, None, None

    def flush() -> None:
        if run_prefix is not None:
            out.append(f"{run_prefix}{run_start}" + (f"-{run_end}" if run_end != run_start else ""))

    for name in names:
        match = re.fullmatch(r"(.*\.)(\d+)", name)
        if match and match.group(1) == run_prefix and int(match.group(2)) == run_end + 1:
            run_end += 1
            continue
        flush()
        if match:
            run_prefix, run_start, run_end = match.group(1), int(match.group(2)), int(match.group(2))
        else:
            run_prefix = None
            out.append(name)
    flush()
    return ", ".join(out)


def strict_json(value):
    """``value`` with every NaN or infinity replaced by None (JSON ``null``), so it dumps as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def _text(value: str) -> str:
    """Text from a user's file for a rich table: control characters escaped, markup brackets inert."""
    from rich.markup import escape

    return escape(escape_text(value))


def _headroom_text(planning: Planning) -> str:
    """``80.0 GiB per device less 10% headroom = 72.0 GiB planned``."""
    usable = planning.device_memory_bytes * (1.0 - planning.memory_headroom)
    return (f"{planning.device_memory_bytes / GIB:.1f} GiB per device less {planning.memory_headroom:.0%} "
            f"headroom = {usable / GIB:.1f} GiB planned")


def _launch_dict(cluster: ClusterSpec, planning: Planning | None) -> dict:
    """The cluster as planned: device memory before and after the headroom ([Note: explain = run])."""
    memory = planning.device_memory_bytes if planning else cluster.device.memory_bytes
    out = {"name": cluster.name, "nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
           "device": cluster.device.name, "peak_flops_per_s": cluster.device.peak_flops_per_s,
           "memory_bytes": memory, "memory_headroom": planning.memory_headroom if planning else 0.0,
           "planned_memory_bytes": cluster.device.memory_bytes, "calibration": cluster.calibration or None}
    if planning:
        out.update(dtype_bytes=planning.dtype_bytes, kernels=planning.device_type,
                   data_parallel_only=planning.split_refusal)
    return out


def result_dict(result: SearchResult, profile: ModelProfile, cluster: ClusterSpec,
                planning: Planning | None = None, not_priced: list[str] | tuple[str, ...] = ()) -> dict:
    """The `explain --json` object; a non-finite number (none is expected) becomes null."""
    best = result.best
    plan = best.plan.to_dict()
    cost = best.cost
    for stage in plan["stages"]:
        stage["rank"] = best.plan.stage_rank(stage["index"])
    return strict_json({
        "model": {"name": profile.name, "architecture": profile.architecture, "params": profile.num_params,
                  "layers": profile.num_layers, "hidden_size": profile.hidden_size, "seq_len": profile.seq_len,
                  "profile_source": profile.source},
        "cluster": _launch_dict(cluster, planning),
        "plan": plan,
        "plan_digest": best.plan.digest(),
        "predicted": cost.to_dict(),
        "search": result.search_dict(),
        "choice": result.choice_dict(),
        "not_priced": list(not_priced),
        "alternatives": [
            {"dimension": a.dimension, "value": a.value, "layout": a.evaluated.plan.describe(),
             "plan": a.evaluated.plan.to_dict(), "step_time_s": a.evaluated.cost.step_time_s,
             "slowdown": a.evaluated.cost.step_time_s / cost.step_time_s, "fits": a.evaluated.cost.fits,
             "peak_memory_bytes": a.evaluated.cost.peak_memory_bytes, "reason": a.reason}
            for a in result.alternatives
        ],
    })


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def render(result: SearchResult, profile: ModelProfile, cluster: ClusterSpec, console,
           planning: Planning | None = None, not_priced: list[str] | tuple[str, ...] = ()) -> None:
    """Print the plan, its predicted cost, its stages and the alternatives."""
    from rich.table import Table

    best, cost = result.best, result.best.cost
    plan = best.plan
    console.print(
        f"[bold]{_text(profile.name)}[/] ({profile.num_params / 1e9:.2f} B params, {profile.num_layers} layers) "
        f"on {cluster.world_size} x {_text(cluster.device.name)} ({cluster.nodes} node(s) x {cluster.gpus_per_node}); "
        f"global batch {plan.global_batch_size} x {plan.seq_len} tokens")
    if planning is not None:
        console.print(f"[bold]memory[/] {_headroom_text(planning)}; {planning.dtype_bytes}-byte compute, "
                      f"{planning.device_type} kernels")
        if planning.split_refusal:
            console.print(f"[yellow]data parallel only[/] (tp=1, pp=1): {_text(planning.split_refusal)}")
    if cluster.calibration:
        console.print(f"[bold]measured[/] {_text(cluster.calibration)}")
    for line in not_priced:  # autopar.plan.unpriced: never priced as something else
        console.print(f"[yellow]not priced[/] {_text(line)}")
    status = "[green]fits[/]" if cost.fits else f"[red]DOES NOT FIT: {cost.over_bytes / GIB:.1f} GiB over[/]"
    console.print(f"[bold]plan[/] {plan.describe()}  ({status})")
    console.print(
        f"[bold]predicted[/] step {_fmt_s(cost.step_time_s)}, {cost.tokens_per_s:,.0f} tokens/s, "
        f"{cost.model_tflops_per_gpu:.0f} TFLOP/s per GPU, MFU {cost.mfu:.1%}")
    if result.choice_reason:
        console.print(f"[bold]robust choice[/] {_text(result.choice_reason)}")
    for risk in result.risks:  # no plan inside the model's error has fewer risks
        console.print(f"[red]risk[/] this plan {_text(risk)}; no plan predicted inside the model's error avoids "
                      "it")
    if result.reliance:
        console.print(f"[yellow]relies on[/] this plan {_text(result.reliance)}")
    console.print(_breakdown_table(cost, Table))
    console.print(_stage_table(best, Table))
    if result.alternatives:
        console.print(_alternatives_table(result, Table))
    s = result.search_dict()
    console.print(f"[dim]searched {s['candidates']} layouts in {s['planning_time_s']:.2f} s "
                  f"(+{s['alternatives_time_s']:.2f} s for the alternatives): {s['evaluated']} costed exactly, "
                  f"{s['pruned_by_bound']} pruned by bound, {s['split_solves']} stage splits solved; "
                  f"profile: {profile.source}[/]")


def _breakdown_table(cost, Table):
    table = Table(title="step breakdown (critical path)", title_justify="left")
    table.add_column("term")
    table.add_column("time", justify="right")
    table.add_column("share", justify="right")
    extras = {k: v for k, v in cost.extras.items() if k.endswith("_s") and isinstance(v, float)}
    for name, value in {**cost.breakdown(), **extras}.items():  # sharing_s: [Note: ranks sharing a device]
        table.add_row(name.removesuffix("_s").replace("_", " "), _fmt_s(value), f"{value / cost.step_time_s:.1%}")
    table.add_row("[bold]step[/]", f"[bold]{_fmt_s(cost.step_time_s)}[/]", "100%")
    return table


def _stage_table(best, Table):
    plan, cost = best.plan, best.cost
    table = Table(title="pipeline ranks (memory per GPU)", title_justify="left")
    for col in ("rank", "layers", "compute/mb", "weights+grads+opt", "activations", "other", "peak / capacity"):
        table.add_column(col, justify="left" if col == "layers" else "right")
    for stage in cost.stages:
        names = [n for c in stage.chunks for n in plan.stages[c].layers]
        mem = stage.memory_bytes
        static = mem["weights"] + mem["grads"] + mem["optimizer"]
        other = mem["transient"] + mem["reserve"]
        colour = "green" if stage.fits else "red"
        table.add_row(
            str(stage.rank), compact_layers(names), _fmt_s(stage.compute_s + stage.tp_comm_s),
            f"{static / GIB:.1f} GiB", f"{mem['activations'] / GIB:.1f} GiB", f"{other / GIB:.1f} GiB",
            f"[{colour}]{stage.peak_bytes / GIB:.1f} / {stage.capacity_bytes / GIB:.0f} GiB[/]")
    return table


def _alternatives_table(result: SearchResult, Table):
    table = Table(title="best alternatives, and why they lost", title_justify="left")
    for col in ("choice", "layout", "step", "why not"):
        table.add_column(col, justify="right" if col == "step" else "left")
    for alt in result.alternatives:
        table.add_row(f"{alt.dimension}={alt.value}", alt.evaluated.plan.describe(),
                      _fmt_s(alt.evaluated.cost.step_time_s), alt.reason)
    return table
