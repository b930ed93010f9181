"""Choosing among plans the cost model cannot tell apart: the robust plan, then the tie rule.

[Note: robust choice]
The search (autopar.plan.search) finds the fastest predicted plan. Every plan that fits and is
predicted within ``MODEL_ERROR`` of it (the model's stated error, autopar.cost.constants) is as fast
as the model can tell, and among those the planner takes, in this order:

1. the fewest risks, each priced by what the step loses if it goes wrong:
   - a near-perfect overlap: the plan must hide at least 1 - MODEL_ERROR of its data-parallel
     traffic, and the hidden traffic is at least OVERLAP_RELIANCE of its step (priced by the cost
     model's own ``overlap_dp_comm=False``: the step with no overlap). A smaller reliance is printed
     with its price but does not count;
   - memory near the limit: its peak is within MEMORY_MODEL_ERROR of the planned capacity;
2. the smallest model-parallel size, tensor x pipeline degree: "a total model-parallel size of M = t.p should
   be used so that the model's parameters and intermediate metadata fit in GPU memory; data parallelism can be
   used to scale up training to more GPUs" (Narayanan et al. 2021, SC'21, section 3.3, takeaway 2). Each
   model-parallel dimension adds what the model prices least surely (the schedule's bubble and its per-action
   cost, the stage balance, point-to-point sends, TP's exposed collectives, a tied embedding summed across
   stages); data parallelism alone adds one collective the step can hide. On 4 CPU ranks a dp2 x pp2 pipeline
   predicted 2% faster than dp4 measured 15-20% slower (2026-12-01, docs/bench.md);
3. the fewest operations: layer passes per GPU per step, m x layers per pipeline rank x passes
   (forward and backward; full recomputation runs the forward again). With the world and the batch
   fixed every layout does the same FLOPs per GPU, so fewer passes are larger ones (bigger
   micro-batches, fewer micro-batches per rank). The model prices a FLOP alike in any size of
   matmul; real kernels, launches and per-micro-batch collectives do not (issue 10: a tie that went
   to the smallest micro-batch, one FSDP all-gather per micro-batch, ran 1.5x slower);
4. the least communication per step: TP (of the pipeline rank with the most), pipeline sends and
   data-parallel traffic, hidden or not (interleaving's extra sends lose here to one chunk per rank);
5. the faster prediction, then the candidate's field order (determinism).

The window is scanned in order of model-parallel size, then operations; once a plan without risks is held, no
plan later in that order can win, and the scan stops. ``explain`` prints why the plan is not the fastest predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from autopar.cost import constants as C
from autopar.cost.model import estimate_from_costs
from autopar.profile.types import Recompute

OVERLAP_RELIANCE = 0.5
"""Hidden data-parallel traffic, as a share of the predicted step, past which a plan relies on its overlap:
the step without overlap is then 1.5x the prediction or more, so the prediction rests on the overlap
model more than on anything else it prices. A judgement, not a fit: issue 10's example hides 81% of its
step (13.8 s of traffic in a 16.9 s step); FSDP hiding a fifth of a step on one node's NVLink is the common,
trusted case."""


@dataclass(frozen=True, kw_only=True)
class Judged:
    """A plan with what it relies on and the tie rule's measures ([Note: robust choice])."""

    evaluated: object
    """The autopar.plan.search.Evaluated plan."""
    no_overlap_step_s: float
    """The predicted step if no data-parallel communication overlapped compute."""
    dp_traffic_s: float
    """Data-parallel communication per step, hidden or not."""
    memory_share: float
    """Worst rank's predicted peak over its planned capacity."""
    model_parallel: int
    """Tensor x pipeline degree: the GPUs one copy of the model is split over."""
    operations: float
    """Layer passes per GPU per step."""
    communication_s: float
    """TP, pipeline and data-parallel communication per step, hidden or not."""

    @property
    def step_s(self) -> float:
        return self.evaluated.cost.step_time_s

    @property
    def hidden_s(self) -> float:
        """Data-parallel traffic the prediction hides behind compute."""
        return max(0.0, self.no_overlap_step_s - self.step_s)

    @property
    def overlap_share(self) -> float:
        """Share of the data-parallel traffic that must stay hidden for the predicted step."""
        return min(1.0, self.hidden_s / self.dp_traffic_s) if self.dp_traffic_s > 0 else 0.0

    @property
    def window_s(self) -> float:
        """The compute the traffic hides behind: the step with no data-parallel traffic at all."""
        return max(0.0, self.no_overlap_step_s - self.dp_traffic_s)

    def reliance(self) -> str | None:
        """The overlap the prediction relies on, priced, when it moves the step by more than the model's error."""
        if self.hidden_s < C.MODEL_ERROR * self.step_s:
            return None
        return (f"hides {self.overlap_share:.1%} of its {_fmt_s(self.dp_traffic_s)} of data-parallel traffic per "
                f"step behind {_fmt_s(self.window_s)} of compute ({_fmt_s(self.no_overlap_step_s)} per step if "
                "none is hidden)")

    def risks(self) -> dict[str, str]:
        """What the predicted step relies on that the model's own error can undo ([Note: robust choice] 1)."""
        out = {}
        error = C.MODEL_ERROR
        if self.overlap_share >= 1 - error and self.hidden_s >= OVERLAP_RELIANCE * self.step_s:
            out["overlap"] = self.reliance()
        if self.memory_share > 1 - C.MEMORY_MODEL_ERROR:
            out["memory"] = (f"uses {self.memory_share:.1%} of the planned memory (the memory model's error is "
                             f"{C.MEMORY_MODEL_ERROR:.0%})")
        return out

    def key(self) -> tuple:
        return (len(self.risks()), self.model_parallel, self.operations, self.communication_s, self.step_s,
                self.evaluated.candidate)


