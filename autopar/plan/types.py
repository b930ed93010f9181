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

PLAN_FORMAT_VERSION = 1


class Schedule(str, enum.Enum):
    """Pipeline schedules, named as torch.distributed.pipelining's classes."""

    GPIPE = "gpipe"  # ScheduleGPipe
    ONE_F_ONE_B = "1f1b"  # Schedule1F1B (PipeDream-Flush)
    INTERLEAVED_1F1B = "interleaved_1f1b"  # ScheduleInterleaved1F1B


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
            f"{sched} recompute={layout.recompute.value} zero{layout.zero_stage}")


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
    """0: replicated optimizer; 1: optimizer state sharded over dp; 3: FSDP (all sharded)."""
    sequence_parallel: bool
    stages: tuple[StagePlan, ...]
    global_batch_size: int
    """Sequences per step over the whole cluster."""
    seq_len: int
    model: str = ""
    tp_inter_node: bool = False
    """TP group spans nodes (only when the user asks for it)."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "num_microbatches", "virtual_stages",
                     "global_batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AutoparError(f"plan field {name}={value!r} must be a positive integer")
        if self.zero_stage not in (0, 1, 3):
            raise AutoparError(f"plan zero_stage={self.zero_stage!r}; use 0, 1 or 3")
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
        if version != PLAN_FORMAT_VERSION:
            raise AutoparError(f"plan format_version={version!r}; this autopar reads {PLAN_FORMAT_VERSION}")
        try:
            data["schedule"] = Schedule(data["schedule"])
            data["recompute"] = Recompute(data["recompute"])
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
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "virtual_stages"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise AutoparError(f"--{name.replace('_', '-')} {value!r}: must be a positive integer")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 3):
            raise AutoparError(f"--zero {self.zero_stage!r}: use 0, 1 or 3")
