"""What the built model really runs, read back from torch's own state: one value per Plan field.

The planner prices a :class:`~autopar.plan.types.Plan`; this module reads, field by field, what the
executor built and ran, from the objects torch keeps (the device mesh, DTensor placements, FSDP2's
and DDP's state on each module, the composable checkpoint state, the pipelining schedule's class and
micro-batch count) and from a step watched with forward hooks (rows per micro-batch, micro-batches
per step, sequence length the blocks see). ``tests/test_observe.py`` walks every Plan field through
:data:`OBSERVERS`, so a field that is priced but not executed, or a new field without an observer,
fails a test.

Usage (every rank)::

    with watching(model) as seen:
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
    executed = executed_plan(model, seen)   # {field: value or NOT_APPLICABLE}
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from autopar.execute import compat
from autopar.execute.stage import inner_stage
from autopar.plan.types import MeshAxis, Plan, Schedule
from autopar.profile.types import Recompute

NOT_APPLICABLE = "n/a"
"""A field with no meaning in this layout (the schedule of a single stage, the ZeRO stage of dp=1)."""


@dataclass
class Seen:
    """What a watched step showed: the first stage's calls and the sequence length its blocks saw."""

    rows_per_call: list[int] = field(default_factory=list)
    block_seq_lens: list[int] = field(default_factory=list)
    input_seq_lens: list[int] = field(default_factory=list)


