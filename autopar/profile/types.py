"""autopar's view of a model: the typed output of profiling.

All quantities are for ONE sequence (micro-batch size 1) at the profiled
sequence length; everything a layer does scales linearly with the number of
sequences, so the cost model multiplies by the micro-batch size.

Quantities that tensor parallelism divides are kept apart from those it
replicates, as a :class:`TPSplit`, so one profile serves every TP degree:
``value(tp) = replicated + sharded / tp``. Under sequence parallelism
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", §4.2.2) the replicated activations and element-wise work
are also divided by ``tp``.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field


class Recompute(str, enum.Enum):
    """Activation recomputation modes (Korthikanti et al. 2022 §4)."""

    NONE = "none"
    SELECTIVE = "selective"  # recompute the attention core only (§4.3)
    FULL = "full"  # keep each block's input, recompute the block in backward


class LayerKind(str, enum.Enum):
    EMBEDDING = "embedding"
    BLOCK = "block"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"  # the output projection and the loss


@dataclass(frozen=True)
class TPSplit:
    """A quantity split into the part TP replicates and the part TP shards."""

    replicated: float = 0.0
    sharded: float = 0.0

    def at(self, tp: int, sequence_parallel: bool = False) -> float:
        """Per-device value under ``tp``-way tensor parallelism."""
        if sequence_parallel:
            return (self.replicated + self.sharded) / tp
        return self.replicated + self.sharded / tp

    @property
    def total(self) -> float:
        return self.replicated + self.sharded

    def __add__(self, other: "TPSplit") -> "TPSplit":
        return TPSplit(self.replicated + other.replicated, self.sharded + other.sharded)

    def scale(self, factor: float) -> "TPSplit":
        return TPSplit(self.replicated * factor, self.sharded * factor)


@dataclass(frozen=True)
class Gemm:
    """One matmul shape of a layer's forward for one sequence: ``count`` products of
    (``rows`` x ``inner``) @ (``inner`` x ``cols``), 2 x rows x inner x cols FLOPs each.

    The cost model prices it by its shape (autopar.cost.kernels): under a micro-batch of b sequences
    the token dimension (``rows``) grows to b x rows; backward runs the two gradient products
    (dX: rows x cols x inner, dW: inner x rows x cols) of the same size.
    """

    rows: int
    """Tokens of one sequence (the M dimension)."""
    inner: int
    """The reduced dimension (K)."""
    cols: int
    """The output width (N)."""
    tp_dim: str = ""
    """Which dimension tensor parallelism divides: ``cols`` (column-parallel and vocab-parallel),
    ``inner`` (row-parallel), or ``""`` (replicated)."""
    count: int = 1


@dataclass(frozen=True)
class AttentionCore:
    """The attention core of a block, softmax(Q K^T) V, for one sequence: priced by its own kernel
    model (autopar.cost.kernels), not as a weight matmul."""

    heads: int
    """Query heads (tensor parallelism divides them)."""
    seq_len: int
    head_dim: int
    kernel: str
    """``fused`` (flash / memory-efficient SDPA: tiles in on-chip memory, causal blocks skipped) or
    ``eager`` (two batched matmuls around a materialised softmax, whose traffic the profile counts)."""


@dataclass(frozen=True, kw_only=True)
class LayerProfile:
    """One layer (or a run of identical layers) of the model, per sequence.

    ``module_names`` holds one name per repeat, exactly as ``named_modules()``
    spells it (a run of 96 identical blocks is one LayerProfile with 96 names).
    """

    kind: LayerKind
    module_names: tuple[str, ...]
    params: TPSplit
    """Parameter count of one instance (not bytes)."""
    fwd_flops: TPSplit
    """Forward FLOPs (matmul-like ops, FlopCounterMode convention: 2 per MAC)."""
    bwd_flops: TPSplit
    """Backward FLOPs (about 2x forward for matmuls)."""
    fwd_traffic_bytes: TPSplit
    """Bytes read and written by the forward's non-matmul ops (memory-bound work)."""
    bwd_traffic_bytes: TPSplit
    """The same for the backward."""
    activation_bytes: dict[Recompute, TPSplit]
    """Bytes saved for backward by one forward, for each recomputation mode."""
    recompute_flops: dict[Recompute, TPSplit]
    """Extra forward FLOPs spent in backward by each recomputation mode."""
    recompute_traffic_bytes: dict[Recompute, TPSplit]
    """Extra non-matmul bytes spent in backward by each recomputation mode."""
    output_bytes: float
    """Bytes of this layer's output: what crosses a stage boundary after it."""
    tp_allreduce_bytes: float = 0.0
    """Bytes all-reduced across the TP group per forward (the same again in
    backward; under sequence parallelism each becomes a reduce-scatter plus an
    all-gather of the same total volume)."""
    tied_to: str | None = None
    """Module name whose weight this layer shares (GPT-2's lm_head <- wte)."""
    sp_gathered_bytes: dict[Recompute, float] = field(default_factory=dict)
    """Of ``activation_bytes``' replicated part, for each recomputation mode: the bytes sequence
    parallelism does not split. torch's ``PrepareModuleInput`` (and the LM head's ``ColwiseParallel``)
    all-gather the sequence-sharded input and the column-parallel linears save the gathered tensor
    (Megatron-LM instead keeps the shard and gathers again in backward; Korthikanti et al. 2022 §4.2.2
    price that). Absent modes: nothing."""
    index_bytes: dict[Recompute, float] = field(default_factory=dict)
    """Of ``activation_bytes``' replicated part, for each recomputation mode: integer indices (token and
    position ids, labels), which every rank of a TP group keeps whole, sequence parallel or not. Absent
    modes: nothing."""
    tp_saved_bytes: float = 0.0
    """Bytes one sequence saves only under tensor parallelism, whole on every rank of the group: the
    vocab-parallel embedding's out-of-shard mask (torch's ``MaskPartial``, one bool a token)."""
    call_saved_bytes: float = 0.0
    """Bytes saved once per micro-batch whatever its size: the loss's fp32 normaliser (transformers'
    loss divides its sum by ``num_items_in_batch``, a 0-dim tensor autograd keeps)."""
    param_tensors: int = 0
    """Parameter tensors of one instance (weights and biases counted apart; fused projections counted
    as if unfused, an upper bound): each carries AdamW's ``step`` counter."""
    gemms: tuple[Gemm, ...] = ()
    """The weight matmuls of one forward, by shape (their FLOPs are ``fwd_flops`` less the attention
    core's); empty: priced at the device's best matmul rate."""
    attention: AttentionCore | None = None
    """The block's attention core, or None."""

    @property
    def count(self) -> int:
        return len(self.module_names)


