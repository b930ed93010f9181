"""The search space: every layout the planner may choose, under the user's pins.

A candidate fixes the degrees, micro-batching, schedule, recomputation,
optimizer sharding and sequence parallelism; the stage split is chosen later
by the ILP (autopar.plan.split) for the candidates that survive pruning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autopar.cluster import ClusterSpec
from autopar.errors import AutoparError
from autopar.plan.types import ZERO_STAGES, Pins, Precision, Schedule, default_precision, describe_layout, schedule_accepts
from autopar.profile.types import ModelProfile, Recompute

MAX_MICRO_BATCH_SIZE = 64
"""Largest micro-batch tried: beyond it activations grow with no gain in the
cost model (matmul efficiency is modelled per FLOP, not per shape)."""

MAX_VIRTUAL_STAGES = 8
"""Most chunks per rank tried for interleaved 1F1B (Narayanan et al. 2021
Fig. 17 shows diminishing returns past a few)."""



@dataclass(frozen=True, order=True)
class Candidate:
    """A layout without its stage split. Field order is the tie-break order."""

    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int
    schedule: Schedule
    virtual_stages: int
    recompute: Recompute
    zero_stage: int
    sequence_parallel: bool
    precision: Precision
    """The same for every candidate of a search: the user's (autopar.plan.types.Precision)."""

    def describe(self) -> str:
        return describe_layout(self)