@contextlib.contextmanager
def watching(model: torch.nn.Module):
    """Record each call of this rank's first chunk (one per micro-batch) and its blocks' input lengths."""
    runtime = model._autopar
    seen = Seen()
    first = inner_stage(runtime.stages[min(runtime.stages)])
    inner = getattr(first, "blocks", None)

    def on_stage(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        seen.rows_per_call.append(int(x.shape[0]))
        seen.input_seq_lens.append(int(x.shape[1]))

    def on_block(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        local = hidden.to_local() if hasattr(hidden, "to_local") else hidden
        seen.block_seq_lens.append(int(local.shape[1]))

    hooks = [first.register_forward_pre_hook(on_stage, with_kwargs=True)]
    if inner is not None and len(inner):
        hooks.append(next(iter(inner.values())).register_forward_pre_hook(on_block, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _degrees(rt) -> dict[str, int]:
    mesh = rt.layout.mesh
    if mesh is None:
        return {a.value: 1 for a in MeshAxis}
    return dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True))


def _blocks(rt) -> list[torch.nn.Module]:
    return [b for stage in rt.stages.values() for b in getattr(inner_stage(stage), "blocks", {}).values()]


def _recompute(rt, seen) -> Recompute:
    blocks = _blocks(rt)
    if not blocks:
        return NOT_APPLICABLE
    if all(compat.is_recomputed(b) for b in blocks):
        return Recompute.FULL
    if rt.family is not None and all(compat.is_recomputed(rt.family.attention(b)) for b in blocks):
        return Recompute.SELECTIVE
    return Recompute.NONE


def _data_parallel_settings(rt) -> dict | None:
    """FSDP2's settings on the first wrapped module of this rank (a middle chunk's root holds no parameters
    of its own, its blocks do)."""
    for module in [*rt.stages.values(), *_blocks(rt)]:
        settings = compat.fsdp_settings(module)
        if settings is not None:
            return settings
    return None


def _zero_stage(rt, seen):
    stage = next(iter(rt.stages.values()))
    if compat.ddp_managed(stage):
        return 0
    settings = _data_parallel_settings(rt)
    if settings is None or settings["mesh_size"] == 1:
        return NOT_APPLICABLE  # nothing data-parallel to shard
    return 3 if settings["reshard_after_forward"] else 2


def _precision(rt, seen) -> str:
    settings = _data_parallel_settings(rt)
    if settings is not None and settings["param_dtype"] is not None:
        return f"{_dtype_name(settings['param_dtype'])}_mixed"
    dtypes = {p.dtype for p in rt.model.parameters() if p.is_floating_point()}
    return _dtype_name(dtypes.pop()) if len(dtypes) == 1 else f"mixed {sorted(map(str, dtypes))}"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _schedule(rt, seen):
    if rt.plan.pp == 1:
        return NOT_APPLICABLE
    names = {"ScheduleGPipe": Schedule.GPIPE, "Schedule1F1B": Schedule.ONE_F_ONE_B,
             "ScheduleInterleaved1F1B": Schedule.INTERLEAVED_1F1B}
    kinds = {names.get(type(s).__name__, type(s).__name__) for s in rt._schedules.values()}
    return kinds.pop() if len(kinds) == 1 else sorted(map(str, kinds))


def _microbatches(rt, seen) -> int:
    if rt.plan.pp > 1:
        counts = {s._n_microbatches for s in rt._schedules.values()}
        return counts.pop() if len(counts) == 1 else sorted(counts)
    return len(seen.rows_per_call)


def _micro_batch_size(rt, seen):
    sizes = set(seen.rows_per_call)
    return sizes.pop() if len(sizes) == 1 else sorted(sizes)


def _sequence_parallel(rt, seen) -> bool:
    if not seen.block_seq_lens or not seen.input_seq_lens:
        return NOT_APPLICABLE if rt.plan.pp > 1 and not seen.block_seq_lens else False
    if rt.plan.pp > 1 and min(rt.stages) != 0:
        return NOT_APPLICABLE  # a later stage's input is already the previous stage's output
    return min(seen.block_seq_lens) < max(seen.input_seq_lens)


def _stages(rt, seen) -> dict[int, tuple[str, ...]]:
    """Per chunk this rank runs: the blocks it holds (the plan's stage names, blocks only)."""
    family = rt.family
    if family is None:
        return NOT_APPLICABLE
    return {c: tuple(family.block_name(int(k)) for k in getattr(inner_stage(stage), "blocks", {}))
            for c, stage in rt.stages.items()}


def _tp_inter_node(rt, seen) -> bool:
    from autopar.execute.runtime import node_of_every_rank

    if rt.layout.mesh is None or rt.plan.tp == 1:
        return False
    nodes = node_of_every_rank(rt.rt)
    groups = rt.layout.mesh.mesh.reshape(-1, rt.plan.tp).tolist()
    return any(len({nodes[r] for r in g}) > 1 for g in groups)


OBSERVERS: dict[str, Callable] = {
    "dp": lambda rt, seen: _degrees(rt)[MeshAxis.DP.value],
    "tp": lambda rt, seen: _degrees(rt)[MeshAxis.TP.value],
    "pp": lambda rt, seen: _degrees(rt)[MeshAxis.PP.value],
    "micro_batch_size": _micro_batch_size,
    "num_microbatches": _microbatches,
    "schedule": _schedule,
    "virtual_stages": lambda rt, seen: len(rt.stages),
    "recompute": _recompute,
    "zero_stage": _zero_stage,
    "sequence_parallel": _sequence_parallel,
    "stages": _stages,
    "global_batch_size": lambda rt, seen: _degrees(rt)[MeshAxis.DP.value] * sum(seen.rows_per_call)
    if rt.plan.pp == 1 else _degrees(rt)[MeshAxis.DP.value] * _microbatches(rt, seen) * _micro_batch_size(rt, seen),
    "seq_len": lambda rt, seen: max(seen.input_seq_lens) if 0 in rt.stages and seen.input_seq_lens
    else NOT_APPLICABLE,  # a later stage's input may be sequence-sharded
    "model": lambda rt, seen: getattr(rt.model.config, "_name_or_path", "") or rt.model.config.model_type,
    "tp_inter_node": _tp_inter_node,
    "precision": _precision,
}
"""Plan field -> how to read what was executed (runtime, :class:`Seen`) -> value comparable to the plan's."""


def executed_plan(model: torch.nn.Module, seen: Seen) -> dict[str, object]:
    """Every observed Plan field of this rank (see the module docstring)."""
    rt = model._autopar
    return {name: read(rt, seen) for name, read in OBSERVERS.items()}


def planned_stages(plan: Plan, chunks) -> dict[int, tuple[str, ...]]:
    """The plan's blocks for ``chunks``, in the form :func:`_stages` reads back."""
    return {c: tuple(n for n in plan.stages[c].layers if n.rsplit(".", 1)[-1].isdigit()) for c in chunks}
