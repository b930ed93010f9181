"""The bench record: every layout's measured step time, memory and loss beside its prediction.

Pure Python (no torch): autopar.bench.run builds the record from the workers'
output; autopar.bench.compare and the tests read it back. The JSON shape is
documented in docs/bench.md; :data:`BENCH_FORMAT_VERSION` versions it.
"""

from __future__ import annotations

import statistics

BENCH_FORMAT = "autopar-bench"
BENCH_FORMAT_VERSION = 1
COUNTED_TERMS = ("weights", "grads", "optimizer", "activations", "batch")
"""The predicted memory terms a CPU run counts (autopar.bench.memory): the plan's reserve, transient copies
and send buffers exist too but are not counted on CPU."""


PROC_STAT = "/proc/stat"
"""Linux's CPU time counters since boot; its first line sums every CPU: user, nice, system, idle, iowait,
irq, softirq, steal (proc(5)), in clock ticks."""


def host_cpu_ticks(text: str | None = None) -> tuple[int, int] | None:
    """(steal, total) clock ticks of every CPU since boot from ``/proc/stat`` (or ``text``): steal being the
    time a hypervisor ran something else while this virtual machine had work for its CPU. None where there
    is no such file or no steal column (not Linux, or a kernel before 2.6.11)."""
    if text is None:
        try:
            with open(PROC_STAT) as f:
                text = f.readline()
        except OSError:
            return None
    fields = text.split()
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]
    return ticks[7], sum(ticks)


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the host's CPU time that was stolen between two :func:`host_cpu_ticks` readings: what
    the machine took from a run beside it (a busy neighbour on a cloud VM or CI runner), so that a
    measurement slower than its prediction can be told from a model that is wrong. None without both."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def step_stats(times_by_round: list[list[float]]) -> dict:
    """Median, quartiles, extremes and per-round medians of the timed steps (seconds)."""
    times = sorted(t for rnd in times_by_round for t in rnd)
    if not times:
        return {"median_s": None, "p25_s": None, "p75_s": None, "min_s": None, "max_s": None,
                "round_medians_s": [], "steps": 0}
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "p25_s": q[0], "p75_s": q[2], "min_s": times[0],
            "max_s": times[-1], "round_medians_s": [statistics.median(r) for r in times_by_round if r],
            "steps": len(times)}


def cpu_stats(times_by_round: list[list[float]], cpu_by_rank: list[list[list[float]]] | None) -> dict | None:
    """Per rank the median CPU seconds of a timed step, and the median over the steps of the ranks' CPU
    seconds over the step's wall time: the cores (devices, on CPU) the step kept busy. None where the worker
    did not record CPU time (a record of format 1 before it did, or the script bench)."""
    if not cpu_by_rank:
        return None
    walls = [t for rnd in times_by_round for t in rnd]
    per_rank = [[c for rnd in rank for c in rnd] for rank in cpu_by_rank]
    busy = [sum(rank[i] for rank in per_rank) / w for i, w in enumerate(walls) if w > 0]
    return {"per_rank_median_s": [statistics.median(r) for r in per_rank],
            "busy_cores": statistics.median(busy) if busy else None}


def spread(stats: dict) -> float:
    """The interquartile range over the median: the run-to-run noise a difference must beat."""
    return (stats["p75_s"] - stats["p25_s"]) / stats["median_s"] if stats.get("median_s") else 0.0


def memory_check(predicted: dict | None, memory: list[dict]) -> list[dict]:
    """Per rank: the predicted CPU-countable bytes of its pipeline rank (:data:`COUNTED_TERMS`) against
    the counted ones, and their ratio (acceptance: 1 <= ratio <= 1.15)."""
    if not predicted:
        return []
    out = []
    for rank, mem in enumerate(memory):
        stage = predicted["stages"][mem.get("pp_rank") or 0]
        want = sum(stage["memory_bytes"].get(k, 0.0) for k in COUNTED_TERMS)
        have = mem["counted"]
        out.append({"rank": rank, "pp_rank": mem.get("pp_rank") or 0, "predicted_bytes": want,
                    "measured_bytes": have, "ratio": want / have if have else None,
                    "predicted_terms": {k: stage["memory_bytes"].get(k, 0.0) for k in COUNTED_TERMS},
                    "measured_terms": {"weights": mem["params"], "grads": mem["grads"],
                                       "optimizer": mem["optimizer"], "activations": mem["activations"],
                                       "batch": mem.get("batch", 0)}})
    return out