def model_parallel(cand) -> int:
    """Tensor x pipeline degree: the GPUs one copy of the model is split over ([Note: robust choice] 2)."""
    return cand.tp * cand.pp


def operations(cand, num_layers: int) -> float:
    """Layer passes per GPU per step: m x layers per pipeline rank x (2, or 3 under full recomputation)."""
    passes = 3 if cand.recompute is Recompute.FULL else 2
    return cand.num_microbatches * num_layers / cand.pp * passes


def judge(planner, ev) -> Judged:
    """Price what ``ev`` relies on with the cost model's own terms (the step with no overlap)."""
    plan, t = ev.plan, planner.totals(ev.candidate.tp, ev.candidate.sequence_parallel, ev.candidate.recompute)
    bounds = [*ev.split.boundaries, len(planner.names)]
    ranges = [range(a, b) for a, b in zip(bounds, bounds[1:])]
    if planner.opts.overlap_dp_comm:
        bare = estimate_from_costs(t.costs, ranges, planner.profile, planner.cluster, plan,
                                   replace(planner.opts, overlap_dp_comm=False))
        no_overlap_s, traffic_s = bare.step_time_s, bare.dp_comm_s
    else:
        no_overlap_s, traffic_s = ev.cost.step_time_s, ev.cost.dp_comm_s
    cost = ev.cost
    # TP traffic of the rank that has the most, not of the step's bottleneck rank: a pipeline whose
    # bottleneck is the LM head's stage would otherwise count none of its blocks' TP collectives.
    tp_s = plan.num_microbatches * max(s.tp_comm_s for s in cost.stages)
    return Judged(evaluated=ev, no_overlap_step_s=no_overlap_s, dp_traffic_s=traffic_s,
                  memory_share=max(s.peak_bytes / s.capacity_bytes for s in cost.stages),
                  model_parallel=model_parallel(ev.candidate),
                  operations=operations(ev.candidate, len(planner.names)),
                  communication_s=tp_s + cost.pp_comm_s + traffic_s)


