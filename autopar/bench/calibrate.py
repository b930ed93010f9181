"""``autopar calibrate``: measure this machine's primitives and write a cluster JSON.

Launches autopar.bench.calibrate_worker under torchrun (gloo on CPUs, NCCL on
GPUs), then turns its raw record into the documented cluster JSON
(docs/clusters.md#measured): the device's measured matmul and attention tables
(``device.measured``, the cost model's kernel tables), the links fitted from
the collectives and sends (``measured.collectives``, ``measured.p2p``), the
per-call overheads, the ranks sharing a core or device, the runtime's memory
(``device.context_gib``), and where and when it was measured. Only primitives
are timed ([Note: measure primitives, predict layouts]).
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path

from autopar.bench.results import host_cpu_ticks, steal_share
from autopar.cluster import GIB, MEASURED_FORMAT_VERSION, cluster_from_dict
from autopar.errors import AutoparError

CLUSTER_FORMAT = "autopar-cluster"
"""The ``format`` tag of a calibrated cluster JSON (plain hand-written ones may leave it out)."""


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(latency s, bytes/s) of ``t = latency + n / rate`` through (n bytes, t seconds) points, least squares on
    relative error (each point weighted 1 / t^2, so the 256-byte latency counts as much as the 8 MiB
    bandwidth); a negative latency or rate is clamped to the nearest physical value."""
    if not points:
        raise AutoparError("no timings to fit a latency and bandwidth to")
    w = [1.0 / t**2 for _, t in points]
    sw = sum(w)
    sx = sum(wi * n for wi, (n, _) in zip(w, points))
    sy = sum(wi * t for wi, (_, t) in zip(w, points))
    sxx = sum(wi * n * n for wi, (n, _) in zip(w, points))
    sxy = sum(wi * n * t for wi, (n, t) in zip(w, points))
    det = sw * sxx - sx * sx
    slope = (sw * sxy - sx * sy) / det if det > 0 else 0.0
    if slope <= 0:  # flat: latency-bound at every size timed; the largest gives the bandwidth floor
        n, t = max(points)
        return min(t for _, t in points), n / t
    latency = max(0.0, (sy - slope * sx) / sw)
    return latency, 1.0 / slope


def _fits(rows: list[dict], key) -> list[tuple]:
    """One fit per ``key(row)`` over the rows' sizes; several partitions of one key (contiguous and strided
    groups) are pooled: the cost model does not tell them apart inside a node."""
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append((float(r["bytes"]), float(r["seconds"])))
    return [(*k, *fit_line(v)) for k, v in sorted(groups.items())]


LOSS_KERNELS = ("cross_entropy", "loss_parallel")
"""The loss's kernels (priced at their own rates), left out of the element-wise bandwidth."""
OWN_RATE_ROWS = (*LOSS_KERNELS, "fresh_pages", "adamw")
"""Rows of the element-wise table priced at their own rates: the loss's kernels, a CPU's fresh pages
(``device.fresh_pages_GBps``, autopar.cost.fresh_pages) and torch's AdamW step (``device.optimizer_TBps``,
its per-tensor costs in ``measured.overheads_us``)."""


def shared_slowdown(sharing: dict) -> float:
    """The slowdown of a rank's compute when every rank computes at once: the measured one, never below the
    counted ranks per core or device. R ranks time-sliced on C units cannot run faster than R / C times
    slower than one alone; a measurement below that (a noisy "alone" sample, a rank that started late) is
    not physics."""
    return max(1.0, sharing["ranks_per_unit"], sharing["shared_slowdown"])