@dataclass(frozen=True, kw_only=True)
class ModelProfile:
    """Ordered layers of a causal LM: embedding, blocks, final norm, LM head."""

    name: str
    architecture: str
    """The transformers architecture class, e.g. ``GPT2LMHeadModel``."""
    seq_len: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    dtype_bytes: int
    """Bytes per element of parameters and activations in the compute dtype."""
    layers: tuple[LayerProfile, ...]
    ffn_hidden_size: int = 0
    """MLP width (TP must divide it as it divides the heads); 0 if unknown."""
    source: str = "analytic"
    """How it was obtained: ``analytic``, ``meta`` or ``measured``."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_params(self) -> int:
        """Distinct parameters (a tied weight counted once)."""
        total = 0
        for layer in self.layers:
            if layer.tied_to is None:
                total += int(layer.params.total) * layer.count
        return total

    def flat_layers(self) -> list[tuple[str, LayerProfile]]:
        """(module name, profile) per layer instance, in model order."""
        return [(name, layer) for layer in self.layers for name in layer.module_names]

    def model_flops_per_seq(self) -> float:
        """Model FLOPs of one training sequence: 3 x forward, the MFU convention
        (Chowdhery et al. 2022, PaLM, App. B). Flash attention's recomputation
        in backward and activation recomputation are hardware FLOPs, not model FLOPs."""
        return 3 * sum(l.fwd_flops.total * l.count for l in self.layers)

    def hardware_flops_per_seq(self, recompute: "Recompute") -> float:
        """FLOPs executed for one training sequence: forward, backward and recomputation."""
        return sum((l.fwd_flops.total + l.bwd_flops.total + l.recompute_flops[recompute].total) * l.count
                   for l in self.layers)

    def to_dict(self) -> dict:
        return asdict(self)