def divisors(n: int) -> list[int]:
    """Divisors of ``n`` in increasing order, in O(sqrt(n)) steps (n may be a batch of 2**30)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def tp_options(profile: ModelProfile, cluster: ClusterSpec, world: int, pins: Pins) -> list[int]:
    """TP degrees the search tries: inside a node unless pinned or allowed across nodes."""
    heads, kv, ffn = profile.num_attention_heads, profile.num_key_value_heads, profile.ffn_hidden_size

    def divides(t: int) -> bool:  # whole heads and an even MLP split on every rank
        return heads % t == 0 and kv % t == 0 and (ffn == 0 or ffn % t == 0)

    if pins.tp is not None:
        if not divides(pins.tp):
            raise AutoparError(
                f"--tp {pins.tp} does not divide the model's {heads} attention heads, {kv} key/value heads "
                f"and MLP width {ffn}; use one of {[t for t in divisors(kv) if divides(t)]}")
        return [pins.tp]
    limit = world if pins.tp_inter_node else min(world, cluster.gpus_per_node)
    return [t for t in divisors(limit) if world % t == 0 and divides(t)]


def _schedules(pp: int, m: int, num_layers: int, num_blocks: int, pins: Pins) -> list[tuple[Schedule, int]]:
    """(schedule, virtual stages) pairs valid for torch.distributed.pipelining.

    Unpinned, interleaving is tried only where the blocks split evenly into
    chunks: with uneven chunks the imbalance recurs v times per micro-batch,
    and in the DAG such layouts lost to even ones by 5-45% on the development
    set's models (docs/planner.md).
    """
    if pp == 1:
        return [(Schedule.ONE_F_ONE_B, 1)]
    out = []
    for sched in (Schedule.ONE_F_ONE_B, Schedule.GPIPE, Schedule.INTERLEAVED_1F1B):
        if pins.schedule is not None and sched is not pins.schedule:
            continue
        if not schedule_accepts(sched, pp, m):
            continue
        if sched is not Schedule.INTERLEAVED_1F1B:
            if pins.virtual_stages in (None, 1):
                out.append((sched, 1))
            continue
        if pins.virtual_stages:
            vs = [pins.virtual_stages]
        else:  # Megatron-LM's rule: the blocks divide evenly into the pp * v chunks
            vs = [v for v in range(2, MAX_VIRTUAL_STAGES + 1) if num_blocks % (pp * v) == 0]
        out += [(sched, v) for v in vs if v >= 2 and pp * v <= num_layers]
    return out


def enumerate_candidates(profile: ModelProfile, cluster: ClusterSpec, *, global_batch_size: int,
                         pins: Pins) -> list[Candidate]:
    """All layouts for the cluster's world size that respect the pins, in tie-break order.

    Raises:
        AutoparError: the pins or the batch leave no layout, with the reason.
    """
    world = cluster.world_size
    num_layers = sum(layer.count for layer in profile.layers)
    precision = resolve_precision(profile, pins)
    out: list[Candidate] = []
    batch_rejected: set[int] = set()
    for tp in tp_options(profile, cluster, world, pins):
        for pp in ([pins.pp] if pins.pp else divisors(world // tp)):
            if world % (tp * pp) or pp > num_layers:
                continue
            dp = world // (tp * pp)
            if pins.dp and dp != pins.dp:
                continue
            if global_batch_size % dp:
                batch_rejected.add(dp)
                continue
            out += _per_degrees(tp, pp, dp, global_batch_size // dp, num_layers, profile.num_layers, pins,
                                precision)
    if not out:
        raise AutoparError(_no_layout_reason(profile, world, global_batch_size, pins, batch_rejected))
    return sorted(out, key=_field_order)


def _field_order(cand: Candidate) -> tuple:
    """The dataclass order of ``cand`` as a plain tuple (sorting by it is several times faster)."""
    return (cand.tp, cand.pp, cand.dp, cand.micro_batch_size, cand.num_microbatches, cand.schedule,
            cand.virtual_stages, cand.recompute, cand.zero_stage, cand.sequence_parallel, cand.precision)


def resolve_precision(profile: ModelProfile, pins: Pins) -> Precision:
    """The pinned precision, checked against the profile's compute dtype, or the profile's default.

    Raises:
        AutoparError: the profile was built for another compute dtype than the precision computes in.
    """
    if pins.precision is None:
        return default_precision(profile.dtype_bytes)
    if pins.precision.compute_bytes != profile.dtype_bytes:
        raise AutoparError(f"precision {pins.precision.value} computes in {pins.precision.compute_bytes}-byte "
                           f"elements but {profile.name} was profiled with {profile.dtype_bytes}-byte ones; profile "
                           f"it with dtype_bytes={pins.precision.compute_bytes}")
    return pins.precision


def _per_degrees(tp: int, pp: int, dp: int, per_replica: int, num_layers: int, num_blocks: int,
                 pins: Pins, precision: Precision) -> list[Candidate]:
    out = []
    mbs_options = [pins.micro_batch_size] if pins.micro_batch_size else [per_replica] if pins.single_microbatch \
        else [b for b in divisors(per_replica) if b <= MAX_MICRO_BATCH_SIZE]
    recomputes = [pins.recompute] if pins.recompute else list(Recompute)
    zeros = [pins.zero_stage] if pins.zero_stage is not None else list(ZERO_STAGES)
    if dp == 1:
        zeros = [z for z in zeros if z == 0] or zeros[:1]  # nothing to shard over
    sps = [pins.sequence_parallel] if pins.sequence_parallel is not None else [tp > 1]
    for mbs in mbs_options:
        if per_replica % mbs:
            continue
        m = per_replica // mbs
        for sched, v in _schedules(pp, m, num_layers, num_blocks, pins):
            for rc in recomputes:
                for zero in zeros:
                    for sp in sps:
                        out.append(Candidate(tp, pp, dp, mbs, m, sched, v, rc, zero, sp and tp > 1, precision))
    return out


def _no_layout_reason(profile: ModelProfile, world: int, batch: int, pins: Pins, batch_rejected: set[int]) -> str:
    if pins.tp and world % pins.tp:
        return f"--tp {pins.tp} does not divide the {world} GPUs; use a divisor of {world}"
    if pins.pp and pins.pp > sum(l.count for l in profile.layers):
        layers = sum(l.count for l in profile.layers)
        return f"--pp {pins.pp} exceeds the model's {layers} layers; use at most {layers} stages"
    if pins.dp and batch % pins.dp:
        return f"--dp {pins.dp} does not divide the global batch {batch}; use a divisor of {batch}"
    if pins.micro_batch_size and batch % pins.micro_batch_size:
        return (f"--micro-batch {pins.micro_batch_size} does not divide the global batch {batch}; "
                f"use a divisor of {batch}")
    if batch_rejected:
        dps = sorted(batch_rejected)
        return (f"global batch {batch} is divisible by no data-parallel degree possible on {world} GPUs "
                f"({', '.join(map(str, dps[:8]))}); use a multiple of {dps[0]}")
    return (f"no layout of {world} GPUs satisfies the pins ({pins}) with global batch {batch}; "
            "drop a pin or change the batch")