def window_limit(fastest_s: float) -> float:
    """The slowest predicted step the model cannot tell from ``fastest_s``."""
    return fastest_s * (1 + C.MODEL_ERROR)


def choose_robust(planner, ordered: list, fastest, capacity: float, progress=None) -> tuple[Judged, Judged, int]:
    """(chosen, fastest, plans costed) over the window of ``fastest``: [Note: robust choice].

    Args:
        planner: the autopar.plan.search.Planner of the search.
        ordered: (time bound, memory bound, candidate) of every candidate.
        fastest: the search's fastest predicted plan that fits.
        capacity: device memory the plans are planned for.
        progress: an autopar.plan.progress.SearchProgress, or None.
    """
    limit = window_limit(fastest.cost.step_time_s)
    risky_memory = (1 - C.MEMORY_MODEL_ERROR) * capacity
    best = quickest = judge(planner, fastest)
    layers = len(planner.names)
    window = sorted(((model_parallel(c), operations(c, layers)), lb, mem, i, c)
                    for i, (lb, mem, c) in enumerate(ordered) if lb <= limit and mem <= capacity)
    costed = 0
    for done, (order, time_lb, mem_lb, _, cand) in enumerate(window):
        if progress is not None:
            progress.step("plans inside the model's error", done, len(window), best.step_s)
        best_risks = len(best.risks())
        if not best_risks and order > (best.model_parallel, best.operations):
            break  # every later plan splits the model more, or as much with more operations, and has no fewer risks
        if cand == fastest.candidate or (not best_risks and mem_lb > risky_memory):
            continue  # near the memory limit for sure: cannot beat a plan without risks
        if planner.step_bound(cand, time_lb) > limit:
            continue
        if cand.pp > 1:
            memory = planner.memory_bound(cand)
            if memory > capacity or (not best_risks and memory > risky_memory):
                continue
            if cand.virtual_stages == 1 and planner.split_bound(cand) > limit:
                continue
        ev = planner.evaluate(cand, prune_above=math.nextafter(limit, math.inf))
        if ev is None or not ev.cost.fits or ev.cost.step_time_s > limit:
            continue
        costed += 1
        judged = judge(planner, ev)
        if judged.key() < best.key():
            best = judged
    return best, quickest, costed


def losing_risk(chosen: Judged, other: Judged) -> str:
    """What ``other`` (predicted faster within the model's error) does that ``chosen`` does not: the risk or the
    tie rule that decided ([Note: robust choice]), as "that plan ..." would end."""
    extra = [phrase for kind, phrase in other.risks().items() if kind not in chosen.risks()]
    if extra:
        return " and ".join(extra)
    if chosen.model_parallel < other.model_parallel:
        return (f"splits the model over more GPUs (tensor x pipeline {other.model_parallel} vs "
                f"{chosen.model_parallel}: data parallelism first, model parallelism only as far as memory needs)")
    if chosen.operations < other.operations:
        return (f"runs more, smaller operations ({other.operations:,.0f} layer passes per GPU per step vs "
                f"{chosen.operations:,.0f})")
    return f"communicates more ({_fmt_s(other.communication_s)} per step vs {_fmt_s(chosen.communication_s)})"


def robust_reason(chosen: Judged, fastest: Judged) -> str | None:
    """The one line `explain` prints when ``chosen`` is not the fastest predicted plan; None when it is."""
    if chosen.evaluated.candidate == fastest.evaluated.candidate or fastest.step_s >= chosen.step_s:
        return None
    mine = chosen.evaluated.plan.describe().split()
    other = " ".join(token for token in fastest.evaluated.plan.describe().split() if token not in mine)
    return (f"chose this plan over the layout with {other} (predicted "
            f"{1 - fastest.step_s / chosen.step_s:.1%} faster, inside the model's {C.MODEL_ERROR:.0%} error) "
            f"because that plan {losing_risk(chosen, fastest)}")


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
