"""What ``autopar bench`` shows: a rich table, a markdown summary (CI job summaries), a plot."""

from __future__ import annotations

from pathlib import Path

from autopar.bench.compare import Finding, failed

MIB = 2**20
ERROR_BAND = 0.25
"""The band drawn around predicted = measured (the issue's acceptance: within 25%)."""
STEAL_NOTE_SHARE = 0.01
"""The stolen share of the host's CPU time from which the report says so: a percent of the cores is past
the timer noise of a few-second run and moves a CPU step by as much."""


def _row(x: dict) -> dict[str, str]:
    """One layout's cells, as text."""
    m, p = x["measured"], x["predicted"]
    st = m["step_time"]
    mem = [c["ratio"] for c in x["memory_check"] if c["ratio"] is not None]
    losses = [v for v in m["losses"] if v is not None]
    return {
        "layout": x["name"], "plan": x.get("layout") or "-",
        "predicted s": f"{p['step_time_s']:.3f}" if p else "-",
        "measured s (p25-p75)": (f"{st['median_s']:.3f} ({st['p25_s']:.3f}-{st['p75_s']:.3f})"
                                 if st["median_s"] else x.get("error") or "-"),
        "pred/meas": f"{x['ratio']:.2f}" if x.get("ratio") else "-",
        "tokens/s": f"{m['tokens_per_s']:,.0f}" if m.get("tokens_per_s") else "-",
        "MFU": f"{m['mfu']:.1%}" if m.get("mfu") else "-",
        "peak MiB/rank": f"{max(m['peak_memory_bytes']) / MIB:,.0f}" if m.get("peak_memory_bytes") else "-",
        "mem pred/meas": f"{min(mem):.2f}-{max(mem):.2f}" if mem else "-",
        "last loss": f"{losses[-1]:.4f}" if losses else "-",
    }


def print_table(record: dict, findings: list[Finding] | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    job = record["job"]
    title = (f"{job['model']} x {job['world_size']} ranks ({record['where']['device']}), global batch "
             f"{job['global_batch']} x {job['seq_len']}, {job['precision']}: {record['settings']['rounds']} rounds x "
             f"{record['settings']['steps']} steps after {record['settings']['warmup']} warm-up, interleaved")
    table = Table(title=escape(title))
    rows = [_row(x) for x in record["layouts"]]
    for col in rows[0]:
        table.add_column(col, justify="left" if col in ("layout", "plan") else "right")
    for r in rows:
        table.add_row(*(escape(v) for v in r.values()))
    console.print(table)
    s = record["summary"]
    parts = []
    if s.get("spearman") is not None:
        parts.append(f"Spearman (ties within spread) {s['spearman']:+.2f}")
    if s.get("regret") is not None:
        parts.append(f"autopar's choice {s['regret']:+.1%} vs the best measured ({s['best_measured']})")
    if s.get("vs_ddp") is not None:
        parts.append(f"{s['vs_ddp']:.2f}x plain DDP")
    if parts:
        console.print("; ".join(parts))
    if record["job"].get("calibration"):
        console.print(f"cluster: {escape(record['job']['calibration'])}")
    for note in notes(record):
        console.print(f"[yellow]note[/yellow] {escape(note)}")
    for f in findings or []:
        style = "red" if f.failed else "yellow"
        console.print(f"[{style}]{'FAIL' if f.failed else 'note'}[/{style}] {escape(f.message)}")


def notes(record: dict) -> list[str]:
    """What the reader of the figures should know about how they were taken: :func:`steal_note` and
    :func:`heap_note`."""
    return [n for n in (steal_note(record), heap_note(record)) if n]


def heap_note(record: dict) -> str | None:
    """What the report says when the CPU ranks' heap did not do what it did while the cluster was calibrated
    (autopar.execute.heap [Note: the CPU heap]); None otherwise."""
    ran, calibrated = record["where"].get("cpu_heap"), record["job"].get("calibration_cpu_heap")
    if not ran or not calibrated or ran.split()[0] == calibrated.split()[0]:
        return None
    return (f"the ranks' CPU heap was {ran} but {calibrated} while the cluster was calibrated: the predictions "
            "price page faults by the calibration's heap; run autopar calibrate again "
            "(docs/executor.md#the-cpu-heap)")


def steal_note(record: dict) -> str | None:
    """What the report says when the hypervisor took :data:`STEAL_NOTE_SHARE` or more of the host's CPU
    time while the bench ran (``where.cpu_steal_share``); None otherwise."""
    stolen = record["where"].get("cpu_steal_share")
    if stolen is None or stolen < STEAL_NOTE_SHARE:
        return None
    return (f"the hypervisor took {stolen:.1%} of this machine's CPU time while it ran (steal): the steps "
            "measured slower than the machine's own, and than a calibration made without it")


def markdown(record: dict, findings: list[Finding] | None = None, baseline_name: str | None = None) -> str:
    """A GitHub-flavoured markdown summary (``$GITHUB_STEP_SUMMARY``)."""
    verdict = ""
    if findings is not None:
        verdict = " — **FAIL**" if failed(findings) else " — pass"
    job = record["job"]
    lines = [f"### autopar bench{verdict}", "",
             f"{job['model']} on {job['world_size']} ranks ({record['where']['device']}), global batch "
             f"{job['global_batch']} x {job['seq_len']} tokens, {job['precision']}; "
             f"{record['settings']['rounds']} rounds x {record['settings']['steps']} steps, interleaved. "
             f"`{record['command']}`", ""]
    rows = [_row(x) for x in record["layouts"]]
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "|".join("---" if c in ("layout", "plan") else "---:" for c in rows[0]) + "|")
    for r in rows:
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in r.values()) + " |")
    for note in notes(record):
        lines += ["", f"Note: {note}."]
    if findings is not None:
        lines += ["", f"Compared with `{baseline_name}`:" if baseline_name else "Compared with the baseline:"]
        found = [f"- {'❌' if f.failed else 'ℹ️'} {f.message}" for f in findings]
        lines += found or ["- no change beyond the noise"]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> Path:
    """Predicted against measured step time per layout (median, p25-p75 bars), y = x and a 25% band; the
    plain-DDP baseline as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 8))
    points = [x for x in record["layouts"] if x["predicted"] and x["measured"]["step_time"]["median_s"]]
    top = 0.0
    for x in points:
        st, p = x["measured"]["step_time"], x["predicted"]["step_time_s"]
        ax.errorbar([p], [st["median_s"]], yerr=[[st["median_s"] - st["p25_s"]], [st["p75_s"] - st["median_s"]]],
                    fmt="o", capsize=3, label=f"{x['name']}: {x['layout']}")
        top = max(top, p, st["p75_s"])
    for x in record["layouts"]:
        if x["kind"] == "ddp" and x["measured"]["step_time"]["median_s"]:
            ax.axhline(x["measured"]["step_time"]["median_s"], color="grey", linestyle=":", label="plain DDP")
            top = max(top, x["measured"]["step_time"]["median_s"])
    top *= 1.15
    ax.plot([0, top], [0, top], color="black", linewidth=0.8, label="predicted = measured")
    ax.fill_between([0, top], [0, top * (1 - ERROR_BAND)], [0, top * (1 + ERROR_BAND)], color="green", alpha=0.1,
                    label=f"within {ERROR_BAND:.0%}")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("predicted step time (s)")
    ax.set_ylabel("measured step time (s), median and p25-p75")
    ax.set_title(f"{record['job']['model']}: predicted vs measured", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
