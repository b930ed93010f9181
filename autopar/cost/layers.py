"""Per-layer costs on one device, for one sequence, under a TP layout.

The profile gives FLOPs, matmul shapes and bytes; this turns them into seconds on a device and into
bytes held on the device. A layer's time is its weight matmuls at their shape's rate and its attention
core at its kernel's rate (autopar.cost.kernels [Note: matmul efficiency by shape]), both over the
sustained fraction of those rates a training step reaches (``CostOptions.kernel_sustained``), plus its
non-matmul bytes over the achieved memory bandwidth. Everything is per sequence of a micro-batch of
``micro_batch_size`` sequences (the matmuls' M grows with it); None prices a bound no micro-batch beats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autopar.cluster import ClusterSpec
from autopar.cost import constants as C
from autopar.cost import kernels as K
from autopar.profile.analytic import FUSED_ATTENTION_BWD_PER_FWD
from autopar.profile.types import LayerKind, ModelProfile, Recompute


@dataclass(frozen=True, kw_only=True)
class CostOptions:
    """Knobs of the cost model; the defaults are autopar's own executor."""

    kernel_sustained: float = C.KERNEL_SUSTAINED
    """Fraction of the kernels' rates (matmul by shape, fused attention) a training step sustains."""
    gemm_efficiency: float | None = None
    """One achieved fraction of peak for every matmul FLOP, attention's included, in place of the shape
    and kernel models (a flat roofline, for hand-worked tests); None: the models."""
    memory_efficiency: float = C.MEMORY_EFFICIENCY
    collective_efficiency: float = C.COLLECTIVE_EFFICIENCY
    p2p_efficiency: float = C.P2P_EFFICIENCY
    overlap_dp_comm: bool = C.OVERLAP_DP_COMM
    dp_reduce_bytes: int | None = None
    """Bytes per gradient element in the data-parallel reduction; None: the plan's precision as autopar's
    executor runs it (autopar.cost.constants.PRECISION_BYTES ``reduce``). The development set's
    Megatron-LM 2021 runs reduced their 16-bit gradients in 16 bits (2)."""
    dp_reduce_calls: int | None = None
    """Collectives the data-parallel gradient reduction takes per step; None: as autopar's executor runs
    it (one per layer: its replicate / FSDP2 wrappers reduce each block; DDP one per 25 MiB bucket).
    Megatron-LM 2021's local DDP all-reduced one flat buffer (1)."""
    dp_backward_prefetch: bool = True
    """ZeRO 3 gathers a block's parameters before the backward that needs them (FSDP2, as autopar runs it;
    FSDP1's ``BACKWARD_PRE``); False: after the previous block's backward (FSDP1's ``BACKWARD_POST``), so
    the backward's gathers and reduce-scatters are exposed (autopar.cost.data_parallel [Note: data-parallel
    overlap])."""
    pp_scatter_gather: bool = False
    """Split each pipeline send over the TP ranks and all-gather after it
    (Narayanan et al. 2021 §4.1). Implied by sequence parallelism."""
    user_logits_bytes_per_seq: float = 0.0
    """The script computes its own loss from ``outputs.logits`` (no labels): every device holds the
    global batch's logits, priced per sequence of the global batch (executor: ``own_loss=True``,
    ``autopar.execute.semantics`` [Note: the user's own loss]; see ``user_logits_bytes_per_seq``)."""
    measured_block_s: tuple[tuple[int, float, float], ...] = ()
    """Measured (tp, forward s, backward s) of one block for one sequence, from
    autopar.profile.measured.measure_blocks; for a TP degree listed here they
    replace the roofline for blocks (``explain --measure``)."""
    dp_flat_buffers: bool = False
    """The data-parallel wrapper communicates from flat buffers its parameters and gradients are views of
    (FSDP1, Megatron-LM): no copies; False: FSDP2 and replicate copy into and out of their buffers, as
    autopar runs them (autopar.cost.data_parallel [Note: wrapper copies])."""
    optimizer_fused: bool = False
    """The optimizer is one fused AdamW kernel (apex ``FusedAdam``: Megatron-LM's runs); False: torch's
    ``AdamW(params)`` as the user's loop builds it, unfused (autopar.cost.constants
    ``ADAMW_TORCH_ACCESSES``)."""
    sp_regather: bool = False
    """Sequence parallelism keeps the sequence shard of a column-parallel linear's input and all-gathers
    it again in backward, overlapped with the weight-gradient matmul (Megatron-LM; Korthikanti et al. 2022
    §4.2.2); False: the gathered input is kept, as torch's ``PrepareModuleInput`` runs it."""


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    """One layer instance on one device, for one sequence."""

    name: str
    kind: LayerKind
    fwd_s: float
    bwd_s: float
    """Backward including the recomputation the plan asks for."""
    tp_bytes: float
    """Bytes all-reduced across TP per sequence (fwd, bwd and recompute)."""
    tp_collectives: int
    """Number of TP collectives per micro-batch (their latency is paid per call)."""
    params: float
    """Parameters held on this device (after TP sharding)."""
    act_bytes: float
    """Bytes kept for backward per sequence."""
    call_act_bytes: float = 0.0
    """Bytes kept for backward once per micro-batch (``LayerProfile.call_saved_bytes``)."""
    tensors: int = 0
    """Parameter tensors of this layer on this device (``LayerProfile.param_tensors``)."""
    work_bytes: float
    """Extra bytes alive while this layer's backward runs (recomputed activations)."""
    output_bytes: float
    tied_to: str | None
    micro_batch_size: int | None = None
    """The micro-batch the times are for (None: a bound no micro-batch beats)."""
    seq_len: int = 0
    """Tokens a sequence (the profile's): a micro-batch's tokens price what grows with them per block
    (``ClusterSpec.block_fixed_s``)."""
    loss_elements: float = 0.0
    """Logits per sequence on this device (the LM head's, vocab-parallel under TP; 0 elsewhere): the size
    of the loss's tensors (autopar.cost.fresh_pages)."""
    weight_numels: tuple[float, ...] = ()
    """Elements of each weight matrix on this device (:func:`weight_numels`): the sizes that decide which
    gradients and optimizer temporaries a CPU maps in fresh (autopar.cost.fresh_pages)."""


