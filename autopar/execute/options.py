"""The options of the one line: hints and pins, checked before anything is built."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from autopar import schema
from autopar.errors import AutoparError
from autopar.launch import DEFAULT_MEMORY_HEADROOM
from autopar.plan.types import Pins, Precision, Schedule, zero_stage_problem
from autopar.profile.types import Recompute

OPTIONS_ENV = "AUTOPAR_OPTIONS"
"""Environment variable holding a JSON object of options that override the call's."""

DEFAULT_SEQ_LEN = 2048
"""Sequence length the layout is planned for when no hint is given (capped by the model's context)."""


_INT_BOUNDS = {"global_batch_size": schema.MAX_BATCH, "seq_len": schema.MAX_SEQ, "dp": schema.MAX_GPUS,
               "tp": schema.MAX_GPUS, "pp": schema.MAX_LAYERS, "micro_batch_size": schema.MAX_BATCH,
               "virtual_stages": schema.MAX_LAYERS}
"""Upper bounds of the integer options, the same as ``autopar explain``'s (autopar/schema.py says why)."""


@dataclass(frozen=True, kw_only=True)
class ParallelOptions:
    """``autopar.enable_advanced_parallelization(**options)`` / ``autopar.parallelize(model, **options)``.

    Every field is optional. Hints say what the first batch will look like so
    the layout is planned right before the optimizer exists; pins fix a choice
    of the planner (the same names as ``autopar explain``'s flags).
    """

    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks (default: one per rank)."""
    seq_len: int | None = None
    """Tokens per sequence (default: 2048, capped by the model's context)."""
    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    micro_batch_size: int | None = None
    virtual_stages: int | None = None
    schedule: str | None = None
    """``gpipe``, ``1f1b`` or ``interleaved_1f1b``."""
    recompute: str | None = None
    """``none``, ``selective`` or ``full``."""
    zero_stage: int | None = None
    """0 (replicated, gradients all-reduced), 2 or 3 (FSDP2; docs/executor.md#zero-stages)."""
    sequence_parallel: bool | None = None
    """Split the activations between the tensor-parallel regions over the sequence (default: on wherever
    tp > 1 and the family supports it; docs/executor.md#sequence-and-loss-parallelism)."""
    precision: str | None = None
    """``fp32``, ``bf16`` or ``bf16_mixed``; None: the dtype the model is built in (float32 -> fp32,
    bfloat16 -> bf16). ``bf16_mixed`` needs a float32 model (docs/executor.md#precision)."""
    memory_headroom: float = DEFAULT_MEMORY_HEADROOM
    """Fraction of each device's memory the plan leaves free (0 <= headroom < 1; explain's default too)."""
    cluster: str | None = None
    """A cluster preset or JSON file to plan for instead of the detected one (docs/clusters.md)."""
    log_every: int = 10
    """Log step statistics on rank 0 every this many steps (and the first); 0 turns it off."""
    check_batch: bool = True
    """Check every call that the ranks' batches form one global batch (docs/executor.md#data); False trusts
    that every rank passes the same global batch and skips the check's one small all-gather."""
    data: str = "auto"
    """What a batch is: ``auto`` (the same batch on every rank is the global batch; different batches are
    shards of it only where a rank-aware loader such as DistributedSampler is alive, else an error),
    ``global`` (every rank must pass the same batch) or ``sharded`` (each rank's batch is its shard; the
    shards are joined in rank order)."""
    own_loss: bool = False
    """Hint: the script computes its loss from ``outputs.logits`` (no labels). The plan then has no
    pipeline stages, runs each rank's rows as one micro-batch and prices the global batch's logits on
    every device (docs/executor.md#your-own-loss)."""
    loss_fn: Callable | None = None
    """``loss_fn(logits, labels) -> sum of token losses`` used instead of transformers' loss when labels are
    passed (runs on the last pipeline stage); autopar divides by the global count of ``labels != -100``."""

    def __post_init__(self) -> None:
        for name, most in _INT_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
                raise AutoparError(f"autopar option {name}={value!r}: use a whole number from 1 to {most:,} "
                                   "(or leave it out to let autopar choose)")
        for name in ("check_batch",):
            if not isinstance(getattr(self, name), bool):
                raise AutoparError(f"autopar option {name}={getattr(self, name)!r}: use True or False")
        if self.sequence_parallel is not None and not isinstance(self.sequence_parallel, bool):
            raise AutoparError(f"autopar option sequence_parallel={self.sequence_parallel!r}: use True or False "
                               "(or leave it out to let autopar choose)")
        if self.cluster is not None and not isinstance(self.cluster, str):
            raise AutoparError(f"autopar option cluster={self.cluster!r}: use a preset name or a JSON file path")
        if self.schedule is not None and self.schedule not in {s.value for s in Schedule}:
            raise AutoparError(f"autopar option schedule={self.schedule!r}: use one of "
                               f"{', '.join(s.value for s in Schedule)}")
        if self.recompute is not None and self.recompute not in {r.value for r in Recompute}:
            raise AutoparError(f"autopar option recompute={self.recompute!r}: use none, selective or full")
        problem = zero_stage_problem(self.zero_stage) if self.zero_stage is not None else None
        if problem:
            raise AutoparError(f"autopar option zero_stage={self.zero_stage!r}: {problem}")
        if self.precision is not None and self.precision not in {p.value for p in Precision}:
            raise AutoparError(f"autopar option precision={self.precision!r}: use one of "
                               f"{', '.join(p.value for p in Precision)} (or leave it out: the model's dtype)")
        if not isinstance(self.memory_headroom, (int, float)) or not 0 <= self.memory_headroom < 1:
            raise AutoparError(f"autopar option memory_headroom={self.memory_headroom!r}: use a fraction in [0, 1)")
        if self.data not in ("auto", "global", "sharded"):
            raise AutoparError(f"autopar option data={self.data!r}: use 'auto', 'global' or 'sharded'")
        if not isinstance(self.own_loss, bool):
            raise AutoparError(f"autopar option own_loss={self.own_loss!r}: use True or False")
        if self.own_loss and self.pp not in (None, 1):
            raise AutoparError(f"autopar options own_loss=True and pp={self.pp}: the logits of a pipeline exist "
                               "only on its last stage; drop pp, or pass loss_fn= (run on the last stage) instead "
                               "of own_loss")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise AutoparError(f"autopar option loss_fn={self.loss_fn!r} is not callable; pass a function "
                               "f(logits, labels) returning the sum of token losses")
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every < 0:
            raise AutoparError(f"autopar option log_every={self.log_every!r}: use 0 (off) or a positive integer")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> ParallelOptions:
        """The call's options, overridden by the JSON object in ``$AUTOPAR_OPTIONS`` if set
        (to launch one script under several layouts without editing it)."""
        raw = os.environ.get(OPTIONS_ENV)
        if raw:
            try:
                extra = json.loads(raw)
            except json.JSONDecodeError as err:
                raise AutoparError(f"{OPTIONS_ENV}={raw!r} is not JSON ({err}); use e.g. '{{\"tp\": 2}}'") from None
            if not isinstance(extra, dict):
                raise AutoparError(f"{OPTIONS_ENV}={raw!r}: expected a JSON object of options")
            kwargs = {**kwargs, **extra}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise AutoparError(f"unknown autopar option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def pins(self) -> Pins:
        """The planner's pins (what the executor cannot run is pinned off by ``autopar.launch.capabilities_pins``)."""
        return Pins(dp=self.dp, tp=self.tp, pp=1 if self.own_loss else self.pp,
                    micro_batch_size=self.micro_batch_size, single_microbatch=self.own_loss,
                    virtual_stages=self.virtual_stages,
                    schedule=Schedule(self.schedule) if self.schedule else None,
                    recompute=Recompute(self.recompute) if self.recompute else None,
                    zero_stage=self.zero_stage, sequence_parallel=self.sequence_parallel)

    def to_json(self) -> str:
        """The options as JSON (every rank's must agree); a loss function by its qualified name."""
        data = asdict(self)
        fn = data.pop("loss_fn")
        data["loss_fn"] = None if fn is None else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
        return json.dumps(data, sort_keys=True)
