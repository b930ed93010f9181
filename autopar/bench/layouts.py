"""Which layouts ``autopar bench`` runs: autopar's choice, the search's top k, pinned ones, plain DDP.

Layouts are planned here as ``autopar explain`` plans them (autopar.launch.launch_cluster, the analytic
profile, the search) and handed to the workers as the one line's options: every plan field pinned, so
the executor plans the same layout (the worker reports the digest it ran; autopar.bench.run says when it
differs). The prediction set beside each measurement is the cost model's on the executor's own plan and
cluster, computed in the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autopar.errors import AutoparError
from autopar.launch import Launch, launch_cluster
from autopar.plan.types import Pins, Plan, Precision, Schedule
from autopar.profile.types import Recompute

KEY_ALIASES = {"mb": "micro_batch_size", "micro_batch": "micro_batch_size", "zero": "zero_stage",
               "v": "virtual_stages", "sp": "sequence_parallel"}
"""Short names a ``--layout`` may use for the one line's option names."""
INT_KEYS = ("dp", "tp", "pp", "micro_batch_size", "virtual_stages", "zero_stage")
TEXT_KEYS = ("schedule", "recompute")


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One row of the benchmark."""

    name: str
    """``autopar`` (its own choice), ``top 2`` .. (the search's next best), ``pinned ...``, ``ddp``."""
    kind: str
    """``chosen``, ``top``, ``pinned`` or ``ddp``."""
    options: dict = field(default_factory=dict)
    """Options for ``enable_advanced_parallelization`` (the pins); empty for the baseline."""
    planned: str | None = None
    """The layout as the driver planned it (``Plan.describe``), for the worker's to be checked against."""

    def to_spec(self) -> dict:
        return {"name": self.name, "kind": self.kind, "options": self.options, "planned": self.planned}


def parse_layout(text: str) -> dict:
    """``"dp=2 tp=2 mb=4 schedule=1f1b"`` (spaces or commas) as the one line's options.

    Raises:
        AutoparError: a token that is not ``key=value`` of a pinnable option, or a bad value.
    """
    from autopar.execute.options import ParallelOptions

    out: dict = {}
    for token in text.replace(",", " ").split():
        key, sep, value = token.partition("=")
        key = KEY_ALIASES.get(key, key)
        if not sep or key not in (*INT_KEYS, *TEXT_KEYS, "sequence_parallel"):
            raise AutoparError(f"--layout {text!r}: {token!r} is not key=value of a pin; use e.g. "
                               "'dp=2 tp=2 mb=4 schedule=1f1b zero=3' (keys: " + ", ".join(
                                   [*INT_KEYS, *TEXT_KEYS, "sequence_parallel", *KEY_ALIASES]) + ")")
        if key in INT_KEYS:
            if not value.isdigit():
                raise AutoparError(f"--layout {text!r}: {key}={value!r} must be a whole number")
            out[key] = int(value)
        elif key == "sequence_parallel":
            if value.lower() not in ("true", "false", "1", "0", "on", "off"):
                raise AutoparError(f"--layout {text!r}: sequence_parallel={value!r}: use true or false")
            out[key] = value.lower() in ("true", "1", "on")
        else:
            out[key] = value
    if not out:
        raise AutoparError(f"--layout {text!r}: give at least one pin, e.g. 'tp=2 pp=2'")
    ParallelOptions(**out)  # the executor's own checks of each value
    return out


def plan_options(plan: Plan) -> dict:
    """Every field of ``plan`` the one line can pin, so the executor plans that very layout."""
    return {"dp": plan.dp, "tp": plan.tp, "pp": plan.pp, "micro_batch_size": plan.micro_batch_size,
            "virtual_stages": plan.virtual_stages, "schedule": plan.schedule.value,
            "recompute": plan.recompute.value, "zero_stage": plan.zero_stage,
            "sequence_parallel": plan.sequence_parallel}


def _pins(options: dict) -> Pins:
    return Pins(dp=options.get("dp"), tp=options.get("tp"), pp=options.get("pp"),
                micro_batch_size=options.get("micro_batch_size"), virtual_stages=options.get("virtual_stages"),
                schedule=Schedule(options["schedule"]) if "schedule" in options else None,
                recompute=Recompute(options["recompute"]) if "recompute" in options else None,
                zero_stage=options.get("zero_stage"), sequence_parallel=options.get("sequence_parallel"))


@dataclass(frozen=True, kw_only=True)
class Job:
    """The run every layout shares: the model, the batch, the launch."""

    arch: object
    """autopar.profile.config.ArchConfig of the model."""
    world_size: int
    ranks_per_node: int
    global_batch: int
    seq_len: int
    precision: Precision
    cluster: str | None = None
    """The cluster preset or JSON the executor plans for (None: the detected machine)."""
    device_type: str = "cpu"
    device: object = None
    """The detected GPU (autopar.cluster.DeviceSpec) when ``cluster`` is None and the job runs on CUDA."""
    memory_headroom: float = 0.1

    def planner(self, pins: Pins | None = None):
        """(cluster, planning, profile) as the executor would plan this job."""
        from autopar.profile.analytic import profile_analytic

        launch = Launch(world_size=self.world_size, ranks_per_node=self.ranks_per_node, cluster=self.cluster,
                        device=self.device, device_type=self.device_type, memory_headroom=self.memory_headroom,
                        dtype_bytes=2 if self.precision is Precision.BF16 else 4, precision=self.precision,
                        model_type=self.arch.model_type)
        spec, planning = launch_cluster(launch, pins)
        profile = profile_analytic(self.arch, seq_len=self.seq_len, dtype_bytes=planning.dtype_bytes,
                                   attention="sdpa" if self.arch.sdpa else "eager",
                                   device_type=planning.device_type)
        return spec, planning, profile


def choose_layouts(job: Job, *, top: int = 1, pinned: list[dict] = (), chosen: bool = True,
                   baseline: bool = True) -> list[Layout]:
    """The layouts to bench: autopar's choice (the executor plans it itself), the next ``top - 1`` by
    predicted step time (:func:`top_plans`, the choice left out), each pinned layout, and the plain-DDP
    baseline."""
    from autopar.plan.search import search

    spec, planning, profile = job.planner()
    precision = {"precision": job.precision.value}
    out = []
    best = search(profile, spec, global_batch_size=job.global_batch, pins=planning.pins, alternatives=False)
    if chosen:
        out.append(Layout(name="autopar", kind="chosen", options=dict(precision),
                          planned=best.best.plan.describe()))
    chosen_layout = best.best.plan.describe()  # the search may prefer a robust plan to the fastest
    others = [p for p in top_plans(job, top) if p.describe() != chosen_layout][:top - 1]
    for i, plan in enumerate(others, start=2):
        out.append(Layout(name=f"top {i}", kind="top", options=plan_options(plan) | precision,
                          planned=plan.describe()))
    for options in pinned:
        _, planning_p, _ = job.planner(_pins(options))
        try:
            plan = search(profile, spec, global_batch_size=job.global_batch, pins=planning_p.pins,
                          alternatives=False).best.plan
        except AutoparError as err:
            raise AutoparError(f"--layout {_text(options)}: {err}") from None
        out.append(Layout(name="pinned " + _text(options), kind="pinned", options=options | precision,
                          planned=plan.describe()))
    if baseline:
        out.append(Layout(name="ddp", kind="ddp"))
    return out


def _text(options: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items())


def top_plans(job: Job, k: int) -> list[Plan]:
    """The ``k`` fastest layouts that fit by predicted step time, every candidate of the search space costed
    (small worlds: a few hundred candidates), ties broken by the search's own order."""
    from autopar.plan.search import Planner
    from autopar.plan.space import enumerate_candidates

    spec, planning, profile = job.planner()
    planner = Planner(profile, spec, global_batch_size=job.global_batch, pins=planning.pins)
    ranked = []
    for cand in enumerate_candidates(profile, spec, global_batch_size=job.global_batch, pins=planning.pins):
        ev = planner.evaluate(cand)
        if ev is not None and ev.cost.fits:
            ranked.append((ev.cost.step_time_s, cand, ev.plan))
    ranked.sort(key=lambda x: (x[0], x[1]))
    plans, seen = [], set()
    for _, _, plan in ranked:
        if plan.describe() not in seen:
            seen.add(plan.describe())
            plans.append(plan)
        if len(plans) == k:
            break
    return plans