def cluster_json(raw: dict, command: str) -> dict:
    """The cluster JSON (docs/clusters.md#measured) for a worker's raw record."""
    where = raw["where"]
    gpu = where["device_type"] == "cuda"
    sharing = raw["sharing"]
    per_unit = sharing["ranks_per_unit"]
    gemm = raw["gemm"]
    peak = max(r["flops_per_s"] for r in gemm + raw.get("attention", []))
    memory = where["device_memory_bytes"] / (max(1.0, per_unit) if gpu else where["ranks_per_node"])
    kernels = [k for k in raw["elementwise"] if k["kernel"] not in OWN_RATE_ROWS]
    hbm = len(kernels) / sum(1.0 / k["bytes_per_s"] for k in kernels)  # each kernel moving the same bytes
    rates = {k["kernel"]: k["bytes_per_s"] for k in raw["elementwise"]}
    heap = f", CPU heap {where['cpu_heap']}" if where.get("cpu_heap") else ""
    calibration = (f"{command} on {where['host']} ({where['device_name']}, {where['world_size']} ranks, "
                   f"{where['backend']}, torch {where['torch']}{heap}) at {raw['when']}")
    colls = _fits(raw.get("collectives", []), lambda r: (r["op"], r["group"], r["inter_node"]))
    p2p = _fits(raw.get("p2p", []), lambda r: (r["inter_node"],))
    device = {
        "name": where["device_name"], "kind": "gpu" if gpu else "cpu",
        "peak_tflops": peak / 1e12, "memory_gib": memory / GIB, "hbm_TBps": hbm / 1e12,
        "context_gib": raw["runtime_memory_bytes"] / GIB, "matmul_ceiling": 1.0,
        **{key: rates[kernel] / 1e12 for key, kernel in (("loss_TBps", "cross_entropy"),
                                                         ("loss_parallel_TBps", "loss_parallel")) if kernel in rates},
        **({"fresh_pages_GBps": rates["fresh_pages"] / 1e9} if "fresh_pages" in rates else {}),
        **({"optimizer_TBps": rates["adamw"] / 1e12} if "adamw" in rates else {}),
        "measured": {"source": calibration,
                     "matmul": [[r["m"], r["k"], r["n"], r["flops_per_s"] / 1e12] for r in gemm],
                     "attention": [[r["seq_len"], r["head_dim"], *([r["batch_heads"]] if "batch_heads" in r else []),
                                    r["flops_per_s"] / 1e12] for r in raw.get("attention", [])]},
    }
    data = {
        "format": CLUSTER_FORMAT, "nodes": where["nodes"], "gpus_per_node": where["ranks_per_node"],
        "device": device, **_scalar_links(colls, p2p),
        "measured": {
            "format_version": MEASURED_FORMAT_VERSION, "calibration": calibration, "command": command,
            "when": raw["when"], "where": where, "dtype": raw["dtype"], "quick": raw.get("quick", False),
            "ranks_per_device": per_unit, "shared_slowdown": shared_slowdown(sharing),
            "shared_slowdown_samples": sharing.get("shared_slowdown_samples"),
            "comm_overlap": raw.get("overlap", {}).get("comm_overlap", 1.0), "overlap_timings": raw.get("overlap"),
            "collectives": [[op, g, inter, lat * 1e6, bw / 1e9] for op, g, inter, lat, bw in colls],
            "p2p": [[inter, lat * 1e6, bw / 1e9] for inter, lat, bw in p2p],
            "overheads_us": {k.removesuffix("_s"): v * 1e6
                             for k, v in {**raw["overheads"], **_optimizer_overheads(raw)}.items()},
            "elementwise_GBps": {k["kernel"]: k["bytes_per_s"] / 1e9 for k in raw["elementwise"]},
            "runtime_memory_gib": raw["runtime_memory_bytes"] / GIB,
            "blocks": [_block_table(b) for b in raw.get("blocks", [])],
            "samples": {"collectives": raw.get("collectives", []), "p2p": raw.get("p2p", [])},
            "calibrate_s": raw.get("calibrate_s"),
        },
    }
    data["measured"]["layout_fixed"], data["measured"]["rest_fixed"] = price_tiny_models(
        raw.get("layout_fixed", []), data)
    data["measured"]["pipeline_fixed"] = price_pipeline_fixed(raw.get("pipeline_fixed", []), data)
    return data


def _optimizer_overheads(raw: dict) -> dict[str, float]:
    """``adamw_tensor_s`` and ``adamw_dtensor_s`` from the worker's ``adamw`` row (its per-tensor costs), where
    measured."""
    row = next((k for k in raw["elementwise"] if k["kernel"] == "adamw"), {})
    return {f"adamw_{kind}_s": row[f"{kind}_s"] for kind in ("tensor", "dtensor") if row.get(f"{kind}_s") is not None}


def price_tiny_models(rows: list[dict], data: dict) -> tuple[list[list[float]], list[list[float]]]:
    """(``layout_fixed``, ``rest_fixed``) rows from the tiny models the worker timed
    (autopar.bench.primitives.layout_fixed_rows, one row per layout and token count), each
    ``[tp, dp, zero, tokens, measured ms, priced ms]``, measured and as the cost model prices the same tiny
    models on the cluster just measured (its kernels, collectives and sharing; ``data`` without fixed costs),
    so that measured - priced is what no other term counts:

    - per block: the two models' difference over their blocks;
    - outside the blocks: the smaller model's time less its blocks' (the embedding, LM head, loss and the
      step's own calls).

    Both are differences of two timings: on a busy machine the measured one can come out below zero, which
    nothing takes (and the cluster reader refuses): 0, the same floor as the priced one."""
    from autopar.bench.primitives import FIXED_SEQ

    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="calibrating")
    blocks, rest = [], []
    for r in rows:
        (n1, n3) = r["blocks"]
        key = [r["tp"], r["dp"], r["zero"], r.get("tokens", FIXED_SEQ)]
        priced = tuple(_priced_step_s(config, plan, cluster) for config, plan in zip(r["configs"], r["plans"]))
        per_block = [max(0.0, t3 - t1) / (n3 - n1) for t1, t3 in (r["seconds"], priced)]
        blocks.append(key + [x * 1e3 for x in per_block])
        rest.append(key + [max(0.0, t1 - n1 * x) * 1e3 for (t1, _), x in zip((r["seconds"], priced), per_block)])
    return blocks, rest


