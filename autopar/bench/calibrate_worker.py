"""One rank of ``autopar calibrate``: time the primitives (autopar.bench.primitives); rank 0 writes them.

    torchrun --nproc-per-node N -m autopar.bench.calibrate_worker --out RAW.json [--model M ...]

autopar.bench.calibrate launches this and turns the raw record into a cluster
JSON; run by hand it is only useful for debugging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from autopar.bench import primitives as P
from autopar.bench.launcher import progress as _progress
from autopar.execute.heap import applied as _heap_applied
from autopar.execute.heap import keep_cpu_heap

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one rank of autopar calibrate")
    p.add_argument("--out", required=True, help="rank 0 writes the raw record here")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--model", action="append", default=[], help="also time this model's blocks (repeatable)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="fewer shapes and sizes (tests, CI smoke)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    before = _rss_bytes()
    device = _device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    world = dist.get_world_size() if dist.is_initialized() else 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if dist.is_initialized():
        dist.all_reduce(torch.ones(1, device=device))  # the backend's buffers exist before memory is read
    record = {"where": _where(device, world, local, backend), "dtype": args.dtype or _dtype_name(dtype),
              "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "quick": args.quick}
    record["runtime_memory_bytes"] = P.slowest(P.runtime_memory_bytes(device))
    record["process_memory_before_init_bytes"] = P.slowest(before)
    _progress("sharing of cores/devices")
    record["sharing"] = P.core_sharing(device, dtype)
    _progress("per-call overheads")
    record["overheads"] = P.overhead_rows(device)
    shapes = P.gemm_shapes()
    if args.quick:
        shapes = [s for s in shapes if s[0] in (128, 2048) and s[1] in (256, 1024) and s[2] in (256, 4096)]
    models = [_model(ref, args, world) for ref in args.model]
    for m in models:
        shapes = sorted(set(shapes) | set(P.model_gemm_shapes(m["profile"], m["tps"], m["micro_batches"])))
    _progress(f"{len(shapes)} matmuls by shape")
    record["gemm"] = P.gemm_rows(shapes, dtype, device)
    _progress("fused attention")
    record["attention"] = (P.attention_rows(dtype, device, (128, 512), (64,)) if args.quick
                           else P.attention_rows(dtype, device))
    _progress("element-wise kernels")
    record["elementwise"] = P.elementwise_rows(dtype, device)
    sizes = P.MESSAGE_BYTES[::2] if args.quick else P.MESSAGE_BYTES
    if world > 1:
        _progress("collectives")
        record["collectives"] = P.collective_rows(world, local, device, dtype, sizes)
        _progress("point-to-point sends")
        record["p2p"] = P.p2p_rows(world, local, device, dtype, sizes)
        _progress("overlap of communication with compute")
        record["overlap"] = P.comm_overlap(device, dtype)
        _progress("fixed cost of a block per layout")
        layouts = _fixed_layouts(world)
        if args.quick:  # data parallel and the smallest TP degree
            layouts = [x for x in layouts if x[2] == 0][:2]
        fixed_config = _fixed_model_config(models)
        record["layout_fixed"] = P.layout_fixed_rows(fixed_config, layouts, device)
        _progress("fixed cost of a pipeline schedule per micro-batch")
        record["pipeline_fixed"] = P.pipeline_fixed_rows(fixed_config, world, local, device)
    record["blocks"] = [_blocks(m, dtype, device) for m in models]
    record["calibrate_s"] = time.perf_counter() - started
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(record, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _model(ref: str, args: argparse.Namespace, world: int) -> dict:
    """A --model's shape, profile, and the TP degrees and micro-batch sizes the planner can pick for it."""
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import load_arch

    arch = load_arch(ref)
    seq = args.seq_len or min(2048, arch.max_position_embeddings)
    batch = args.global_batch or 8 * world
    from autopar.profile.measured import UNSHARDABLE_PROFILES

    shardable = arch.profile not in UNSHARDABLE_PROFILES  # e.g. MPT: its blocks are timed whole only
    tps = [t for t in range(1, world + 1) if world % t == 0 and arch.num_attention_heads % t == 0
           and arch.num_key_value_heads % t == 0 and arch.ffn_hidden_size % t == 0 and (t == 1 or shardable)]
    mbs = [b for b in range(1, batch + 1) if batch % b == 0 and b <= 64]
    if args.quick:
        tps, mbs = tps[:2], mbs[:2]
    profile = profile_analytic(arch, seq_len=seq, dtype_bytes=4 if args.dtype != "bf16" else 2)
    return {"arch": arch, "seq_len": seq, "tps": tps, "micro_batches": mbs, "profile": profile}