def layout_record(raw: dict, tokens_per_step: int, reference_flops: float | None) -> dict:
    """One layout's entry of the record from the worker's ``raw`` entry.

    ``reference_flops``: model FLOPs per step over the device peak times the world (the denominator of MFU
    times the step), taken from a predicted layout so the baseline gets an MFU too.
    """
    stats = step_stats(raw["times_s"])
    pred = raw.get("predicted")
    median = stats["median_s"]
    measured = {"step_time": stats, "spread": spread(stats) if median else None,
                "tokens_per_s": tokens_per_step / median if median else None,
                "mfu": reference_flops / median if median and reference_flops else None,
                "losses": raw["losses"], "memory": raw["memory"],
                "cpu": cpu_stats(raw["times_s"], raw.get("cpu_s")),
                "peak_memory_bytes": [m["cuda_peak"] if m.get("cuda_peak") is not None else m["counted"]
                                      for m in raw["memory"]]}
    out = {k: raw.get(k) for k in ("name", "kind", "options", "layout", "plan_digest", "planned", "plan")}
    out["predicted"] = pred
    out["measured"] = measured
    out["ratio"] = pred["step_time_s"] / median if pred and median else None
    out["memory_check"] = memory_check(pred, raw["memory"])
    return out


def mfu_flops(layouts: list[dict]) -> float | None:
    """MFU x step time of the first predicted layout (the same model FLOPs and peak for every layout)."""
    for raw in layouts:
        p = raw.get("predicted")
        if p and p.get("mfu"):
            return p["mfu"] * p["step_time_s"]
    return None


def tie_groups(medians: list[float], spreads: list[tuple[float, float]]) -> list[int]:
    """A group index per layout: layouts whose medians lie within each other's [p25, p75] are tied
    (joined transitively)."""
    n = len(medians)
    group = list(range(n))

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            lo_i, hi_i = spreads[i]
            lo_j, hi_j = spreads[j]
            if lo_j <= medians[i] <= hi_j or lo_i <= medians[j] <= hi_i:
                group[find(i)] = find(j)
    return [find(i) for i in range(n)]


def ranks(values: list[float], groups: list[int] | None = None) -> list[float]:
    """1-based ranks, ties (equal values, or one ``groups`` index) given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    rank = [0.0] * len(values)
    for pos, i in enumerate(order):
        rank[i] = pos + 1.0
    key = groups if groups is not None else values
    for g in set(key):
        members = [i for i in range(len(values)) if key[i] == g]
        mean = sum(rank[i] for i in members) / len(members)
        for i in members:
            rank[i] = mean
    return rank


def spearman(predicted: list[float], measured: list[float], groups: list[int] | None = None) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks), measured ties by ``groups``."""
    if len(predicted) < 3:
        return None
    a, b = ranks(predicted), ranks(measured, groups)
    ma, mb = statistics.mean(a), statistics.mean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / (va * vb) ** 0.5 if va and vb else None


def summary(layouts: list[dict]) -> dict:
    """Across layouts: predicted-vs-measured order, the choice's regret, the choice against plain DDP, the
    worst step-time ratio and memory ratio."""
    timed = [x for x in layouts if x["measured"]["step_time"]["median_s"]]
    predicted = [x for x in timed if x["predicted"]]
    med = [x["measured"]["step_time"]["median_s"] for x in predicted]
    spreads = [(x["measured"]["step_time"]["p25_s"], x["measured"]["step_time"]["p75_s"]) for x in predicted]
    groups = tie_groups(med, spreads)
    out = {"spearman": spearman([x["predicted"]["step_time_s"] for x in predicted], med, groups),
           "spearman_untied": spearman([x["predicted"]["step_time_s"] for x in predicted], med),
           "max_abs_error": max((abs(x["ratio"] - 1) for x in predicted), default=None)}
    mem = [c["ratio"] for x in predicted for c in x["memory_check"] if c["ratio"] is not None]
    out["memory_ratio_range"] = [min(mem), max(mem)] if mem else None
    chosen = next((x for x in timed if x["kind"] == "chosen"), None)
    ddp = next((x for x in timed if x["kind"] == "ddp"), None)
    if chosen and predicted:
        best = min(predicted, key=lambda x: x["measured"]["step_time"]["median_s"])
        c = chosen["measured"]["step_time"]
        out["chosen"] = chosen["layout"]
        out["best_measured"] = best["layout"]
        out["regret"] = c["median_s"] / best["measured"]["step_time"]["median_s"] - 1
    if chosen and ddp:
        c, d = chosen["measured"]["step_time"], ddp["measured"]["step_time"]
        out["vs_ddp"] = c["median_s"] / d["median_s"]
        out["slower_than_ddp_beyond_spread"] = c["p25_s"] > d["p75_s"]
    return out
