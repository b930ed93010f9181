"""Predict the step time and per-device memory of a plan, term by term.

``estimate(profile, cluster, plan)`` returns a :class:`CostBreakdown`: what
``autopar explain`` prints and what ``autopar bench`` will compare against
measurements. [Note: step time] The step is

    pipeline(compute + TP comm, bubble) + pipeline sends + exposed DP comm + optimizer

where the pipeline part is the longest path of the schedule's task DAG
(autopar.cost.pipeline: the forward and backward of every micro-batch on
every chunk, in the order torch's schedule classes run them). For equal
stages it equals the closed forms of Narayanan et al. 2021 §2.2, (m - 1 + p)
T for GPipe and 1F1B and m T + (p - 1) T / v for interleaved 1F1B, which the
tests check; for real, uneven splits it does not, which is why it is used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Callable

from autopar.cluster import ClusterSpec
from autopar.cost import constants as C
from autopar.cost.fresh_pages import chunk_fresh_bytes, optimizer_fresh_bytes
from autopar.cost.layers import CostOptions, LayerCost, collective_s, layer_costs, send_s
from autopar.errors import AutoparError
from autopar.cost.data_parallel import (
    Wrapper,
    dp_bytes_per_param,
    dp_copy_bytes,
    dp_exposed_s,
    dp_layer_bytes_per_param,
    dp_wrapper,
    dtensor_params,
    executed_zero_stage,
    optimizer_rate,
    optimizer_step_s,
)
from autopar.plan.types import Plan, Schedule
from autopar.profile.analytic import INDEX_BYTES
from autopar.profile.types import LayerKind, ModelProfile


@dataclass(frozen=True, kw_only=True)
class StageCost:
    """One pipeline rank (all its chunks)."""

    rank: int
    chunks: tuple[int, ...]
    layers: int
    compute_s: float
    """Compute of one micro-batch (forward + backward + recompute)."""
    tp_comm_s: float
    """TP collectives of one micro-batch."""
    memory_bytes: dict[str, float]
    """weights, grads, optimizer, activations, transient, reserve."""
    peak_bytes: float
    capacity_bytes: float
    fresh_page_bytes: float = 0.0
    """Bytes of buffers mapped in fresh per step, beyond what measured kernels allocate, where the cluster
    prices them (a calibrated CPU: autopar.cost.fresh_pages [Note: fresh pages]); 0 elsewhere."""

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes


@dataclass(frozen=True, kw_only=True)
class CostBreakdown:
    """The predicted step: every term that makes it up."""

    step_time_s: float
    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    bubble_s: float
    optimizer_s: float
    stages: tuple[StageCost, ...]
    tokens_per_s: float
    model_tflops_per_gpu: float
    """Model FLOPs (no recomputation) per second per device, in TFLOP/s."""
    hardware_tflops_per_gpu: float
    """FLOPs executed (recomputation included), as Narayanan et al. eq. (3) counts."""
    mfu: float
    extras: dict = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def peak_memory_bytes(self) -> list[float]:
        return [s.peak_bytes for s in self.stages]

    @property
    def over_bytes(self) -> float:
        """How far the worst stage is over its capacity (0 when it fits)."""
        return max(0.0, max(s.peak_bytes - s.capacity_bytes for s in self.stages))

    def breakdown(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in
                ("compute_s", "tp_comm_s", "pp_comm_s", "dp_comm_s", "bubble_s", "optimizer_s")}

    def to_dict(self) -> dict:
        return {
            "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
            "model_tflops_per_gpu": self.model_tflops_per_gpu,
            "hardware_tflops_per_gpu": self.hardware_tflops_per_gpu, "mfu": self.mfu,
            "peak_memory_bytes": self.peak_memory_bytes, "fits": self.fits, "over_bytes": self.over_bytes,
            "breakdown": {**self.breakdown(), **self.extras},
            "stages": [asdict(s) | {"fits": s.fits} for s in self.stages],
        }


@lru_cache(maxsize=4096)
def inflight_per_chunk(schedule: Schedule, pp: int, v: int, m: int) -> tuple[float, ...]:
    """Peak micro-batches of activations held by each chunk, from the schedule's order.

    GPipe holds all m; 1F1B holds min(pp - s, m) on stage s (both read off
    autopar.cost.pipeline.peak_inflight in the tests). For interleaved 1F1B
    the peak is counted from the order's rule without building it
    (autopar.cost.schedule_sweep.interleaved_peak_inflight; tested equal to
    peak_inflight of the full order).
    """
    if pp == 1:
        return (1.0,)  # gradient accumulation: one micro-batch alive at a time
    if schedule is Schedule.GPIPE:
        return (float(m),) * pp
    if schedule is Schedule.ONE_F_ONE_B:
        return tuple(float(min(pp - s, m)) for s in range(pp))
    from autopar.cost.schedule_sweep import interleaved_peak_inflight

    return interleaved_peak_inflight(pp, v, m)


def chunk_ranges(profile: ModelProfile, plan: Plan) -> list[range]:
    """Layer-index ranges of each chunk, checked against the model's order."""
    index = {name: i for i, (name, _) in enumerate(profile.flat_layers())}
    ranges, expected = [], 0
    for stage in plan.stages:
        try:
            idx = [index[n] for n in stage.layers]
        except KeyError as err:
            raise AutoparError(f"plan stage {stage.index} names {err.args[0]!r}, not a layer of the model") from None
        if not idx or idx != list(range(expected, expected + len(idx))):
            raise AutoparError(f"plan stage {stage.index} is not the next contiguous run of layers")
        ranges.append(range(idx[0], idx[-1] + 1))
        expected = idx[-1] + 1
    if expected != len(index):
        raise AutoparError(f"plan stages cover {expected} of {len(index)} layers")
    return ranges


