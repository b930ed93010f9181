"""Why the other layouts lost: the best layout found for every other value of each choice.

After the search (autopar.plan.search) finds the plan, `explain` shows, for
each of tp, pp, schedule, recompute, ZeRO stage and micro-batch size, the
best layout with another value and the term that made it lose.
"""

from __future__ import annotations

from autopar.cost import constants as C
from autopar.plan.robust import judge, losing_risk
from autopar.plan.search import Alternative, Evaluated, Planner, scan_candidates
from autopar.plan.space import Candidate

ALTERNATIVE_DIMENSIONS = ("tp", "pp", "schedule", "recompute", "zero_stage", "micro_batch_size")
"""The choices `explain` shows the best alternative for, one per other value."""

EXACT_EVALS_PER_ALTERNATIVE = 2
"""Exact costings spent on each alternative group after the main search once
one of them fits (up to twice as many while none fits); the alternative
shown is the best found so, the main search's own result being exactly
optimal."""


def _value(cand: Candidate, dim: str) -> str:
    value = getattr(cand, dim)
    return value.value if hasattr(value, "value") else str(value)


_TERM_LABELS = {"compute_s": "compute", "tp_comm_s": "TP communication", "pp_comm_s": "pipeline sends",
                "dp_comm_s": "data-parallel communication", "bubble_s": "pipeline bubble",
                "optimizer_s": "optimizer step"}


def explain_loss(alt: Evaluated, best: Evaluated, planner: Planner | None = None) -> str:
    """Why ``alt`` lost to ``best``, in one phrase; with ``planner``, a faster ``alt`` (inside the model's error)
    is told by the robust choice's rule (autopar.plan.robust [Note: robust choice])."""
    gib = 1024**3
    if not alt.cost.fits:
        worst = max(alt.cost.stages, key=lambda s: s.peak_bytes)
        return (f"needs {worst.peak_bytes / gib:.1f} GiB per GPU, device has "
                f"{worst.capacity_bytes / gib:.0f} GiB")
    a, b = alt.cost.breakdown(), best.cost.breakdown()
    term = max(a, key=lambda k: (a[k] - b[k], k))
    ratio = alt.cost.step_time_s / best.cost.step_time_s
    share = a[term] / alt.cost.step_time_s
    if ratio <= 1.0 + 1e-9:
        chosen, other = (judge(planner, best), judge(planner, alt)) if planner is not None else (None, None)
        if chosen is None or chosen.key()[:3] == other.key()[:3]:
            return f"as fast ({ratio:.3f}x); the tie goes to the earlier layout in the fixed order"
        lead = (f"predicted {1 - ratio:.1%} faster, inside the model's {C.MODEL_ERROR:.0%} error"
                if ratio < 1.0 - 1e-9 else f"as fast ({ratio:.3f}x)")
        return f"{lead}, but it {losing_risk(chosen, other)}"
    delta = a[term] - b[term]
    grown = f"{delta * 1e3:.0f} ms" if delta < 1 else f"{delta:.2f} s"
    return (f"{ratio:.2f}x slower, {_TERM_LABELS[term]} +{grown} "
            f"({share:.0%} of its step vs {b[term] / best.cost.step_time_s:.0%})")


def best_alternatives(planner: Planner, ordered: list, best: Evaluated, capacity: float,
                      progress=None) -> tuple[Alternative, ...]:
    """The best layout found for every other value of each dimension."""
    out = []
    for dim in ALTERNATIVE_DIMENSIONS:
        groups: dict[str, list] = {}
        for item in ordered:
            groups.setdefault(_value(item[2], dim), []).append(item)
        for value in sorted(groups, key=lambda v: (len(v), v)):
            if value == _value(best.candidate, dim):
                continue
            fit, over, _, _, _ = scan_candidates(planner, groups[value], capacity, budget=EXACT_EVALS_PER_ALTERNATIVE,
                                                 progress=progress, phase=f"alternatives with {dim}={value}")
            ev = fit or over or planner.evaluate(min(groups[value], key=lambda x: (x[1], x[2]))[2])
            out.append(Alternative(dimension=dim, value=value, evaluated=ev, reason=explain_loss(ev, best, planner)))
    return tuple(out)


