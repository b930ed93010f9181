"""The plan: what the planner decides and the executor applies.

Small frozen dataclasses with a versioned JSON round-trip (docs/plan-format.md).
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from autopar.errors import AutoparError
from autopar.profile.types import Recompute

PLAN_FORMAT_VERSION = 2
"""2 added ``precision`` and replaced ZeRO stage 1 by 2; version 1 is still read (:meth:`Plan.from_dict`)."""

ZERO_STAGES = (0, 2, 3)
"""ZeRO stages autopar plans and runs ([Note: ZeRO stages as run] in autopar/cost/data_parallel.py): 0 replicated
(torch's composable ``replicate``), 2 and 3 FSDP2 ``fully_shard`` without and with resharding after forward."""


def zero_stage_problem(value) -> str | None:
    """Why ``value`` is not a ZeRO stage autopar runs (the fix included), or None if it is one."""
    if isinstance(value, int) and not isinstance(value, bool) and value in ZERO_STAGES:
        return None
    if value == 1 and not isinstance(value, bool):
        return ("use 0, 2 or 3: ZeRO-1 (optimizer state sharded alone) is not run, FSDP2 has no such mode short "
                "of ZeroRedundancyOptimizer, which would replace your optimizer; 2 shards it with the gradients "
                "and parameters (docs/executor.md#zero-stages)")
    return "use 0, 2 or 3"


class Precision(str, enum.Enum):
    """What parameters, gradients and optimizer state are held in, and what computes.

    Set by the user's code, never chosen by the planner: the dtype the model was built in (float32 ->
    ``fp32``, bfloat16 -> ``bf16``) or the ``precision`` option. Bytes per parameter: autopar.cost.constants
    [Note: precision].
    """

    FP32 = "fp32"
    BF16 = "bf16"  # pure: the model was built in bf16; parameters, gradients and AdamW state in bf16
    BF16_MIXED = "bf16_mixed"  # fp32 parameters and optimizer state, bf16 compute and gathers, fp32 reduction

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of what forward and backward compute in (the profile's ``dtype_bytes``)."""
        return 4 if self is Precision.FP32 else 2


def model_precision(dtype_name: str, option: str | Precision | None) -> Precision:
    """The precision a model built in ``dtype_name`` (``float32``, ``bfloat16``, ...) trains in: the
    ``precision`` option if given, else the dtype's own. Never a silent change of what the user built.

    Raises:
        AutoparError: an unknown option, a dtype no precision runs, or an option the model's dtype
            contradicts (bf16_mixed keeps fp32 master weights, so it needs a float32 model).
    """
    name = str(dtype_name).removeprefix("torch.")
    built = {"float32": Precision.FP32, "bfloat16": Precision.BF16}.get(name)
    if option is None:
        if built is None:
            raise AutoparError(f"a model built in {name}: autopar runs float32 (precision fp32), bfloat16 (bf16) "
                               "or float32 with bf16 compute (precision='bf16_mixed'); build it with "
                               "dtype=torch.float32 or torch.bfloat16")
        return built
    try:
        chosen = Precision(option)
    except ValueError:
        raise AutoparError(f"autopar option precision={option!r}: use one of "
                           f"{', '.join(p.value for p in Precision)}") from None
    needs = Precision.BF16 if chosen is Precision.BF16 else Precision.FP32
    if built is not needs:
        want = "torch.bfloat16" if needs is Precision.BF16 else "torch.float32"
        raise AutoparError(f"autopar option precision={chosen.value!r} with a model built in {name}: "
                           f"{chosen.value} keeps its parameters in {want.removeprefix('torch.')}; build the model "
                           f"with dtype={want}" + (", or drop the option to train in pure bf16"
                                                   if built is Precision.BF16 else ""))
    return chosen


def default_precision(dtype_bytes: int) -> Precision:
    """The precision a profile of ``dtype_bytes`` compute bytes is priced in when none is given: fp32 for 4,
    bf16_mixed for 2 (what ``autopar explain`` priced before plans had a precision: 16-bit compute, fp32
    optimizer state)."""
    return Precision.FP32 if dtype_bytes == 4 else Precision.BF16_MIXED


class Schedule(str, enum.Enum):
    """Pipeline schedules, named as torch.distributed.pipelining's classes."""

    GPIPE = "gpipe"  # ScheduleGPipe
    ONE_F_ONE_B = "1f1b"  # Schedule1F1B (PipeDream-Flush)
    INTERLEAVED_1F1B = "interleaved_1f1b"  # ScheduleInterleaved1F1B


def schedule_accepts(schedule: Schedule, pp: int, num_microbatches: int) -> bool:
    """Whether torch.distributed.pipelining's schedule runs ``num_microbatches`` over ``pp`` ranks.

    Schedule1F1B needs at least pp micro-batches; ScheduleInterleaved1F1B needs them to divide into its
    rounds of pp (``n_microbatches % max(1, n_microbatches // pp) == 0``); ScheduleGPipe takes any count.
    The planner's space and the executor's micro-batching both ask this.
    """
    if pp == 1:
        return True
    if schedule is Schedule.ONE_F_ONE_B:
        return num_microbatches >= pp
    if schedule is Schedule.INTERLEAVED_1F1B:
        return num_microbatches % max(1, num_microbatches // pp) == 0
    return True


class MeshAxis(str, enum.Enum):
    """Axes of the device mesh, outermost first: dp x pp x tp (TP innermost, inside a node)."""

    DP = "dp"
    PP = "pp"
    TP = "tp"


def describe_layout(layout) -> str:
    """One line for a Plan or a search Candidate (the same field names)."""
    v = layout.virtual_stages
    sched = layout.schedule.value + (f"(v={v})" if v > 1 else "")
    sp = " sp" if layout.sequence_parallel else ""
    return (f"dp{layout.dp} tp{layout.tp}{sp} pp{layout.pp} mb{layout.micro_batch_size}x{layout.num_microbatches} "
            f"{sched} recompute={layout.recompute.value} zero{layout.zero_stage} {layout.precision.value}")


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One pipeline chunk: contiguous layers run by one pipeline rank.

    With ``virtual_stages`` v > 1 there are pp * v chunks; chunk ``index`` runs
    on pipeline rank ``index % pp`` (Narayanan et al. 2021 §2.2.2, and
    torch.distributed.pipelining's loop-style stage placement).
    """

    index: int
    """Chunk index in model order."""
    layers: tuple[str, ...]
    """Module names, exactly as ``named_modules()`` spells them."""

    def to_dict(self) -> dict:
        return {"index": self.index, "layers": list(self.layers)}


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A complete parallel layout for one model, cluster and batch."""

    dp: int
    """Data-parallel degree."""
    tp: int
    """Tensor-parallel degree (kept inside a node)."""
    pp: int
    """Pipeline-parallel degree (number of pipeline ranks)."""
    micro_batch_size: int
    """Sequences per micro-batch on one data-parallel rank."""
    num_microbatches: int
    """Micro-batches per step on one data-parallel rank."""
    schedule: Schedule
    virtual_stages: int
    """Chunks per pipeline rank (interleaved schedule); 1 otherwise."""
    recompute: Recompute
    zero_stage: int
    """0: all replicated, gradients all-reduced; 2: FSDP2, parameters gathered from forward to backward;
    3: FSDP2, parameters gathered per block ([Note: ZeRO stages as run] in autopar/cost/data_parallel.py)."""
    sequence_parallel: bool
    stages: tuple[StagePlan, ...]
    global_batch_size: int
    """Sequences per step over the whole cluster."""
    seq_len: int
    model: str = ""
    tp_inter_node: bool = False
    """TP group spans nodes (only when the user asks for it)."""
    precision: Precision = Precision.BF16_MIXED
    """What parameters, gradients and optimizer state are held in (set by the user's code, not searched)."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "num_microbatches", "virtual_stages",
                     "global_batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AutoparError(f"plan field {name}={value!r} must be a positive integer")
        problem = zero_stage_problem(self.zero_stage)
        if problem:
            raise AutoparError(f"plan zero_stage={self.zero_stage!r}: {problem}")
        if not isinstance(self.precision, Precision):
            raise AutoparError(f"plan precision={self.precision!r}: use one of {[p.value for p in Precision]}")
        if self.dp * self.micro_batch_size * self.num_microbatches != self.global_batch_size:
            raise AutoparError(
                f"plan batch: dp {self.dp} x micro-batch {self.micro_batch_size} x "
                f"{self.num_microbatches} micro-batches != global batch {self.global_batch_size}"
            )
        if self.stages and len(self.stages) != self.pp * self.virtual_stages:
            raise AutoparError(
                f"plan has {len(self.stages)} stages; pp {self.pp} x virtual {self.virtual_stages} expected"
            )

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def stage_rank(self, chunk_index: int) -> int:
        """Pipeline rank that runs chunk ``chunk_index``."""
        return chunk_index % self.pp

    def describe(self) -> str:
        """One line, e.g. ``dp8 tp4 sp pp2 mb2x8 1f1b recompute=full zero1``."""
        return describe_layout(self)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["schedule"] = self.schedule.value
        data["recompute"] = self.recompute.value
        data["precision"] = self.precision.value
        data["stages"] = [s.to_dict() for s in self.stages]
        data["format_version"] = PLAN_FORMAT_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self) -> str:
        """Short hash of the plan JSON; every rank checks it agrees."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        data = dict(data)
        version = data.pop("format_version", None)
        if version == 1:
            data = _from_version_1(data)
        elif version != PLAN_FORMAT_VERSION:
            raise AutoparError(f"plan format_version={version!r}; this autopar reads 1 and {PLAN_FORMAT_VERSION}")
        try:
            data["schedule"] = Schedule(data["schedule"])
            data["recompute"] = Recompute(data["recompute"])
            data["precision"] = Precision(data["precision"])
            data["stages"] = tuple(StagePlan(index=s["index"], layers=tuple(s["layers"])) for s in data["stages"])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, AutoparError):
                raise
            raise AutoparError(f"malformed plan JSON: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise AutoparError(f"malformed plan JSON: {err}") from None

    def with_stages(self, stages: tuple[StagePlan, ...]) -> "Plan":
        return replace(self, stages=stages)


def _from_version_1(data: dict) -> dict:
    """A version-1 plan's fields as version 2 reads them (docs/plan-format.md#version-1).

    Version 1 had no precision and priced every plan with 16-bit weights and gradients and fp32 optimizer
    state (2 + 2 + 12 bytes per parameter): ``bf16_mixed`` is that recipe as autopar runs it. Its ZeRO
    stage 1 (optimizer sharded) was run as FSDP2 without resharding, which is stage 2 now.
    """
    if "precision" in data:
        raise AutoparError("malformed plan JSON: format_version 1 has no precision; say format_version 2")
    zero = data.get("zero_stage")
    return data | {"precision": Precision.BF16_MIXED.value, "zero_stage": 2 if zero == 1 else zero}


@dataclass(frozen=True, kw_only=True)
class Pins:
    """Choices the user fixed; ``None`` means search it."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    micro_batch_size: int | None = None
    virtual_stages: int | None = None
    schedule: Schedule | None = None
    recompute: Recompute | None = None
    zero_stage: int | None = None
    sequence_parallel: bool | None = None
    tp_inter_node: bool = False
    """Allow a TP group to span nodes."""
    single_microbatch: bool = False
    """Run each data-parallel rank's whole batch as one micro-batch (the user's own loss keeps every
    row's graph until its backward)."""
    precision: Precision | None = None
    """Not a choice of the planner but the user's: None prices the profile's compute dtype as
    :func:`default_precision` says."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "virtual_stages"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise AutoparError(f"--{name.replace('_', '-')} {value!r}: must be a positive integer")
        problem = zero_stage_problem(self.zero_stage) if self.zero_stage is not None else None
        if problem:
            raise AutoparError(f"--zero {self.zero_stage!r}: {problem}")
        if self.precision is not None and not isinstance(self.precision, Precision):
            raise AutoparError(f"--precision {self.precision!r}: use one of {', '.join(p.value for p in Precision)}")
