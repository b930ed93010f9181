"""`autopar` on the command line.

Only what a command needs is imported, and only when it runs: `autopar
explain` never imports torch or transformers (their import alone takes 5-7 s
here), so a plan shows in about a second.
"""

from __future__ import annotations

import json
import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from autopar.errors import AutoparError
from autopar.launch import DEFAULT_MEMORY_HEADROOM
from autopar.plan.types import Precision
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
    gpus: Optional[int] = typer.Option(None, help="total GPUs (fills nodes of --gpus-per-node; on --cluster cpu, one node of that many processes, as 'autopar run -n N')"),
    nodes: Optional[int] = typer.Option(None, help="number of nodes"),
    gpus_per_node: Optional[int] = typer.Option(None, help="GPUs per node"),
    from_env: bool = typer.Option(False, "--from-env", help="plan for the job torchrun's environment describes (WORLD_SIZE, LOCAL_WORLD_SIZE, the detected device), read as the executor reads it; imports torch"),
    memory_headroom: Optional[float] = typer.Option(None, help=f"fraction of each device's memory the plan leaves free; default {DEFAULT_MEMORY_HEADROOM}, the executor's"),
    precision: Optional[Precision] = typer.Option(None, help="the run's precision: fp32 (a model built in float32, as from_config on CPU), bf16 (built in bfloat16) or bf16_mixed (fp32 weights, bf16 compute; the default)"),
    global_batch: Optional[int] = typer.Option(None, help="sequences per step; default 8 per GPU"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per sequence; default 2048 or the model's context"),
    tp: Optional[int] = typer.Option(None, help="pin the tensor-parallel degree"),
    pp: Optional[int] = typer.Option(None, help="pin the pipeline-parallel degree"),
    dp: Optional[int] = typer.Option(None, help="pin the data-parallel degree"),
    micro_batch: Optional[int] = typer.Option(None, help="pin the micro-batch size"),
    virtual_stages: Optional[int] = typer.Option(None, help="pin chunks per pipeline rank"),
    schedule: Optional[ScheduleOpt] = typer.Option(None, help="pin the pipeline schedule"),
    recompute: Optional[RecomputeOpt] = typer.Option(None, help="pin activation recomputation"),
    zero: Optional[int] = typer.Option(None, help="pin the ZeRO stage: 0 (replicated), 2 or 3 (FSDP2, parameters gathered per step or per block)"),
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

    from autopar.execute.heap import launch_env

    try:
        os.environ.update(launch_env())  # CPU ranks start with the executor's heap (docs/executor.md#the-cpu-heap)
    except AutoparError as err:
        _fail(err)
    argv = ["--nproc-per-node", str(nproc), "--nnodes", nnodes]
    if rdzv_endpoint:
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id or "autopar"]
    elif nnodes == "1":
        argv.append("--standalone")
    if node_rank is not None:
        argv += ["--node-rank", str(node_rank)]
    torchrun([*argv, script, *ctx.args])