def _blocks(model: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """Block timings of one --model (a record to check the cost model's blocks against; not priced)."""
    arch = model["arch"]
    _progress(f"{arch.name} blocks at tp {model['tps']}, micro-batch {model['micro_batches']}")
    rows = P.block_rows(arch, model["seq_len"], model["tps"], model["micro_batches"], dtype, device)
    return {"model": arch.name, "config": {k: v for k, v in (arch.raw or {}).items() if not k.startswith("_")},
            "seq_len": model["seq_len"], "rows": rows}


FIXED_DEFAULT_MODEL = "gpt2"
"""The family :func:`autopar.bench.primitives.layout_fixed_rows` and ``pipeline_fixed_rows`` shrink when no
--model is given."""


def _fixed_model_config(models: list[dict]) -> dict:
    """The first --model's config (its family's blocks) or GPT-2's, for the per-layout and pipeline fixed
    costs. A family autopar trains data parallel only (Falcon, OPT, BLOOM, MPT: autopar.families) has neither
    tensor-parallel nor pipeline layouts to measure, nor the config names autopar.bench.primitives.tiny_config
    shrinks, so GPT-2's stands in."""
    from autopar.families import family_spec
    from autopar.profile.config import load_arch

    arch = models[0]["arch"] if models else None
    if arch is None or not family_spec(arch.model_type).splittable:
        if arch is not None:
            _progress(f"{arch.model_type} has no tensor parallelism: per-layout fixed costs timed on "
                      f"{FIXED_DEFAULT_MODEL}'s blocks")
        arch = load_arch(FIXED_DEFAULT_MODEL)
    return {**(arch.raw or {}), "model_type": arch.model_type}


def _fixed_layouts(world: int) -> list[tuple[int, int, int]]:
    """(tp, dp, zero) per TP degree dividing the world (the rest data parallel, ZeRO 0), and ZeRO 2 and 3
    at tp 1: what autopar.cost.model composes any plan's fixed cost from."""
    return [(tp, world // tp, 0) for tp in range(1, world + 1) if world % tp == 0] + [(1, world, 2), (1, world, 3)]


def _device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    keep_cpu_heap()  # the executor's heap: calibrate measures the rates it will run at ([Note: the CPU heap])
    return torch.device("cpu")


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _where(device: torch.device, world: int, local: int, backend: str) -> dict:
    """Where the numbers were measured: host, processor, devices, software."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, float(props.total_memory)
    else:
        name, memory = _cpu_name(), _host_memory_bytes()
    return {"host": socket.gethostname(), "platform": platform.platform(), "device_type": device.type,
            "device_name": name, "device_memory_bytes": memory, "cpus": os.cpu_count(),
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0, "backend": backend,
            "world_size": world, "ranks_per_node": local, "nodes": max(1, world // local),
            "omp_num_threads": torch.get_num_threads(), "cpu_heap": _heap_applied(), "torch": torch.__version__,
            "python": platform.python_version(), "autopar": __import__("autopar").__version__}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _host_memory_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            return float(int(f.readline().split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        return float(8 << 30)


def _rss_bytes() -> float:
    with open("/proc/self/statm") as f:
        return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


if __name__ == "__main__":
    main()
