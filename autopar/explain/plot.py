"""``explain --plot``: the pipeline timeline and the memory per pipeline rank.

matplotlib is imported inside :func:`plot_plan` (``import autopar`` stays
light) and used object-oriented on the Agg canvas: no pyplot, so no global
backend switch in the caller's process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from autopar.cost.pipeline import Timeline
from autopar.errors import AutoparError
from autopar.schema import escape_text, show
from autopar.units import gib, ms

_SUFFIXES = (".png", ".svg")
_COLOURS = {"F": ("#4c72b0", "#8fa9d6"), "B": ("#dd8452", "#efb48f")}
"""Forward blue, backward orange; the lighter shade marks odd local chunks (interleaved)."""
_PART_COLOURS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#937860")
_LABEL_PX_PER_CHAR = 7.0
"""Rough width of one digit at the 7-pt label font, in pixels at 100 dpi: a
micro-batch number is drawn only inside a bar at least that wide per digit."""
_DPI = 100
_MIN_EDGE_PX = 4.0
"""Bars narrower than this on average get no white outline, which would hide their colour."""
_MAX_TICKS = 16


def plot_plan(path: str | Path, timeline: Timeline, stage_memory_bytes: Mapping[str, Sequence[float]],
              capacity_bytes: float, title: str) -> Path:
    """Draws the step timeline (top) and memory per pipeline rank (bottom).

    Args:
        path: output file; ``.png`` or ``.svg`` picks the format.
        timeline: from :func:`autopar.cost.pipeline.simulate` (or ``simulate_shared``).
        stage_memory_bytes: named parts (e.g. weights, grads, optimizer,
            activations, reserve), each bytes per pipeline rank; stacked in
            the order given.
        capacity_bytes: device memory, drawn as a horizontal line.
        title: figure title (the plan's one-line description).

    Returns:
        The path written.

    Raises:
        AutoparError: another suffix, or a memory part without one value per rank.
    """
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise AutoparError(f"plot file {show(str(path))} has suffix {path.suffix!r}; use .png or .svg")
    for name, values in stage_memory_bytes.items():
        if len(values) != timeline.num_ranks:
            raise AutoparError(f"memory part {name!r} has {len(values)} values for "
                               f"{timeline.num_ranks} pipeline ranks; give one per rank")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = 3.0 + 0.35 * timeline.num_ranks
    fig = Figure(figsize=(12, height + 3.0), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=[height, 3.0])
    _draw_timeline(top, timeline, fig.get_figwidth() * _DPI * 0.85)
    _draw_memory(bottom, stage_memory_bytes, capacity_bytes, timeline.num_ranks)
    fig.suptitle(escape_text(title), parse_math=False)  # a model name is text, not mathtext
    try:
        fig.savefig(path, format=path.suffix.lower()[1:])
    except OSError as err:
        raise AutoparError(f"--plot {show(str(path))}: cannot write it ({err.strerror}); "
                           "pick a writable file") from None
    return path


def _draw_timeline(ax, timeline: Timeline, axes_px: float) -> None:
    """One row per rank, bars in ms; gaps between bars are the bubble."""
    from matplotlib.patches import Patch

    step_ms = ms(timeline.step_s) or 1.0
    px_per_ms = axes_px / step_ms
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for task in timeline.tasks:
        local = task.chunk // timeline.num_ranks
        colour = _COLOURS[task.kind][local % 2]
        start, width = ms(task.start_s), ms(task.end_s - task.start_s)
        bars.setdefault((task.rank, colour), []).append((start, width))
        label = str(task.microbatch)
        if width * px_per_ms >= _LABEL_PX_PER_CHAR * (len(label) + 1):
            ax.text(start + width / 2, task.rank, label, ha="center", va="center", fontsize=7,
                    color="white" if local % 2 == 0 else "black")
    edge = 0.3 if len(timeline.tasks) * _MIN_EDGE_PX <= axes_px * timeline.num_ranks else 0.0
    for (rank, colour), spans in bars.items():
        ax.broken_barh(spans, (rank - 0.4, 0.8), facecolors=colour, edgecolors="white", linewidth=edge)
    busy = sum(timeline.busy_s())
    idle = 1.0 - busy / (timeline.num_ranks * timeline.step_s) if timeline.step_s else 0.0
    ax.set_xlim(0, step_ms)
    ax.set_ylim(timeline.num_ranks - 0.5, -0.5)
    ticks = _ticks(timeline.num_ranks)
    ax.set_yticks(ticks, [f"pp rank {r}" for r in ticks])
    ax.set_xlabel("time (ms)")
    ax.set_title(f"pipeline step {step_ms:.1f} ms, idle (bubble) {idle:.1%} of rank time", fontsize=10)
    handles = [Patch(color=_COLOURS["F"][0], label="forward"),
               Patch(color=_COLOURS["B"][0], label="backward")]
    if any(task.chunk >= timeline.num_ranks for task in timeline.tasks):
        handles += [Patch(color=_COLOURS["F"][1], label="forward, odd local chunk"),
                    Patch(color=_COLOURS["B"][1], label="backward, odd local chunk")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              title="numbers: micro-batch", title_fontsize=8)


def _draw_memory(ax, parts: Mapping[str, Sequence[float]], capacity_bytes: float, num_ranks: int) -> None:
    """Stacked bars per rank in GiB, with the device capacity as a line."""
    ranks = list(range(num_ranks))
    base = [0.0] * num_ranks
    for index, (name, values) in enumerate(parts.items()):
        heights = [gib(v) for v in values]
        ax.bar(ranks, heights, bottom=base, label=name, color=_PART_COLOURS[index % len(_PART_COLOURS)])
        base = [b + h for b, h in zip(base, heights)]
    ax.axhline(gib(capacity_bytes), color="black", linestyle="--", linewidth=1,
               label=f"capacity {gib(capacity_bytes):.1f} GiB")
    ax.set_xticks(_ticks(num_ranks))
    ax.set_xlabel("pipeline rank")
    ax.set_ylabel("memory (GiB)")
    ax.set_ylim(0, max(base + [gib(capacity_bytes)]) * 1.15)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


def _ticks(num_ranks: int) -> list[int]:
    """At most about _MAX_TICKS rank labels, always including rank 0."""
    return list(range(0, num_ranks, -(-num_ranks // _MAX_TICKS)))
