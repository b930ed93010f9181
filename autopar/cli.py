"""`autopar` on the command line.

Only what a command needs is imported, and only when it runs: `autopar
explain` never imports torch or transformers (their import alone takes 5-7 s
here), so a plan shows in about a second.
"""

from __future__ import annotations

import re
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from autopar.errors import AutoparError
from autopar.schema import EXPLAIN_OPTIONS, RUN_OPTIONS, check_options, escape_text, show

_UsageError = typer.BadParameter.__base__
"""click's UsageError (typer vendors click from 0.16 on; BadParameter is public in both)."""
_LONG_WORD = re.compile(r"\S{101,}")
"""A run of more than 100 non-blank characters in an error (click quotes a bad value whole)."""


def error_line(message: str) -> str:
    """One line for stderr: control characters and newlines escaped, runs of over 100 characters cut to 80."""
    return "autopar: error: " + _LONG_WORD.sub(lambda m: m[0][:77] + "...", escape_text(message))


def _typed_value(args: list[str], err: Exception) -> str | None:
    """What the user typed for the option click refused (click's message leaves it out)."""
    opts = getattr(getattr(err, "param", None), "opts", ())
    for i, token in enumerate(args):
        for opt in opts:
            if token == opt and i + 1 < len(args):
                return args[i + 1]
            if token.startswith(opt + "="):
                return token[len(opt) + 1:]
    return None


def _usage_error(err: Exception, command: str, args: list[str]) -> typer.Exit:
    hint = f"run 'autopar {command} --help' for the options" if command else "run 'autopar --help' for the commands"
    message = err.format_message().rstrip(".")
    value = _typed_value(args, err)
    got = f" (got {show(value)})" if value is not None else ""
    typer.echo(error_line(f"{message}{got}; {hint}"), err=True)
    return typer.Exit(code=2)


class _Command(TyperCommand):
    """Click's usage errors (a non-integer --gpus, a missing MODEL) as one line and exit 2, like ours."""

    def parse_args(self, ctx, args):
        typed = list(args)
        try:
            return super().parse_args(ctx, args)
        except _UsageError as err:
            raise _usage_error(err, self.name or "", typed) from None


class _Group(TyperGroup):
    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except _UsageError as err:
            raise _usage_error(err, "", []) from None


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
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
    typer.echo(error_line(str(err)), err=True)
    raise typer.Exit(code=2)


@app.command(cls=_Command)
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

    run_explain(**check_options(kw, EXPLAIN_OPTIONS))


@app.command(cls=_Command)
def presets() -> None:
    """List the shipped model and cluster presets."""
    from autopar.cluster import PRESETS
    from autopar.profile.config import list_presets

    typer.echo("models:   " + ", ".join(list_presets()))
    typer.echo("clusters: " + ", ".join([*PRESETS, "cpu"]))


@app.command(cls=_Command, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
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
    try:
        opts = check_options({"nproc": nproc, "nnodes": nnodes, "node_rank": node_rank,  # the script last
                              "rdzv_endpoint": rdzv_endpoint, "rdzv_id": rdzv_id, "script": script}, RUN_OPTIONS)
        if node_rank is not None and node_rank >= opts["nnodes"][1]:
            raise AutoparError(f"--node-rank {node_rank}: must be below --nnodes {nnodes}; "
                               "use 0 to N-1, one per node")
    except AutoparError as err:
        _fail(err)
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
        typer.echo(error_line(str(err)), err=True)
        sys.exit(2)