def _links(plan: Plan, cluster: ClusterSpec) -> tuple[bool, bool, bool]:
    """(tp, pp, dp) groups cross nodes? Mesh order dp x pp x tp, TP innermost."""
    gpn = cluster.gpus_per_node
    tp_inter = plan.tp > gpn
    pp_inter = plan.pp > 1 and plan.tp * plan.pp > gpn
    dp_inter = plan.dp > 1 and plan.world_size > gpn
    return tp_inter, pp_inter, dp_inter


def dp_ranks_per_node(plan: Plan, cluster: ClusterSpec) -> int:
    """Ranks of one data-parallel group inside a node: its ranks are tp x pp apart in the dp x pp x tp
    mesh, so a node of g GPUs holds g / (tp pp) of them (one when tp pp fills the node)."""
    stride = plan.tp * plan.pp
    return max(1, min(plan.dp, cluster.gpus_per_node // stride)) if stride < cluster.gpus_per_node else 1


_RETIMED: dict[tuple[int, int], tuple[list, list]] = {}
"""Per-layer costs re-derived for a plan's micro-batch, keyed by the identity of the costs they replace
(the planner costs many plans from one list per TP layout); bounded."""


def costs_for_micro_batch(costs: list[LayerCost], profile: ModelProfile, cluster: ClusterSpec, plan: Plan,
                          opts: CostOptions) -> list[LayerCost]:
    """``costs`` priced for ``plan.micro_batch_size`` sequences per micro-batch (the matmuls' M grows with
    it: autopar.cost.kernels), re-derived once per list and micro-batch."""
    b = plan.micro_batch_size
    if not costs or costs[0].micro_batch_size == b:
        return costs
    hit = _RETIMED.get((id(costs), b))
    if hit is not None and hit[0] is costs:
        return hit[1]
    retimed = layer_costs(profile, cluster, tp=plan.tp, sequence_parallel=plan.sequence_parallel,
                          recompute=plan.recompute, opts=opts, micro_batch_size=b)
    if len(_RETIMED) >= 512:
        _RETIMED.clear()
    _RETIMED[(id(costs), b)] = (costs, retimed)
    return retimed


def params_per_pipeline_rank(profile: ModelProfile, cluster: ClusterSpec, plan: Plan) -> list[float]:
    """Parameters the plan puts on each pipeline rank (one TP shard, before data-parallel sharding)."""
    costs = layer_costs(profile, cluster, tp=plan.tp, sequence_parallel=plan.sequence_parallel,
                        recompute=plan.recompute, opts=CostOptions(), micro_batch_size=plan.micro_batch_size)
    return _device_params(costs, chunk_ranges(profile, plan), plan)


def _device_params(costs: list[LayerCost], ranges: list[range], plan: Plan,
                   what: str | Callable[[LayerCost], float] = "params") -> list[float]:
    """Parameters (or parameter tensors: ``what="tensors"``, or any per-layer sum ``what(cost)``) held per
    pipeline rank; a tied weight counts once per rank."""
    owners: dict[str, int] = {}
    for c, r in enumerate(ranges):
        for i in r:
            owners[costs[i].name] = plan.stage_rank(c)
    params = [0.0] * plan.pp
    for c, r in enumerate(ranges):
        rank = plan.stage_rank(c)
        for i in r:
            tied = costs[i].tied_to
            if tied is None or owners.get(tied) != rank:
                params[rank] += what(costs[i]) if callable(what) else getattr(costs[i], what)
    return params


@dataclass(frozen=True)
class _Device:
    compute_s: float  # one micro-batch
    tp_s: float
    fwd_s: float
    bwd_s: float
    params: float
    layers: int
    act_bytes: float  # held at peak, all chunks
    work_bytes: float
    max_layer_params: float
    tensors: float = 0.0  # parameter tensors
    optimizer_fresh_bytes: float = 0.0  # AdamW's temporaries mapped anew on a CPU, per step
    fresh_bytes: float = 0.0  # everything mapped anew per step (the optimizer's included), where priced


def _fresh_s(nbytes: float, cluster: ClusterSpec) -> float:
    """Seconds one rank alone maps in ``nbytes`` of fresh pages (fresh_pages [Note: fresh pages])."""
    rate = cluster.device.fresh_page_bytes_per_s
    return nbytes / rate if rate else 0.0


def _fixed_cost_zero_stage(plan: Plan) -> int:
    """The ZeRO stage whose measured fixed cost per block prices ``plan``'s data-parallel wrapper
    (``ClusterSpec.block_fixed_s``). Calibrate times tp 1 at ZeRO 0 as it runs there, in torch's DDP; where
    a plan's ZeRO 0 runs in ``replicate`` instead (under a pipeline, or casting to bf16), its blocks pay
    ``replicate``'s hooks, which are FSDP2's (autopar.execute.compat.replicate): the ZeRO 2 row's, the same
    hooks around a gradient reduction with the parameters kept whole."""
    if plan.tp == 1 and executed_zero_stage(plan) == 0 and dp_wrapper(plan) is Wrapper.REPLICATE:
        return 2
    return plan.zero_stage


def _chunk_fwd_bwd(layer_list: list[LayerCost], plan: Plan, cluster: ClusterSpec, opts: CostOptions,
                   tp_inter: bool, fresh: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(forward s, backward s, of which TP s) of one micro-batch on one chunk; ``fresh``: the chunk's
    :func:`chunk_fresh_bytes` where the caller has them (computed here otherwise, on a cluster that prices them).

    The chunk's TP collectives are charged to forward and backward by their
    compute shares (they follow the matmuls they belong to), and with them the
    measured fixed cost of the layout's blocks; the pipeline's measured fixed
    cost per action is charged as compute (calibrated clusters only; 0 otherwise).
    """
    b = plan.micro_batch_size
    f = b * sum(x.fwd_s for x in layer_list)
    g = b * sum(x.bwd_s for x in layer_list)
    tp_s = collective_s(b * sum(x.tp_bytes for x in layer_list), plan.tp,
                        sum(x.tp_collectives for x in layer_list), tp_inter, cluster, opts.collective_efficiency,
                        ranks_per_node=min(plan.tp, cluster.gpus_per_node))
    # The measured fixed costs: the layout's per block (ClusterSpec.block_fixed_s: per-op dispatch, DTensor
    # redistribution, the data-parallel wrapper's hooks), outside the blocks (ClusterSpec.rest_fixed_s: the
    # embedding, LM head and loss under the layout, on the chunk that holds the head) and, under a pipeline,
    # torch.distributed.pipelining's per micro-batch of a chunk (ClusterSpec.pipeline_fixed_s: schedule bookkeeping,
    # P2P ops issued and waited for, the stage's wrappers). All are the rank's own host work, so they share the
    # device as compute does. Measured with every rank busy (the shared rate), they are charged as compute at the
    # alone rate; the sharing bound scales them back where all ranks run at once, not where some idle (a pipeline's
    # warm-up, drain, or one micro-batch passing its stages in turn) ([Note: ranks sharing a device]). A layout
    # without a pipeline keeps every rank busy: its step is the sharing bound's, as when the block's cost was
    # counted at the shared rate.
    blocks = sum(1 for x in layer_list if x.kind is LayerKind.BLOCK)
    tokens = b * max((x.seq_len for x in layer_list), default=0)
    zero = _fixed_cost_zero_stage(plan)
    fixed = blocks * cluster.block_fixed_s(plan.tp, plan.dp, zero, tokens)
    if any(x.kind is LayerKind.LM_HEAD for x in layer_list):  # the model's ends, charged where the loss runs
        fixed += cluster.rest_fixed_s(plan.tp, plan.dp, zero, tokens)
    if plan.pp > 1:
        fixed += cluster.pipeline_fixed_s(plan.pp)
    if fixed:
        fixed /= max(1.0, cluster.shared_slowdown)
        share = f / (f + g) if f + g > 0 else 0.5
        f, g = f + fixed * share, g + fixed * (1 - share)
    if not opts.dp_flat_buffers:  # the data-parallel wrapper's copies (data_parallel [Note: wrapper copies])
        copy_f, copy_g = dp_copy_bytes(plan, sum(x.params for x in layer_list))
        rate = cluster.device.hbm_bytes_per_s * opts.memory_efficiency
        f, g = f + copy_f / rate, g + copy_g / rate
    if cluster.device.fresh_page_bytes_per_s:  # large buffers a CPU maps anew ([Note: fresh pages]); not GPUs
        fresh_f, fresh_g = fresh if fresh is not None else chunk_fresh_bytes(layer_list, plan)
        f, g = f + _fresh_s(fresh_f, cluster), g + _fresh_s(fresh_g, cluster)
    share = f / (f + g) if f + g > 0 else 0.5
    return f + tp_s * share, g + tp_s * (1 - share), tp_s


def _devices(costs: list[LayerCost], ranges: list[range], plan: Plan, cluster: ClusterSpec,
             opts: CostOptions, inflight: tuple[float, ...],
             tp_inter: bool) -> tuple[list[_Device], list[tuple[float, float, float]]]:
    """Per pipeline rank totals, and per chunk (fwd s, bwd s, TP s) of one micro-batch."""
    b = plan.micro_batch_size
    acc = [dict(compute=0.0, tp=0.0, fwd=0.0, bwd=0.0, layers=0, act=0.0, work=0.0, maxp=0.0, fresh=0.0)
           for _ in range(plan.pp)]
    priced_fresh = bool(cluster.device.fresh_page_bytes_per_s)
    chunks = []
    for c, r in enumerate(ranges):
        d = acc[plan.stage_rank(c)]
        layer_list = [costs[i] for i in r]
        fresh = chunk_fresh_bytes(layer_list, plan) if priced_fresh else (0.0, 0.0)
        fwd_s, bwd_s, tp_s = _chunk_fwd_bwd(layer_list, plan, cluster, opts, tp_inter, fresh)
        d["compute"] += fwd_s + bwd_s - tp_s
        d["tp"] += tp_s
        d["fwd"] += b * sum(x.fwd_s for x in layer_list)
        d["bwd"] += b * sum(x.bwd_s for x in layer_list)
        d["layers"] += len(layer_list)
        d["act"] += inflight[c] * sum(b * x.act_bytes + x.call_act_bytes for x in layer_list)
        d["work"] = max(d["work"], b * max(x.work_bytes for x in layer_list))
        d["maxp"] = max(d["maxp"], max(x.params for x in layer_list))
        d["fresh"] += plan.num_microbatches * sum(fresh)
        chunks.append((fwd_s, bwd_s, tp_s))
    params = _device_params(costs, ranges, plan)
    tensors = _device_params(costs, ranges, plan, "tensors")
    fresh = (_device_params(costs, ranges, plan, lambda x: optimizer_fresh_bytes([x], plan)) if priced_fresh
             else [0.0] * plan.pp)
    devices = [_Device(a["compute"], a["tp"], a["fwd"], a["bwd"], params[i], a["layers"], a["act"], a["work"],
                       a["maxp"], tensors[i], fresh[i], a["fresh"] + fresh[i]) for i, a in enumerate(acc)]
    return devices, chunks


def _memory(dev: _Device, plan: Plan, cluster: ClusterSpec, p2p_bytes: float,
            opts: CostOptions) -> dict[str, float]:
    """Bytes on one device at its peak (autopar.cost.data_parallel [Note: ZeRO stages as run]; ZeRO:
    Rajbhandari et al. 2020 §5)."""
    per = dp_bytes_per_param(plan)
    transient = dev.work_bytes + 2 * p2p_bytes  # recompute working set; send and receive buffers
    transient += dev.params * per["unsharded"] + dev.max_layer_params * dp_layer_bytes_per_param(plan)
    capacity = cluster.device.memory_bytes
    user = {"user_logits": opts.user_logits_bytes_per_seq * plan.global_batch_size} \
        if opts.user_logits_bytes_per_seq else {}
    return user | {
        "weights": dev.params * per["weights"],
        "grads": dev.params * per["grads"],
        "optimizer": dev.params * per["optimizer"] + dev.tensors * C.OPTIMIZER_STEP_BYTES,
        "activations": dev.act_bytes,
        "transient": transient,
        "batch": plan.global_batch_size * plan.seq_len * INDEX_BYTES * C.BATCH_TENSORS,
        "comm_buffers": C.NCCL_BUFFER_BYTES * communicators(plan),
        "reserve": cluster.device.context_bytes + C.ALLOCATOR_FRAGMENTATION * capacity,
    }


def communicators(plan: Plan) -> int:
    """NCCL communicators a rank of ``plan`` sets up: its data- and tensor-parallel groups, and one per
    pipeline neighbour."""
    return int(plan.dp > 1) + int(plan.tp > 1) + (2 if plan.pp > 2 else int(plan.pp == 2))


def _dp_exposed_s(dev: _Device, plan: Plan, cluster: ClusterSpec, opts: CostOptions, dp_inter: bool) -> float:
    """Data-parallel communication left on the critical path for one device."""
    local = dp_ranks_per_node(plan, cluster)

    def coll(num_bytes: float, kind: str, calls: int = 1) -> float:
        return collective_s(num_bytes, plan.dp, calls, dp_inter, cluster, opts.collective_efficiency, kind,
                            ranks_per_node=local)

    def exposed(overlap: bool) -> float:
        return dp_exposed_s(plan, params=dev.params, layers=dev.layers, bwd_window_s=dev.bwd_s,
                            compute_s=dev.compute_s, coll=coll, overlap=overlap,
                            reduce_bytes=opts.dp_reduce_bytes, reduce_calls=opts.dp_reduce_calls,
                            fwd_window_s=dev.fwd_s, backward_prefetch=opts.dp_backward_prefetch)

    hidden = exposed(opts.overlap_dp_comm)
    if not opts.overlap_dp_comm or cluster.comm_overlap >= 1.0:
        return hidden
    # a measured cluster whose collectives take the cores the compute needs (gloo on shared CPU cores):
    # only that share of the overlap happens (ClusterSpec.comm_overlap, measured by autopar calibrate)
    return cluster.comm_overlap * hidden + (1.0 - cluster.comm_overlap) * exposed(False)


def _optimizer_s(dev: _Device, plan: Plan, cluster: ClusterSpec, opts: CostOptions) -> float:
    """One device's AdamW step: its traffic at the measured rate (else the achieved HBM bandwidth), the
    measured cost per parameter tensor (plain or DTensor, as the executor holds them), and on a CPU the
    temporaries it maps in fresh."""
    rate = optimizer_rate(cluster.device, opts.memory_efficiency)
    per_tensor = cluster.overhead_s("adamw_dtensor" if dtensor_params(plan) else "adamw_tensor")
    return (optimizer_step_s(plan, dev.params, rate, dev.tensors, per_tensor, opts.optimizer_fused)
            + _fresh_s(dev.optimizer_fresh_bytes, cluster))


def _pipeline_s(devices: list[_Device], chunks: list[tuple[float, float, float]], plan: Plan,
                cluster: ClusterSpec) -> tuple[float, int]:
    """(pipeline time without sends, bottleneck rank): see [Note: step time]; on ranks that share their
    devices, the DAG run with the shared speeds ([Note: ranks sharing a device])."""
    per_mb = [d.compute_s + d.tp_s for d in devices]
    worst = max(range(plan.pp), key=lambda i: (per_mb[i], -i))
    if plan.pp == 1:
        return plan.num_microbatches * per_mb[0], 0
    # The DAG's longest path scales with its durations: normalise them so that
    # layouts differing only in micro-batch size or ZeRO stage share one run.
    scale = max(max(c[0], c[1]) for c in chunks) or 1.0
    fwd = tuple(round(c[0] / scale, 12) for c in chunks)
    bwd = tuple(round(c[1] / scale, 12) for c in chunks)
    speeds = shared_speeds(plan, cluster)
    if speeds:
        step = _simulate_shared(plan.schedule, fwd, bwd, plan.pp, plan.virtual_stages, plan.num_microbatches, speeds)
    else:
        step = pipeline_step_s(plan.schedule, fwd, bwd, plan.pp, plan.virtual_stages, plan.num_microbatches)
    return scale * step, worst


def _pipeline_floor(devices: list[_Device], chunks: list[tuple[float, float, float]], plan: Plan) -> float:
    """A pipeline time the DAG never beats, cheap: rank d cannot start before the first
    micro-batch has passed the chunks before it (first lap), then runs m micro-batches,
    and its last backward is followed by that micro-batch's backwards on the chunks
    before it: sum_{c<d} t_c + m T_d for every rank d."""
    m = plan.num_microbatches
    floor, before = 0.0, 0.0
    for rank, dev in enumerate(devices):
        floor = max(floor, before + m * (dev.compute_s + dev.tp_s))
        before += chunks[rank][0] + chunks[rank][1]
    return floor


EXTRAPOLATE_ROUNDS = 10
"""Steps of more than this many rounds of pp micro-batches are swept or simulated at
4 or 5 rounds (the parity of the real count), two and four more, and
extrapolated when the two differences agree: past the warm-up every two
rounds add the same time (uneven chunks can give a period of two rounds).
Where they disagree the whole step is simulated. Tested against full
simulation on random uneven chunks."""


def pipeline_step_s(schedule: Schedule, fwd: tuple[float, ...], bwd: tuple[float, ...], pp: int, v: int,
                    m: int) -> float:
    """Longest path of the step's task DAG (autopar.cost.pipeline.simulate).

    The closed forms ((m - 1 + p) T for GPipe/1F1B, m T + (p - 1) T / v for
    interleaved) hold for equal stages only; on real, uneven splits the DAG
    differs (interleaved by 5-11% on the splits we tried), so the DAG is the
    estimate and the closed forms are tests of it. The same longest path is
    swept with numpy where the schedule allows ([Note: schedule sweeps]).
    """
    rounds = m // pp
    if m % pp == 0 and rounds > EXTRAPOLATE_ROUNDS:
        base = 4 + rounds % 2
        a, b, c = (_longest_path(schedule, fwd, bwd, pp, v, r * pp) for r in (base, base + 2, base + 4))
        if abs((c - b) - (b - a)) <= 1e-9 * c:
            return c + (rounds - base - 4) // 2 * (c - b)
    return _longest_path(schedule, fwd, bwd, pp, v, m)


def _longest_path(schedule: Schedule, fwd: tuple[float, ...], bwd: tuple[float, ...], pp: int, v: int,
                  m: int) -> float:
    """The DAG's longest path for m micro-batches: swept with numpy where the schedule allows, else simulated."""
    from autopar.cost.schedule_sweep import sweep_step_s

    swept = sweep_step_s(schedule, fwd, bwd, pp, v, m)
    return swept if swept is not None else _simulate(schedule, fwd, bwd, pp, v, m)


@lru_cache(maxsize=8192)
def _simulate(schedule: Schedule, fwd: tuple[float, ...], bwd: tuple[float, ...], pp: int, v: int,
              m: int) -> float:
    from autopar.cost.pipeline import simulate

    return simulate(_orders(schedule, pp, v, m), fwd, bwd, 0.0, trusted_microbatches=m).step_s


@lru_cache(maxsize=8192)
def _simulate_shared(schedule: Schedule, fwd: tuple[float, ...], bwd: tuple[float, ...], pp: int, v: int, m: int,
                     speeds: tuple[float, ...]) -> float:
    from autopar.cost.pipeline import simulate_shared

    return simulate_shared(_orders(schedule, pp, v, m), fwd, bwd, speeds, trusted_microbatches=m).step_s


def shared_speeds(plan: Plan, cluster: ClusterSpec) -> tuple[float, ...] | None:
    """The speed of a pipeline rank while k of ``plan``'s pp compute at once, for k = 0..pp, on ranks that
    share their devices ([Note: ranks sharing a device]); None where they do not, without a pipeline, or
    where no number of busy ranks exceeds the devices (every speed 1: the plain sweep's longest path, which
    the planner's hot path takes with its extrapolation)."""
    if plan.pp == 1 or cluster.shared_slowdown <= 1.0:
        return None
    ranks = min(cluster.gpus_per_node, plan.dp * plan.tp * plan.pp)  # a node's ranks in the plan
    units = cluster.gpus_per_node / max(1.0, cluster.ranks_per_device)  # its cores or devices
    speeds = [1.0]
    for k in range(1, plan.pp + 1):
        busy = k * ranks / plan.pp  # each pipeline rank's dp x tp peers compute with it
        speeds.append(1.0 if busy <= units else min(1.0, ranks / (cluster.shared_slowdown * busy)))
    return tuple(speeds) if min(speeds) < 1.0 else None


@lru_cache(maxsize=256)
def _orders(schedule: Schedule, pp: int, v: int, m: int):
    from autopar.cost.pipeline import action_orders

    return action_orders(schedule.value, pp, v, m)


def estimate_from_costs(costs: list[LayerCost], ranges: list[range], profile: ModelProfile,
                        cluster: ClusterSpec, plan: Plan, opts: CostOptions,
                        prune_above: float | None = None) -> CostBreakdown | None:
    """The estimate, from per-layer costs already computed for the plan's TP layout.

    With ``prune_above`` (the step time of a plan that fits), return None
    without running the schedule's DAG when this plan cannot replace it: it
    does not fit, or a floor of its pipeline time plus the other terms already
    reaches ``prune_above`` (``_pipeline_floor``: the DAG is never shorter).
    """
    costs = costs_for_micro_batch(costs, profile, cluster, plan, opts)
    tp_inter, pp_inter, dp_inter = _links(plan, cluster)
    inflight = inflight_per_chunk(plan.schedule, plan.pp, plan.virtual_stages, plan.num_microbatches)
    devices, chunks = _devices(costs, ranges, plan, cluster, opts, inflight, tp_inter)
    m = plan.num_microbatches
    boundary = _boundary_bytes(costs, ranges, plan, opts)
    pp_comm_s = 0.0
    if plan.pp > 1:
        sends = m * plan.virtual_stages + plan.pp - 1
        pp_comm_s = 2 * sends * send_s(boundary, pp_inter, cluster, opts.p2p_efficiency)
    dp_s = max(_dp_exposed_s(d, plan, cluster, opts, dp_inter) for d in devices)
    # every rank steps its optimizer at once: ranks sharing a device share it ([Note: ranks sharing a device])
    optimizer_s = max(_optimizer_s(d, plan, cluster, opts) for d in devices) * cluster.shared_slowdown
    rest_s = pp_comm_s + dp_s + optimizer_s
    stages = []
    for rank, dev in enumerate(devices):
        mem = _memory(dev, plan, cluster, boundary, opts)
        stages.append(StageCost(
            rank=rank, chunks=tuple(range(rank, len(ranges), plan.pp)), layers=dev.layers,
            compute_s=dev.compute_s, tp_comm_s=dev.tp_s, memory_bytes=mem, peak_bytes=sum(mem.values()),
            capacity_bytes=cluster.device.memory_bytes, fresh_page_bytes=dev.fresh_bytes))
    if prune_above is not None and (not all(st.fits for st in stages)
                                    or _pipeline_floor(devices, chunks, plan) + rest_s >= prune_above):
        return None  # cannot replace a plan that fits and is faster
    pipe_s, worst = _pipeline_s(devices, chunks, plan, cluster)
    sharing_s = max(0.0, _shared_pipeline_s(devices, plan, cluster) - pipe_s)
    cost = _summary(profile, plan, cluster, pipe_s + sharing_s + rest_s, pipe_s, worst, devices, pp_comm_s,
                    dp_s, optimizer_s, stages)
    if sharing_s:
        cost.extras["sharing_s"] = sharing_s
    return cost


# [Note: ranks sharing a device] Where several ranks share one device (gloo processes on a host's cores:
# ``ClusterSpec.ranks_per_device`` > 1) a rank computes at the device's own rate only while no more ranks
# compute than there are cores; when all N ranks of a node compute at once each is S =
# ``ClusterSpec.shared_slowdown`` times slower (measured by ``autopar calibrate``, whose kernel rates are
# one rank's alone: about 2.1 for 4 ranks on 2 cores, time-slicing plus what sharing costs caches). In
# between, b busy ranks on the node's U cores time-slice them: each runs at N / (S b) of its own rate
# (N / (S N) = 1 / S with all busy), or at its own rate while b <= U (two ranks on the development VM's two
# cores ran a matmul loop at the alone rate, 2026-12-01). A pipeline keeps only some of its ranks busy: its
# warm-up and drain, or one micro-batch passing the stages in turn, run few ranks, its steady state all.
# So the pipeline's DAG is run with those speeds (autopar.cost.pipeline.simulate_shared, k of pp pipeline
# ranks busy meaning k / pp of the node's ranks with their data- and tensor-parallel peers:
# :func:`shared_speeds`). A layout without a pipeline keeps every rank busy, and every step of any layout
# cannot end before the node's ranks have done their compute at the shared rate:
#     step >= m (shared_slowdown x mean_r compute_r + mean_r tp_r)
# over the pipeline ranks r. Collectives and sends are measured with every group busy at once, so they
# carry the sharing already. With a device per rank (shared_slowdown 1) nothing changes: the speeds are 1
# and the bound is the mean rank's busy time, never above the DAG. On the development VM the DAG with
# shared speeds took the example's pp 4 from 0.72-0.77 of its measured step (the DAG at the alone rate,
# the bound below it) to 0.80-0.87 (benchmark records of 2026-12-01 j and k, re-priced).


def _shared_pipeline_s(devices: list[_Device], plan: Plan, cluster: ClusterSpec) -> float:
    """The pipeline time the node's shared devices allow ([Note: ranks sharing a device])."""
    if cluster.shared_slowdown <= 1.0:
        return 0.0
    compute = sum(d.compute_s for d in devices) / len(devices)
    tp = sum(d.tp_s for d in devices) / len(devices)
    return plan.num_microbatches * (cluster.shared_slowdown * compute + tp)


def _summary(profile: ModelProfile, plan: Plan, cluster: ClusterSpec, step_s: float, pipe_s: float,
             worst: int, devices: list[_Device], pp_comm_s: float, dp_s: float, optimizer_s: float,
             stages: list[StageCost]) -> CostBreakdown:
    m, B, n = plan.num_microbatches, plan.global_batch_size, plan.world_size
    compute_s = m * devices[worst].compute_s
    tp_s = m * devices[worst].tp_s
    model_flops = profile.model_flops_per_seq() * B
    hardware_flops = profile.hardware_flops_per_seq(plan.recompute) * B
    model_tflops = model_flops / step_s / n / 1e12
    return CostBreakdown(
        step_time_s=step_s, compute_s=compute_s, tp_comm_s=tp_s, pp_comm_s=pp_comm_s, dp_comm_s=dp_s,
        bubble_s=max(0.0, pipe_s - compute_s - tp_s), optimizer_s=optimizer_s, stages=tuple(stages),
        tokens_per_s=B * plan.seq_len / step_s, model_tflops_per_gpu=model_tflops,
        hardware_tflops_per_gpu=hardware_flops / step_s / n / 1e12,
        mfu=model_tflops * 1e12 / cluster.device.peak_flops_per_s,
    )


def estimate(profile: ModelProfile, cluster: ClusterSpec, plan: Plan,
             opts: CostOptions | None = None) -> CostBreakdown:
    """Predicted step time and memory of ``plan`` (its stages must be set)."""
    opts = opts or CostOptions()
    costs = layer_costs(profile, cluster, tp=plan.tp, sequence_parallel=plan.sequence_parallel,
                        recompute=plan.recompute, opts=opts, micro_batch_size=plan.micro_batch_size)
    return estimate_from_costs(costs, chunk_ranges(profile, plan), profile, cluster, plan, opts)


def chunk_times(profile: ModelProfile, cluster: ClusterSpec, plan: Plan,
                opts: CostOptions | None = None) -> tuple[list[float], list[float], float]:
    """(forward s, backward s) of one micro-batch per chunk, and one pipeline send.

    The numbers the estimate uses, for the task DAG of autopar.cost.pipeline
    (the timeline `explain --plot` draws).
    """
    opts = opts or CostOptions()
    costs = layer_costs(profile, cluster, tp=plan.tp, sequence_parallel=plan.sequence_parallel,
                        recompute=plan.recompute, opts=opts, micro_batch_size=plan.micro_batch_size)
    tp_inter, pp_inter, _ = _links(plan, cluster)
    ranges = chunk_ranges(profile, plan)
    chunks = [_chunk_fwd_bwd([costs[i] for i in r], plan, cluster, opts, tp_inter) for r in ranges]
    if plan.pp == 1:
        return [c[0] for c in chunks], [c[1] for c in chunks], 0.0
    return [c[0] for c in chunks], [c[1] for c in chunks], send_s(_boundary_bytes(costs, ranges, plan, opts),
                                                                  pp_inter, cluster, opts.p2p_efficiency)


def _boundary_bytes(costs: list[LayerCost], ranges: list[range], plan: Plan, opts: CostOptions) -> float:
    """Bytes of one micro-batch's largest stage-boundary tensor, per sending GPU."""
    split_send = plan.sequence_parallel or opts.pp_scatter_gather
    largest = max((costs[r[-1]].output_bytes for r in ranges[:-1]), default=0.0)
    return largest * plan.micro_batch_size / (plan.tp if split_send else 1)