def price_pipeline_fixed(rows: list[dict], data: dict) -> list[list[float]]:
    """``[pp, measured ms, priced ms]`` per extra micro-batch of the tiny pipeline runs the worker timed
    (autopar.bench.primitives.pipeline_fixed_rows): the two runs' difference over their micro-batch counts,
    measured and as the cost model prices it on the cluster just measured (kernels, sends, sharing and the
    layout's fixed cost per block: ``data`` holds ``layout_fixed`` already), so that measured - priced is what
    a pipeline schedule pays per micro-batch of a chunk that no other term counts (``rest_fixed`` too). Floored
    at 0 like a block's fixed cost."""
    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="calibrating")
    out = []
    for r in rows:
        (m1, m3), (s1, s3) = r["microbatches"], r["seconds"]
        p1, p3 = (_priced_step_s(r["config"], plan, cluster) for plan in r["plans"])
        out.append([r["pp"], max(0.0, s3 - s1) / (m3 - m1) * 1e3, max(0.0, p3 - p1) / (m3 - m1) * 1e3])
    return out


def _priced_step_s(config: dict, plan: dict, cluster) -> float:
    """The cost model's step time of a tiny model the worker timed (its config and the plan it ran)."""
    from autopar.cost.model import estimate
    from autopar.plan.types import Plan
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict

    arch = arch_from_dict(f"tiny-{config['model_type']}", config)
    profile = profile_analytic(arch, seq_len=plan["seq_len"], dtype_bytes=4)
    return estimate(profile, cluster, Plan.from_dict(plan)).step_time_s


def _scalar_links(colls: list[tuple], p2p: list[tuple]) -> dict:
    """The links' scalar fields: the fastest link the measurements allow, in the alpha-beta terms of
    autopar.cost.layers.collective_s (a ring over g ranks: 2 (g - 1) steps for an all-reduce, g - 1
    otherwise, each a latency, moving steps / g of the bytes), a send being one step of all its bytes.
    The lowest latency per step and the highest bandwidth over every fit, so that what a reader prices
    from the scalars alone (a group size not measured, the planner's bounds) is never slower than
    measured; the measured tables price the rest (docs/clusters.md#measured-links-sharing-and-overheads)."""
    out = {}
    for inter, prefix in ((False, "intra_node"), (True, "inter_node")):
        links = [(lat, rate) for i, lat, rate in p2p if i == inter]
        for op, g, i, lat, rate in colls:
            if i == inter:
                steps = 2 * (g - 1) if op == "all_reduce" else g - 1
                links.append((lat / steps, rate * steps / g))
        if links:
            out[f"{prefix}_latency_us"] = min(lat for lat, _ in links) * 1e6
            out[f"{prefix}_GBps"] = max(rate for _, rate in links) / 1e9
    if "intra_node_GBps" not in out:  # one rank: nothing measured, nothing to price
        out |= {"intra_node_GBps": 1.0, "intra_node_latency_us": 1.0}
    if "inter_node_GBps" not in out:  # one node: the same link (no plan crosses nodes)
        out |= {"inter_node_GBps": out["intra_node_GBps"], "inter_node_latency_us": out["intra_node_latency_us"]}
    return out


def _block_table(blocks: dict) -> dict:
    return {"model": blocks["model"], "seq_len": blocks["seq_len"],
            "columns": ["tp", "micro_batch_size", "fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops"],
            "rows": [[r["tp"], r["micro_batch_size"], r["fwd_s"] * 1e3, r["bwd_s"] * 1e3,
                      r["fwd_flops"] / r["fwd_s"] / 1e12, r["bwd_flops"] / r["bwd_s"] / 1e12]
                     for r in blocks["rows"]]}