@app.command(cls=_Command)
def calibrate(
    nproc: int = typer.Option(1, "-n", "--nproc-per-node", help="Processes on this node (ranks, as 'autopar run -n')."),
    out: Path = typer.Option(Path("cluster.json"), "--out", help="the cluster JSON to write (docs/clusters.md#measured)"),
    model: list[str] = typer.Option([], "--model", help="also time this model's blocks at the TP degrees and micro-batches the planner considers (repeatable)"),
    seq_len: Optional[int] = typer.Option(None, help="sequence length of the --model blocks; default 2048 or the model's context"),
    global_batch: Optional[int] = typer.Option(None, help="global batch the --model blocks' micro-batches divide; default 8 per rank"),
    dtype: Optional[str] = typer.Option(None, help="fp32 or bf16; default fp32 on CPU, bf16 on CUDA"),
    quick: bool = typer.Option(False, "--quick", help="fewer shapes and sizes (about 15 s on 4 CPU ranks): a smoke test, not a calibration"),
    nnodes: str = typer.Option("1", "--nnodes", help="Nodes (torchrun's MIN[:MAX] form)."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="This node's rank (static rendezvous)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="host:port of the rendezvous."),
    rdzv_id: Optional[str] = typer.Option(None, "--rdzv-id", help="Job id shared by every node."),
) -> None:
    """Measure this machine's primitives under torchrun and write a cluster JSON for explain, bench and the executor.

    Times matmuls and attention by shape, element-wise kernels, collectives and sends by group and size,
    per-call overheads, ranks per core or device and the runtime's memory; never a layout's training step.
    """
    try:
        opts = check_options({"nproc": nproc, "nnodes": nnodes, "node_rank": node_rank,
                              "rdzv_endpoint": rdzv_endpoint, "rdzv_id": rdzv_id}, RUN_OPTIONS)
        if dtype not in (None, "fp32", "bf16"):
            raise AutoparError(f"--dtype {show(dtype)}: use fp32 or bf16")
        from autopar.bench.calibrate import print_summary, run_calibrate
        from autopar.schema import check_out_file

        out = check_out_file(out, "--out", (".json",))
        data = run_calibrate(nproc=opts["nproc"], out=out, models=model, seq_len=seq_len, global_batch=global_batch,
                             dtype=dtype, quick=quick, nnodes=nnodes, node_rank=node_rank,
                             rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
    except AutoparError as err:
        _fail(err)
    if data is None:  # across nodes, the node that holds global rank 0 writes the file
        typer.echo(f"calibrate: measured; {out} is written by the node that ran global rank 0 (the rendezvous "
                   "numbers the nodes), not by this one", err=True)
    else:
        print_summary(data, out)


@app.command(cls=_Command, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    script: Optional[Path] = typer.Argument(None, help="a training script to bench unchanged (then its own arguments); or --model for synthetic batches"),
    nproc: int = typer.Option(1, "-n", "--nproc-per-node", help="ranks (processes on this node, as 'autopar run -n')"),
    model: Optional[str] = typer.Option(None, help="bench this model (preset, config.json or cached HF id) on synthetic batches"),
    global_batch: Optional[int] = typer.Option(None, help="--model: sequences per step; default 8 per rank"),
    seq_len: Optional[int] = typer.Option(None, help="--model: tokens per sequence; default 2048 or the model's context"),
    precision: Optional[Precision] = typer.Option(None, help="--model: fp32 (CPU default), bf16 (CUDA default) or bf16_mixed"),
    cluster: Optional[str] = typer.Option(None, help="the cluster both the executor and the predictions plan for: a preset or a JSON file from 'autopar calibrate'; default this machine"),
    memory_headroom: float = typer.Option(DEFAULT_MEMORY_HEADROOM, help="fraction of each device's memory the plans leave free"),
    top: int = typer.Option(1, help="also bench the search's next best plans, up to this many in all"),
    layout: list[str] = typer.Option([], "--layout", help="also bench this pinned layout, e.g. 'dp=2 tp=2 mb=4' (repeatable)"),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="a plain torch DDP row without autopar"),
    warmup: int = typer.Option(2, help="untimed steps of each layout first (then one more, untimed, counts memory)"),
    steps: int = typer.Option(10, help="timed steps of each layout per round"),
    rounds: int = typer.Option(3, help="rounds; each runs every layout, the order rotated, so noise hits all alike"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the record here (docs/bench.md)"),
    plot: Optional[Path] = typer.Option(None, help="draw predicted against measured step time (.png or .svg)"),
    trace: Optional[Path] = typer.Option(None, help="write a torch.profiler trace of one step of each layout per rank into this folder (Chrome / Perfetto)"),
    compare: Optional[Path] = typer.Option(None, help="a baseline record (--json of an earlier run): exit 1 on a regression"),
    max_regression: str = typer.Option("5%", help="--compare: step-time increase that fails (beyond the measured spread too)"),
    summary: Optional[Path] = typer.Option(None, help="append a markdown summary here (e.g. $GITHUB_STEP_SUMMARY)"),
    from_json: Optional[Path] = typer.Option(None, "--from-json", help="run nothing: show (and --compare, --plot, --summary) a record an earlier bench wrote"),
) -> None:
    """Run autopar's plan, the top-k plans or pinned layouts a few steps each; measured against predicted.

    `autopar bench train.py -n 4 --top 3 --steps 10 --json bench.json` or `autopar bench --model
    gpt2 -n 4 --seq-len 128 --global-batch 16`; `--compare baseline.json --max-regression 5%` exits 1
    on a regression (docs/bench.md, docs/ci.md).
    """
    try:
        findings = _bench(locals(), ctx.args)
    except AutoparError as err:
        _fail(err)
    if findings is not None and any(f.failed for f in findings):
        raise typer.Exit(code=1)


def _bench(kw: dict, script_args: list[str]):
    from autopar.bench.compare import compare as compare_records
    from autopar.bench.compare import parse_threshold
    from autopar.bench.report import markdown, plot, print_table
    from autopar.bench.run import run_bench
    from autopar.schema import check_out_file, load_json_file

    for flag in ("nproc", "top", "warmup", "steps", "rounds"):
        if not 1 <= kw[flag] <= 10_000:
            why = " (a first step's one-time buffers would distort the timing)" if flag == "warmup" else ""
            name = "-n" if flag == "nproc" else f"--{flag}"
            raise AutoparError(f"{name} {kw[flag]}: use a whole number from 1 to 10000{why}")
    if kw["script"] is not None and kw["model"] is not None:
        raise AutoparError("pass a training script or --model, not both")
    threshold = parse_threshold(kw["max_regression"])
    json_out = check_out_file(kw["json_out"], "--json", (".json",)) if kw["json_out"] else None
    plot_out = check_out_file(kw["plot"], "--plot", (".png", ".svg")) if kw["plot"] else None
    baseline = load_json_file(kw["compare"], "bench record") if kw["compare"] else None
    if kw["from_json"] is not None:
        if kw["script"] is not None or kw["model"] is not None:
            raise AutoparError("--from-json shows a recorded run; drop the script / --model (or drop --from-json)")
        record = load_json_file(kw["from_json"], "bench record")
    else:
        record = run_bench(_request(kw, script_args))
    findings = compare_records(record, baseline, max_regression=threshold) if baseline is not None else None
    if json_out:
        json_out.write_text(json.dumps(record, indent=1) + "\n")
    if plot_out:
        plot(record, plot_out)
    print_table(record, findings)
    if kw["summary"]:
        with open(kw["summary"], "a") as f:
            f.write(markdown(record, findings, str(kw["compare"]) if kw["compare"] else None))
    return findings


def _request(kw: dict, script_args: list[str]):
    from autopar.bench.run import BenchRequest, default_command

    return BenchRequest(nproc=kw["nproc"], model=kw["model"], script=kw["script"], script_args=script_args,
                       global_batch=kw["global_batch"], seq_len=kw["seq_len"],
                       precision=kw["precision"].value if kw["precision"] else None, cluster=kw["cluster"],
                       memory_headroom=kw["memory_headroom"], top=kw["top"], layouts=kw["layout"],
                       baseline=kw["baseline"], warmup=kw["warmup"], steps=kw["steps"], rounds=kw["rounds"],
                       trace=kw["trace"], command=default_command())


def main() -> None:
    """Entry point of the `autopar` script."""
    try:
        app()
    except AutoparError as err:  # raised outside a command's own handler
        typer.echo(error_line(str(err)), err=True)
        sys.exit(2)
