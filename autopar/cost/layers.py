"""Per-layer costs on one device, for one sequence, under a TP layout.

The profile gives FLOPs and bytes; this turns them into seconds on a device
(a roofline per layer: matmul FLOPs over the achieved matmul rate, plus the
non-matmul bytes over the achieved memory bandwidth) and into bytes held on
the device. Everything is per sequence: a micro-batch of b sequences costs b
times the compute and memory (the collectives' latency terms excepted).
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.cluster import ClusterSpec
from autopar.cost import constants as C
from autopar.profile.types import LayerKind, ModelProfile, Recompute


@dataclass(frozen=True, kw_only=True)
class CostOptions:
    """Knobs of the cost model; the defaults are autopar's own executor."""

    gemm_efficiency: float = C.GEMM_EFFICIENCY
    memory_efficiency: float = C.MEMORY_EFFICIENCY
    collective_efficiency: float = C.COLLECTIVE_EFFICIENCY
    p2p_efficiency: float = C.P2P_EFFICIENCY
    overlap_dp_comm: bool = C.OVERLAP_DP_COMM
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
    work_bytes: float
    """Extra bytes alive while this layer's backward runs (recomputed activations)."""
    output_bytes: float
    tied_to: str | None


def _seconds(flops: float, traffic: float, cluster: ClusterSpec, opts: CostOptions) -> float:
    dev = cluster.device
    return flops / (dev.peak_flops_per_s * opts.gemm_efficiency) + traffic / (
        dev.hbm_bytes_per_s * opts.memory_efficiency)


def layer_costs(profile: ModelProfile, cluster: ClusterSpec, *, tp: int, sequence_parallel: bool,
                recompute: Recompute, opts: CostOptions) -> list[LayerCost]:
    """Costs of every layer instance, in model order."""
    sp = sequence_parallel and tp > 1
    out = []
    for layer in profile.layers:
        fwd_s = _seconds(layer.fwd_flops.at(tp), layer.fwd_traffic_bytes.at(tp, sp), cluster, opts)
        bwd_s = _seconds(layer.bwd_flops.at(tp) + layer.recompute_flops[recompute].at(tp),
                         layer.bwd_traffic_bytes.at(tp, sp) + layer.recompute_traffic_bytes[recompute].at(tp, sp),
                         cluster, opts)
        measured = [(f, b) for t, f, b in opts.measured_block_s if t == tp]
        if measured and layer.kind is LayerKind.BLOCK:
            fwd_s, bwd_s = _measured(layer, recompute, measured[0], tp)
        # Full recomputation repeats the forward's collectives in backward.
        passes = 3 if (recompute is Recompute.FULL and layer.kind is LayerKind.BLOCK) else 2
        tp_bytes = layer.tp_allreduce_bytes * passes if tp > 1 else 0.0
        collectives = 0 if tp_bytes == 0 else passes * max(1, round(layer.tp_allreduce_bytes / layer.output_bytes))
        act = layer.activation_bytes[recompute].at(tp, sp)
        work = 0.0
        if recompute is not Recompute.NONE:
            work = layer.activation_bytes[Recompute.NONE].at(tp, sp) - act
        if layer.kind is LayerKind.LM_HEAD:
            work = act  # the gradient of the fp32 logits is as large as the saved log-probs
        for name in layer.module_names:
            out.append(LayerCost(
                name=name, kind=layer.kind, fwd_s=fwd_s, bwd_s=bwd_s, tp_bytes=tp_bytes,
                tp_collectives=collectives, params=layer.params.at(tp), act_bytes=act, work_bytes=work,
                output_bytes=layer.output_bytes, tied_to=layer.tied_to,
            ))
    return out


def _measured(layer, recompute: Recompute, measured: tuple[float, float], tp: int) -> tuple[float, float]:
    """Measured block (forward, backward) seconds; recomputation adds its FLOP share of the forward."""
    m_fwd, m_bwd = measured
    share = layer.recompute_flops[recompute].at(tp) / max(layer.fwd_flops.at(tp), 1.0)
    return m_fwd, m_bwd + share * m_fwd


def collective_s(num_bytes: float, group: int, calls: int, inter_node: bool, cluster: ClusterSpec,
                 efficiency: float, kind: str = "all_reduce") -> float:
    """Ring collective time (alpha-beta model, Thakur et al. 2005; NCCL rings).

    An all-reduce of n bytes over g ranks moves 2(g-1)/g * n bytes per rank in
    2(g-1) steps; a reduce-scatter or all-gather moves half that in g-1 steps.
    """
    if group <= 1 or (num_bytes <= 0 and calls <= 0):
        return 0.0
    latency, bandwidth = cluster.link(inter_node)
    steps = 2 * (group - 1) if kind == "all_reduce" else group - 1
    volume = num_bytes * steps / group
    return calls * steps * latency + volume / (bandwidth * efficiency)


def user_logits_bytes_per_seq(seq_len: int, vocab_size: int, elem_bytes: int) -> float:
    """Bytes per sequence that a user's loss over the gathered logits holds at its peak.

    The gathered logits (``seq x vocab`` in the model's dtype), the float32 log-softmax a
    cross entropy saves for backward (``F.cross_entropy`` upcasts as transformers' loss does),
    and the logits' gradient in the backward (model dtype): ``seq x vocab x (2 x elem + 4)``.
    """
    return float(seq_len * vocab_size * (2 * elem_bytes + 4))