def run_calibrate(*, nproc: int, out: Path, models: list[str] = (), seq_len: int | None = None,
                  global_batch: int | None = None, dtype: str | None = None, quick: bool = False,
                  nnodes: str = "1", node_rank: int | None = None, rdzv_endpoint: str | None = None,
                  rdzv_id: str | None = None, command: str | None = None) -> dict | None:
    """Measure on ``nproc`` ranks per node and write ``out``; returns the cluster JSON (None on a node that
    did not run global rank 0, which writes nothing: c10d's rendezvous, not ``--node-rank``, numbers ranks)."""
    from autopar.bench.launcher import job_env, run_job, torchrun_command

    command = command or "autopar calibrate " + shlex.join(sys.argv[2:])
    with tempfile.TemporaryDirectory(prefix="autopar_calibrate_") as tmp:
        raw_path = Path(tmp) / "raw.json"
        target = ["-m", "autopar.bench.calibrate_worker", "--out", str(raw_path)]
        for ref in models:
            target += ["--model", ref]
        for flag, value in (("--seq-len", seq_len), ("--global-batch", global_batch), ("--dtype", dtype)):
            if value is not None:
                target += [flag, str(value)]
        if quick:
            target.append("--quick")
        cmd = torchrun_command(nproc, target, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                               rdzv_id=rdzv_id)
        ticks_before = host_cpu_ticks()
        run_job(cmd, "calibrate", env=job_env(nproc))
        if not raw_path.is_file():
            return None
        raw = json.loads(raw_path.read_text())
        raw["where"]["cpu_steal_share"] = steal_share(ticks_before, host_cpu_ticks())
        data = cluster_json(raw, command)
    cluster_from_dict(json.loads(json.dumps(data)), name=out.stem)  # what explain will read must load
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def print_summary(data: dict, out: Path) -> None:
    """What was measured, in one table per kind (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m, dev = data["measured"], data["device"]
    console.print(f"[bold]wrote {out}[/bold]: {m['calibration']}")
    t = Table(title="compute and memory (one rank alone)")
    for col in ("what", "value"):
        t.add_column(col)
    rates = [r[3] for r in dev["measured"]["matmul"]]
    t.add_row("matmul TFLOP/s (min / max over shapes)", f"{min(rates):.4f} / {max(rates):.4f}")
    t.add_row("element-wise GB/s (harmonic mean)", f"{dev['hbm_TBps'] * 1e3:.2f}")
    for key, what in (("loss_TBps", "the loss"), ("loss_parallel_TBps", "the vocab-parallel loss (TP)")):
        if dev.get(key):
            t.add_row(f"{what}, GB/s of the counted traffic", f"{dev[key] * 1e3:.2f}")
    if dev.get("fresh_pages_GBps"):
        t.add_row("fresh pages mapped in (page faults), GB/s", f"{dev['fresh_pages_GBps']:.2f}")
    if dev.get("optimizer_TBps"):
        t.add_row("torch's AdamW step, GB/s of the counted traffic", f"{dev['optimizer_TBps'] * 1e3:.2f}")
    t.add_row("ranks per core/device (counted) | slowdown when all compute (measured)",
              f"{m['ranks_per_device']:.2f} | {m['shared_slowdown']:.2f}")
    t.add_row("communication hidden behind compute (measured)", f"{m['comm_overlap']:.0%}")
    t.add_row("runtime memory per rank", f"{m['runtime_memory_gib']:.3f} GiB")
    for name, us in m["overheads_us"].items():
        t.add_row(f"overhead: {name}", f"{us:.1f} us")
    rest = {tuple(r[:4]): r[4] - r[5] for r in m.get("rest_fixed", [])}
    for tp, dp, zero, tokens, measured, priced in m.get("layout_fixed", []):
        outside = rest.get((tp, dp, zero, tokens))
        t.add_row(f"unpriced, tp {tp} dp {dp} ZeRO {zero} at {tokens} tokens: a block | the rest",
                  f"{measured - priced:.1f} | " + (f"{outside:.1f} ms" if outside is not None else "-"))
    for pp, measured, priced in m.get("pipeline_fixed", []):
        t.add_row(f"pipeline (pp {pp}) per micro-batch, measured | priced", f"{measured:.2f} | {priced:.2f} ms")
    console.print(t)
    if m["collectives"] or m["p2p"]:
        c = Table(title="collectives and sends: t = latency + bytes / rate")
        for col in ("op", "group", "across nodes", "latency us", "GB/s"):
            c.add_column(col, justify="right")
        for op, g, inter, lat, bw in m["collectives"]:
            c.add_row(op, str(g), str(inter), f"{lat:.0f}", f"{bw:.3f}")
        for inter, lat, bw in m["p2p"]:
            c.add_row("send/recv", "2", str(inter), f"{lat:.0f}", f"{bw:.3f}")
        console.print(c)
