"""`autopar` on the command line.

Only what a command needs is imported, and only when it runs: `autopar
explain` never imports torch or transformers (their import alone takes 5-7 s
here), so a plan shows in about a second.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from autopar.errors import AutoparError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Plan and run parallel training of Hugging Face causal LMs.")



class ScheduleOpt(str, Enum):
    gpipe = "gpipe"
    one_f_one_b = "1f1b"
    interleaved_1f1b = "interleaved_1f1b"


class RecomputeOpt(str, Enum):
    none = "none"
    selective = "selective"
    full = "full"


class ProfilerOpt(str, Enum):
    analytic = "analytic"
    meta = "meta"


class AttentionOpt(str, Enum):
    sdpa = "sdpa"
    eager = "eager"


def _fail(err: AutoparError) -> None:
    typer.echo(f"autopar: error: {err}", err=True)
    raise typer.Exit(code=2)


@app.command()
def explain(
    model: str = typer.Argument(..., help="preset name, config.json (or its folder), or a cached HF model id"),
    cluster: Optional[str] = typer.Option(None, help="preset (a100-40gb, a100-80gb, h100-80gb, h200, cpu) or JSON file; default a100-80gb"),
    gpus: Optional[int] = typer.Option(None, help="total GPUs (fills nodes of --gpus-per-node)"),
    nodes: Optional[int] = typer.Option(None, help="number of nodes"),
    gpus_per_node: Optional[int] = typer.Option(None, help="GPUs per node"),
    global_batch: Optional[int] = typer.Option(None, help="sequences per step; default 8 per GPU"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per sequence; default 2048 or the model's context"),
    tp: Optional[int] = typer.Option(None, help="pin the tensor-parallel degree"),
    pp: Optional[int] = typer.Option(None, help="pin the pipeline-parallel degree"),
    dp: Optional[int] = typer.Option(None, help="pin the data-parallel degree"),
    micro_batch: Optional[int] = typer.Option(None, help="pin the micro-batch size"),
    virtual_stages: Optional[int] = typer.Option(None, help="pin chunks per pipeline rank"),
    schedule: Optional[ScheduleOpt] = typer.Option(None, help="pin the pipeline schedule"),
    recompute: Optional[RecomputeOpt] = typer.Option(None, help="pin activation recomputation"),
    zero: Optional[int] = typer.Option(None, help="pin optimizer sharding: 0, 1 or 3 (FSDP)"),
    sequence_parallel: Optional[bool] = typer.Option(None, "--sequence-parallel/--no-sequence-parallel", help="pin sequence parallelism"),
    tp_across_nodes: bool = typer.Option(False, help="allow a TP group to span nodes"),
    profiler: ProfilerOpt = typer.Option(ProfilerOpt.analytic, help="analytic (fast, no torch) or meta (builds the HF model on the meta device)"),
    attention: AttentionOpt = typer.Option(AttentionOpt.sdpa, help="attention kernel: sdpa (flash) or eager (scores kept)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object (docs/plan-format.md)"),
    plot: Optional[Path] = typer.Option(None, help="write the timeline and memory per stage to FILE (.png or .svg)"),
    alternatives: bool = typer.Option(True, help="also cost the best alternative for each choice"),
    measure: bool = typer.Option(False, help="time one block on this machine's GPU per TP degree and price blocks by it (needs torch; a CPU is timed as a warning)"),
    split_solver: str = typer.Option("auto", help="stage-split solver: auto (exact DP for chains, HiGHS ILP otherwise), highs, cbc (ILP in PuLP), dp"),
) -> None:
    """Show the plan autopar picks for MODEL on a cluster, and why."""
    try:
        _explain(**locals())
    except AutoparError as err:
        _fail(err)


def _explain(**kw) -> None:
    from autopar.explain.run import run_explain

    run_explain(**kw)


@app.command()
def presets() -> None:
    """List the shipped model and cluster presets."""
    from autopar.cluster import PRESETS
    from autopar.profile.config import list_presets

    typer.echo("models:   " + ", ".join(list_presets()))
    typer.echo("clusters: " + ", ".join([*PRESETS, "cpu"]))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    script: str = typer.Argument(..., help="The training script (then its own arguments)."),
    nproc: int = typer.Option(1, "-n", "--nproc-per-node", help="Processes on this node."),
    nnodes: str = typer.Option("1", "--nnodes", help="Nodes (torchrun's MIN[:MAX] form)."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="This node's rank (static rendezvous)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="host:port of the rendezvous."),
    rdzv_id: Optional[str] = typer.Option(None, "--rdzv-id", help="Job id shared by every node."),
) -> None:
    """Launch SCRIPT on NPROC processes: a thin front to torch.distributed.run (torchrun).

    One node: `autopar run -n 4 train.py`. Several: the same command on each
    node with --nnodes N --rdzv-endpoint HOST:PORT --rdzv-id JOB (c10d rendezvous).
    """
    if nproc < 1:
        _fail(AutoparError(f"-n {nproc}: must be a positive integer"))
    if not Path(script).is_file():
        _fail(AutoparError(f"training script {script!r} not found"))
    from torch.distributed.run import main as torchrun

    argv = ["--nproc-per-node", str(nproc), "--nnodes", nnodes]
    if rdzv_endpoint:
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id or "autopar"]
    elif nnodes == "1":
        argv.append("--standalone")
    if node_rank is not None:
        argv += ["--node-rank", str(node_rank)]
    torchrun([*argv, script, *ctx.args])


def main() -> None:
    """Entry point of the `autopar` script."""
    try:
        app()
    except AutoparError as err:  # raised outside a command's own handler
        typer.echo(f"autopar: error: {err}", err=True)
        sys.exit(2)