def _compute_s(layer, device, tp: int, sp: bool, recompute: Recompute, opts: CostOptions,
               micro_batch_size: int | None) -> tuple[float, float]:
    """(forward s, backward s with its recomputation) of one sequence of ``layer``."""
    mem = device.hbm_bytes_per_s * opts.memory_efficiency
    if layer.kind is LayerKind.LM_HEAD and device.loss_bytes_per_s:  # the loss's kernels, measured (achieved)
        mem = device.loss_bytes_per_s
        if tp > 1 and device.loss_parallel_bytes_per_s:  # vocab-sharded: torch's unfused loss_parallel()
            mem = device.loss_parallel_bytes_per_s
    fwd_t = layer.fwd_traffic_bytes.at(tp, sp) / mem
    bwd_t = (layer.bwd_traffic_bytes.at(tp, sp) + layer.recompute_traffic_bytes[recompute].at(tp, sp)) / mem
    if opts.gemm_efficiency is not None:  # one flat rate for every matmul FLOP
        rate = device.peak_flops_per_s * opts.gemm_efficiency
        return (layer.fwd_flops.at(tp) / rate + fwd_t,
                (layer.bwd_flops.at(tp) + layer.recompute_flops[recompute].at(tp)) / rate + bwd_t)
    core_f = core_b = core_flops = 0.0
    if layer.attention is not None:
        core = layer.attention
        core_f, core_b = K.core_s(core, device, tp, micro_batch_size, FUSED_ATTENTION_BWD_PER_FWD)
        core_flops = 4.0 * core.seq_len**2 * core.head_dim * -(-core.heads // tp)
    lin_f, lin_b, lin_flops = K.linear_s(layer.gemms, device, tp, micro_batch_size)
    matmul_flops = max(0.0, layer.fwd_flops.at(tp) - core_flops)  # the profile's count rules
    if lin_flops > 0:
        lin_f, lin_b = lin_f * matmul_flops / lin_flops, lin_b * matmul_flops / lin_flops
    else:  # no shapes: the device's best rate
        lin_f = matmul_flops / (device.peak_flops_per_s * device.matmul_ceiling)
        lin_b = lin_f * layer.bwd_flops.at(tp) / max(layer.fwd_flops.at(tp), 1.0)
    recomputed = 0.0
    if layer.recompute_flops[recompute].total > 0:
        recomputed = lin_f + core_f if recompute is Recompute.FULL else core_f
    sustained = opts.kernel_sustained
    return (lin_f + core_f) / sustained + fwd_t, (lin_b + core_b + recomputed) / sustained + bwd_t


def layer_costs(profile: ModelProfile, cluster: ClusterSpec, *, tp: int, sequence_parallel: bool,
                recompute: Recompute, opts: CostOptions, micro_batch_size: int | None = None) -> list[LayerCost]:
    """Costs of every layer instance, in model order, per sequence of a micro-batch of ``micro_batch_size``
    sequences (None: per-sequence times no micro-batch beats, for the planner's bounds)."""
    sp = sequence_parallel and tp > 1
    out = []
    for layer in profile.layers:
        fwd_s, bwd_s = _compute_s(layer, cluster.device, tp, sp, recompute, opts, micro_batch_size)
        measured = [(f, b) for t, f, b in opts.measured_block_s if t == tp]
        if measured and layer.kind is LayerKind.BLOCK:
            fwd_s, bwd_s = _measured(layer, recompute, measured[0], tp)
        # Full recomputation repeats the forward's collectives in backward.
        passes = 3 if (recompute is Recompute.FULL and layer.kind is LayerKind.BLOCK) else 2
        tp_bytes = layer.tp_allreduce_bytes * passes if tp > 1 else 0.0
        collectives = 0 if tp_bytes == 0 else passes * max(1, round(layer.tp_allreduce_bytes / layer.output_bytes))
        act = _saved_bytes(layer, recompute, tp, sp, opts.sp_regather)
        work = 0.0
        if recompute is not Recompute.NONE:
            work = _saved_bytes(layer, Recompute.NONE, tp, sp, opts.sp_regather) - act
        work += _transient_bytes(layer, profile, tp, sp, recompute, micro_batch_size)
        for name in layer.module_names:
            out.append(LayerCost(
                name=name, kind=layer.kind, fwd_s=fwd_s, bwd_s=bwd_s, tp_bytes=tp_bytes,
                tp_collectives=collectives, params=layer.params.at(tp), act_bytes=act, work_bytes=work,
                call_act_bytes=layer.call_saved_bytes, tensors=layer.param_tensors,
                output_bytes=layer.output_bytes, tied_to=layer.tied_to, micro_batch_size=micro_batch_size,
                seq_len=profile.seq_len, weight_numels=weight_numels(layer, tp),
                loss_elements=profile.seq_len * profile.vocab_size / tp if layer.kind is LayerKind.LM_HEAD else 0.0,
            ))
    return out


def weight_numels(layer, tp: int) -> tuple[float, ...]:
    """Elements of each weight matrix of ``layer`` on one device: an embedding's table first (vocab-parallel
    under TP) and its other parameters as one, else each matmul's weight (``inner x cols``, cut to its TP
    shard where it is sharded). Norms and biases, small, are left out."""
    if layer.kind is LayerKind.EMBEDDING:
        return (layer.params.sharded / tp, layer.params.replicated)
    return tuple(g.inner * g.cols / (tp if g.tp_dim else 1) for g in layer.gemms for _ in range(g.count))


def _transient_bytes(layer, profile: ModelProfile, tp: int, sp: bool, recompute: Recompute,
                     micro_batch_size: int | None) -> float:
    """Bytes per sequence that the backward of ``layer`` allocates beyond what it saved (transformers'
    loss and torch's embedding backward): the LM head's logits in the compute dtype, held from its forward
    to the loss's backward (the model's ``outputs.logits``), the float32 logits' gradient (as large as the
    saved log-softmax) and its cast back to the compute dtype, all vocabulary-parallel; the embedding's
    dense gradient of its (vocab-parallel) table, once per micro-batch (None: left out, a bound)."""
    if layer.kind is LayerKind.LM_HEAD:
        logits = profile.seq_len * profile.vocab_size / tp
        return layer.activation_bytes[recompute].at(tp, sp) + 2 * logits * profile.dtype_bytes
    if layer.kind is LayerKind.EMBEDDING and micro_batch_size:
        return layer.params.sharded / tp * profile.dtype_bytes / micro_batch_size
    return 0.0


def _saved_bytes(layer, recompute: Recompute, tp: int, sp: bool, regather: bool = False) -> float:
    """Bytes one sequence leaves saved for backward. Under sequence parallelism the replicated part is split
    over tp except the all-gathered inputs the column-parallel linears keep whole
    (``LayerProfile.sp_gathered_bytes``): ``(replicated - gathered + sharded) / tp + gathered``; with
    ``regather`` (``CostOptions.sp_regather``) they keep the shard too. Integer indices
    (``LayerProfile.index_bytes``) stay whole either way, and under tensor parallelism the layer saves
    ``LayerProfile.tp_saved_bytes`` more."""
    gathered = 0.0 if regather else _gathered(layer, recompute, sp)
    whole = gathered + (layer.index_bytes.get(recompute, 0.0) if sp else 0.0)
    extra = layer.tp_saved_bytes if tp > 1 else 0.0
    return layer.activation_bytes[recompute].at(tp, sp) + whole * (1 - 1 / tp) + extra


def _gathered(layer, recompute: Recompute, sp: bool) -> float:
    return layer.sp_gathered_bytes.get(recompute, 0.0) if sp else 0.0


def _measured(layer, recompute: Recompute, measured: tuple[float, float], tp: int) -> tuple[float, float]:
    """Measured block (forward, backward) seconds; recomputation adds its FLOP share of the forward."""
    m_fwd, m_bwd = measured
    share = layer.recompute_flops[recompute].at(tp) / max(layer.fwd_flops.at(tp), 1.0)
    return m_fwd, m_bwd + share * m_fwd


def collective_s(num_bytes: float, group: int, calls: int, inter_node: bool, cluster: ClusterSpec,
                 efficiency: float, kind: str = "all_reduce", ranks_per_node: int | None = None) -> float:
    """One collective's time by algorithm and topology ([Note: collectives]); every rank's traffic is
    priced the same way for data, tensor and pipeline parallelism.

    Args:
        num_bytes: the message (per call summed over ``calls``).
        group: ranks in the group; ``calls`` collectives pay their latency each.
        inter_node: the group spans nodes.
        kind: ``all_reduce``, ``reduce_scatter`` or ``all_gather``.
        ranks_per_node: the group's ranks inside one node (a group across nodes); None: as many as fit,
            min(group, gpus per node) (the fastest case: a bound).

    A calibrated cluster's measured collective of this kind and group size (``autopar calibrate``,
    docs/clusters.md#measured) replaces the model: ``calls`` latencies plus the bytes at the measured rate,
    already achieved (no efficiency).
    """
    if group <= 1 or (num_bytes <= 0 and calls <= 0):
        return 0.0
    measured = cluster.measured_collective(kind, group, inter_node)
    if measured is not None:
        return calls * measured[0] + num_bytes / measured[1]
    steps = 2 * (group - 1) if kind == "all_reduce" else group - 1
    volume = num_bytes * steps / group
    if not inter_node:
        latency, bandwidth = cluster.link(False)
        return calls * steps * latency + volume / (bandwidth * efficiency)
    local = max(1, min(ranks_per_node or cluster.gpus_per_node, group, cluster.gpus_per_node))
    nic_share = cluster.node_nic_bytes_per_s / cluster.gpus_per_node
    bandwidth = local * nic_share if local == 1 else min(cluster.intra_node_bytes_per_s, local * nic_share)
    ring = calls * steps * cluster.inter_node_latency_s + volume / (bandwidth * efficiency)
    if kind != "all_reduce":
        return ring
    nodes = max(2, -(-group // local))
    tree_latency = 2 * (math.ceil(math.log2(nodes)) * cluster.inter_node_latency_s
                        + (local - 1) * cluster.intra_node_latency_s)
    return min(ring, calls * tree_latency + 2 * num_bytes / (bandwidth * efficiency))


def send_s(num_bytes: float, inter_node: bool, cluster: ClusterSpec, efficiency: float) -> float:
    """One pipeline send of ``num_bytes``: a calibrated cluster's measured sends (docs/clusters.md#measured),
    else the link's latency plus the bytes at its bandwidth times ``efficiency``."""
    measured = cluster.measured_send(inter_node)
    if measured is not None:
        return measured[0] + num_bytes / measured[1]
    latency, bandwidth = cluster.link(inter_node)
    return latency + num_bytes / (bandwidth * efficiency)


# [Note: collectives] NCCL's algorithms, priced alpha-beta (Thakur et al. 2005): a ring all-reduce of n
# bytes over g ranks moves 2(g-1)/g n per rank in 2(g-1) steps, a reduce-scatter or all-gather half that
# in g-1 steps. Inside a node every step runs on NVLink. Across nodes each step waits for the slowest hop,
# the inter-node one, and NCCL runs one ring per NIC (channel), so a group with r ranks in each node
# crosses between nodes at r NICs' worth of bandwidth (when every GPU's group communicates at once, as
# data and tensor parallelism do): a ring over 8-GPU nodes with one NIC per GPU runs at the node's
# aggregate NIC bandwidth, capped by NVLink; a group of one rank per node at one NIC's share. All-reduce
# may instead run NCCL's tree (a double binary tree across nodes, a chain inside: 2 (log2(nodes) alpha_inter
# + (r - 1) alpha_intra) of latency, 2 n over the same bandwidth); the faster of the two is taken, as
# NCCL's tuner does. Pipeline sends are one message over one GPU's share of its node's NICs.


def user_logits_bytes_per_seq(seq_len: int, vocab_size: int, elem_bytes: int) -> float:
    """Bytes per sequence that a user's loss over the gathered logits holds at its peak.

    The gathered logits (``seq x vocab`` in the model's dtype), the float32 log-softmax a
    cross entropy saves for backward (``F.cross_entropy`` upcasts as transformers' loss does),
    and the logits' gradient in the backward (model dtype): ``seq x vocab x (2 x elem + 4)``.
    """
    return float(seq_len * vocab_size * (2 * elem_bytes + 4))
