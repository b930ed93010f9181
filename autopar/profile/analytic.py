"""Closed-form profile of a decoder-only transformer, from its config alone.

This is the fast path behind ``autopar explain``: pure Python, no torch, a
1T-parameter model in milliseconds. The tests check it against the meta-device
profiler (``autopar.profile.meta``) and against the bytes autograd really saves
on CPU (and, when a GPU is present, CUDA) tensors: FLOPs within 1%, parameters
exact, saved activations within 10% (they agree to a few bytes;
docs/profiler.md has the figures).

Notation (per sequence, so b = 1): s sequence length, h hidden size, a heads,
d head dim (h/a unless the config sets head_dim), q = a x d the width of the
queries and of the attention output, kv = (key/value heads) x d the width of K
and of V, f MLP hidden size, V vocab, e bytes per element of the compute dtype,
m bytes per dropout-mask element. Every registry family is priced by these
formulas; what each family changes is data on ArchConfig (docs/families.md, "Profiling").

FLOPs follow the FlopCounterMode convention (2 per multiply-accumulate) and
count attention over the full s x s score matrix, as Narayanan et al. 2021
eq. (3) does. Backward is twice forward for matmuls (input and weight
gradients); flash-style attention recomputes QK^T in backward, 2.5x.

Activation bytes follow Korthikanti et al. 2022 §4.1 (34sbh + 5as²b for GPT in
fp16 with dropout), restated term by term for what transformers' code really
saves: GQA, gated MLPs, RMSNorm's fp32 upcast, GPT-2's tanh GELU, rotary
tables, any dtype, and the kernels (``_Kernels``). Storages are counted once,
with views charged their whole base ([Note: saved-bytes accounting] in record.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.errors import AutoparError
from autopar.families import FAMILIES
from autopar.profile.config import ArchConfig
from autopar.profile.types import AttentionCore, Gemm, LayerKind, LayerProfile, ModelProfile, Recompute, TPSplit

BWD_FLOPS_PER_FWD = 2.0
"""Backward FLOPs per forward FLOP for matmuls: dX and dW each cost one forward."""

FUSED_ATTENTION_BWD_PER_FWD = 2.5
"""Flash / memory-efficient attention backward: QK^T recomputed, then dP, dV,
dQ, dK: 5 matmuls against the forward's 2 (Dao et al. 2022, Alg. 4; torch's
``sdpa_backward_flop_count``)."""

BWD_TRAFFIC_PER_FWD = 2.0
"""Backward non-matmul bytes per forward byte: each element-wise backward reads
the saved input and the incoming gradient and writes one gradient, about twice
the read-one-write-one of the forward."""

MASK_BYTES = 1
"""A CUDA dropout mask is a bool tensor: one byte per element (``native_dropout``)."""

LOGSUMEXP_BYTES = 4
"""Flash attention keeps one fp32 log-sum-exp per query row and head."""

NORM_STAT_BYTES = 4
"""LayerNorm keeps a mean and a 1/std per row, RMSNorm a 1/rms per row, in fp32."""

RMSNORM_UPCAST_BYTES = 4
"""transformers' RMSNorm casts its input to fp32 first; the fp32 copy is what
its ``pow`` and multiply save (for fp32 models it is the input itself)."""

LOSS_DTYPE_BYTES = 4
"""transformers' ForCausalLMLoss upcasts logits to fp32; log_softmax keeps its fp32 output."""

INDEX_BYTES = 8
"""Token ids, position ids and labels are int64."""

BOOL_BYTES = 1
"""torch.bool: the vocab-parallel embedding's out-of-shard mask (``LayerProfile.tp_saved_bytes``)."""


def param_tensors(arch: ArchConfig) -> dict[str, int]:
    """Parameter tensors of one instance of each layer (``LayerProfile.param_tensors``): weights and
    biases apart, q/k/v and gate/up counted as unfused (an upper bound for fused families), norms by
    ``norm_params`` (2: weight and bias). OPT's project_in/out sit with the embedding, as its
    parameters do; a tied LM head counts its weight like its parameters (the cost model counts a tied
    layer once per rank that holds it)."""
    linear = 1 + 1  # weight, bias
    block = (3 * (linear if arch.qkv_bias else 1) + (linear if arch.out_bias else 1)
             + (3 if arch.gated_mlp else 2) * (linear if arch.mlp_bias else 1)
             + arch.block_norms * arch.norm_params + (2 if arch.qk_norm else 0))
    embedding = (1 + int(arch.learned_positions) + (arch.norm_params if arch.embedding_norm else 0)
                 + (2 if arch.embed_dim else 0))
    return {"embedding": embedding, "block": block, "final_norm": arch.norm_params, "head": 1}


MODULE_NAMES = {name: spec.module_names for name, spec in FAMILIES.items()}
"""A read-only view of the registry (autopar.families): ``model_type`` -> (embedding, block pattern,
final norm, LM head). The registry is the source; this stays for the modules that import it."""

COLUMN_PARALLEL = frozenset(
    {"c_attn", "c_fc", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "query_key_value", "dense_h_to_4h",
     "qkv_proj", "gate_up_proj", "fc1", "Wqkv"}
)
"""Linear layers (by module leaf name) Megatron-style TP splits by output
columns: weight and bias sharded, input replicated (Shoeybi et al. 2019, §3)."""

ROW_PARALLEL = frozenset({"c_proj", "o_proj", "down_proj", "dense", "dense_4h_to_h", "out_proj", "fc2"})
"""Linear layers split by input rows: weight sharded, bias replicated (added
once after the all-reduce), input sharded."""

VOCAB_PARALLEL = frozenset({"wte", "embed_tokens", "embed_in", "word_embeddings", "lm_head", "embed_out"})
"""Vocabulary tables TP shards by rows (GPT-2's position table ``wpe`` is replicated)."""

SOFTMAX_NATIVE_PROFILES = frozenset({"gpt2", "falcon"})
"""Profiles whose eager attention runs softmax in the compute dtype. Every
other one (transformers' ``eager_attention_forward``, NeoX, BLOOM, MPT) runs it
in fp32 and casts the probabilities back: the fp32 softmax output and the cast
copy are both kept."""

SOFTMAX_DTYPE_BYTES = 4
"""Bytes per element of those families' fp32 softmax output."""

MATH_SDPA_BYTES = 4
"""SDPA's unfused CPU fallback upcasts reduced-precision q, k, v to fp32 and
keeps everything it saves (q, k, v, scores, mask, dropped scores) in fp32."""

ROTARY_CAT_PROFILES = frozenset({"gpt_neox", "phi3", "nemotron"})
"""Families whose rotary embedding rebuilds q and k with ``torch.cat`` (partial
rotary): they come out head-major, and fused attention allocates its output in
q's layout (CUDA flash, CPU flash and the meta kernel alike), so the output is
copied back to (s, h) before the output projection: one more s x h tensor."""

FP32_NORM_WEIGHT_PROFILES = frozenset({"gemma", "gemma2", "gemma3_text", "olmo2"})
"""RMSNorms that multiply by the weight (Gemma's 1 + weight) in fp32 before
casting back, so the normalised tensor they keep is fp32 (Llama's casts back first)."""

PARALLEL_DROPOUT_PROFILES = frozenset({"falcon"})
"""Falcon adds attention and MLP outputs before one residual dropout (NeoX drops each out)."""


@dataclass(frozen=True)
class _Kernels:
    """How attention and dropout run, which decides what they keep for backward."""

    attention: str
    """``fused`` (flash / memory-efficient SDPA: no s x s tensor kept), ``eager``
    (transformers' matmul-softmax-matmul), or ``math`` (SDPA's unfused fallback
    on CPU under dropout, which computes in fp32)."""
    mask_bytes: int
    """Bytes per dropout-mask element."""

    @property
    def fused(self) -> bool:
        return self.attention == "fused"


def _kernels(arch: ArchConfig, attention: str, device_type: str, e: int) -> _Kernels:
    """CUDA runs SDPA fused, dropout or not, with bool masks. On CPU, dropout
    keeps a mask in the compute dtype (``at::dropout`` without the fused kernel)
    and SDPA with dropout falls back to the unfused math path."""
    cpu = device_type == "cpu"
    if attention == "eager" or not arch.sdpa:
        kind = "eager"
    else:
        kind = "math" if cpu and arch.attn_dropout > 0 else "fused"
    return _Kernels(attention=kind, mask_bytes=e if cpu else MASK_BYTES)


def _rotary_dim(arch: ArchConfig) -> int:
    """Width of the rotary cos/sin tables (0 for learned positions and ALiBi)."""
    return int(arch.head_dim * arch.rotary_fraction)


def _norm_saved(arch: ArchConfig, s: int, e: int, inputs: int = 1, norms: int = 1, width: int = 0,
                rows: int = 0) -> float:
    """Bytes ``norms`` norms of ``width`` (default hidden) keep, reading ``inputs`` distinct input tensors.

    LayerNorm keeps its input and two fp32 statistics per row. RMSNorm keeps the
    fp32 upcast of its input, the normalised tensor (before the weight; fp32 in
    Gemma's) and 1/rms per row. ``rows`` (default s) counts the rows (s x heads
    for a per-head q/k norm).
    """
    elems, rows = s * (width or arch.hidden_size), rows or s
    if arch.norm == "rmsnorm":
        normed = RMSNORM_UPCAST_BYTES if arch.profile in FP32_NORM_WEIGHT_PROFILES else e
        return norms * (elems * (RMSNORM_UPCAST_BYTES + normed) + rows * NORM_STAT_BYTES)
    return inputs * elems * e + norms * 2 * rows * NORM_STAT_BYTES


def _qk_norm_saved(arch: ArchConfig, s: int, e: int) -> float:
    """Bytes the q and k RMSNorms keep (Qwen3 and Gemma 3 per head, OLMo 2 over the whole width)."""
    if not arch.qk_norm:
        return 0.0
    per_head = arch.qk_norm == "head"
    q_rows = s * arch.num_attention_heads if per_head else s
    k_rows = s * arch.num_key_value_heads if per_head else s
    return (_norm_saved(arch, s, e, width=arch.q_width, rows=q_rows)
            + _norm_saved(arch, s, e, width=arch.kv_width, rows=k_rows))


def _mlp_saved_elems(arch: ArchConfig) -> float:
    """Elements of s x f the MLP keeps, counting the down projection's input.

    SwiGLU: gate out, up out, silu out, and their product. A single-op
    activation (gelu, relu): its input and its output. GPT-2's ``gelu_new`` is
    written out in Python and keeps x, tanh(.), 1 + tanh(.), 0.5x and the output.
    """
    if arch.gated_mlp:
        return 4.0
    if arch.activation == "relu":
        return 1.0  # ReLU keeps its output, the down projection's input: one tensor
    return 5.0 if arch.activation in ("gelu_new", "gelu_pytorch_tanh_python") else 2.0


def _qkv_saved(arch: ArchConfig, s: int, e: int, k: _Kernels) -> float:
    """Bytes of q, k, v kept for the attention's backward."""
    q, kv = arch.q_width, arch.kv_width
    if not k.fused:
        # bmm needs contiguous (b*a, s, d) operands: q, K and V are copied at
        # full head count (repeat_kv expands grouped K and V), 3 s x a x d.
        return 3 * s * q * (MATH_SDPA_BYTES if k.attention == "math" else e)
    if not arch.fused_qkv:
        if kv < q and _masked(arch, s):
            # transformers expands grouped K and V (repeat_kv) before masked SDPA: three s x a x d copies
            return 3 * s * q * e
        return s * (q + 2 * kv) * e  # rotary (or normed, scaled) q and k replace the projections' outputs; v
    fused_buffer = s * (q + 2 * kv) * e  # c_attn / query_key_value / qkv_proj output, kept by the v view
    rotary_copies = s * (q + kv) * e if _rotary_dim(arch) else 0
    return fused_buffer + rotary_copies


def attention_kinds(arch: ArchConfig) -> set[str]:
    """The attention kinds of the layers (``full_attention``, ``sliding_attention``), as transformers sets them."""
    raw = arch.raw or {}
    if raw.get("layer_types"):
        return set(raw["layer_types"])
    if arch.spec.sliding_window_all and raw.get("sliding_window"):
        return {"sliding_attention"}
    if arch.profile == "gemma2":  # alternating, from layer 0
        return {"sliding_attention", "full_attention"} if arch.num_layers > 1 else {"sliding_attention"}
    if arch.profile == "gemma3_text":  # five sliding then one full (sliding_window_pattern 6)
        return {"sliding_attention", "full_attention"} if arch.num_layers >= 6 else {"sliding_attention"}
    return {"full_attention"}


def _masked(arch: ArchConfig, s: int) -> bool:
    """Some layer's SDPA gets an explicit mask: a sliding window shorter than the sequence.

    [Note: one block for all layers] The profile has one block entry, so when
    only some layers slide (Gemma 2 and 3) every block is priced as a masked one.
    """
    window = (arch.raw or {}).get("sliding_window")
    return bool(window) and s > window and "sliding_attention" in attention_kinds(arch)


def _core_saved(arch: ArchConfig, s: int, e: int, k: _Kernels) -> float:
    """Bytes the attention core (softmax(QK^T)V) keeps beyond q, k, v: what
    selective recomputation drops (Korthikanti et al. 2022 §4.3)."""
    a = arch.num_attention_heads
    if k.fused:
        return a * s * LOGSUMEXP_BYTES
    scores = a * s * s
    if k.attention == "math":
        return scores * MATH_SDPA_BYTES * (3 if arch.attn_dropout > 0 else 1)  # probs (+ mask, dropped)
    upcast = arch.profile not in SOFTMAX_NATIVE_PROFILES and e < SOFTMAX_DTYPE_BYTES
    softmax = scores * (SOFTMAX_DTYPE_BYTES if upcast else e)  # kept by softmax's backward
    softmax += scores * e if _softcapped(arch, "attn_logit_softcapping") else 0  # tanh keeps its output
    if arch.attn_dropout > 0:
        return softmax + scores * (k.mask_bytes + e)  # + mask, dropped probs: Korthikanti's 5as²b in fp16
    return softmax + (scores * e if upcast else 0)  # PV keeps the probabilities cast back, if they were


def _block_saved(arch: ArchConfig, s: int, e: int, k: _Kernels) -> tuple[TPSplit, float]:
    """(bytes saved by one block with no recomputation, the core's part of them).

    Replicated under TP: norm inputs, inputs of the column-parallel linears
    (QKV, MLP in), residual dropout masks. Sharded: the rest.
    """
    sh = s * arch.hidden_size
    norms = _norm_saved(arch, s, e, inputs=arch.norm_inputs, norms=arch.block_norms)
    masks = _resid_masks(arch) * sh * k.mask_bytes if arch.resid_dropout > 0 else 0
    replicated = norms + _linear_inputs(arch) * sh * e + masks
    # The o_proj input; a fused kernel also keeps its output, the same storage
    # unless q was head-major (ROTARY_CAT_PROFILES).
    copies = 2 if k.fused and arch.profile in ROTARY_CAT_PROFILES else 1
    core = _core_saved(arch, s, e, k)
    mlp = _mlp_saved_elems(arch) * s * arch.ffn_hidden_size * e
    sharded = _qkv_saved(arch, s, e, k) + _qk_norm_saved(arch, s, e) + core + copies * s * arch.q_width * e + mlp
    return TPSplit(replicated, sharded), core


def _linear_inputs(arch: ArchConfig) -> int:
    """The q/k/v and MLP-in projections' inputs a block saves (one tensor when one norm feeds both, Falcon-7B)."""
    return 1 if arch.block_norms == 1 else 2


def _resid_masks(arch: ArchConfig) -> int:
    """Residual dropouts in a block (their masks are kept)."""
    return 1 if arch.parallel_residual and arch.profile in PARALLEL_DROPOUT_PROFILES else 2


def _block_params(arch: ArchConfig) -> TPSplit:
    """Column-parallel weights and biases sharded; row-parallel weights sharded,
    their biases replicated (Megatron-LM); norms replicated."""
    h, f, q, kv = arch.hidden_size, arch.ffn_hidden_size, arch.q_width, arch.kv_width
    sharded, replicated = block_matmul_weights(arch), arch.block_norms * arch.norm_params * h
    # q/k norms: one weight per head dim shared by all heads (Qwen3, Gemma 3), or
    # one per element of the projected width (OLMo 2); replicated as meta counts them.
    replicated += {"head": 2 * arch.head_dim, "width": q + kv}.get(arch.qk_norm, 0)
    if arch.qkv_bias:
        sharded += q + 2 * kv
    if arch.out_bias:
        replicated += h
    if arch.mlp_bias:
        sharded += (2 if arch.gated_mlp else 1) * f
        replicated += h
    return TPSplit(replicated, sharded)


def block_matmul_weights(arch: ArchConfig) -> int:
    """Weights (no biases) of one block's linear layers: what the matmuls multiply.

    q_proj h x (a d), k_proj and v_proj h x (kv d) each (fused or not: the same
    weights), o_proj (a d) x h, and two (gate|up, down) or three MLP matrices."""
    h, f, q, kv = arch.hidden_size, arch.ffn_hidden_size, arch.q_width, arch.kv_width
    return h * (q + 2 * kv) + q * h + (3 if arch.gated_mlp else 2) * h * f


def block_gemms(arch: ArchConfig, s: int) -> tuple[Gemm, ...]:
    """The block's weight matmuls by shape, as :func:`block_matmul_weights` counts them: q/k/v (fused or
    not, one column-parallel product of width q + 2 kv), the output projection (row-parallel), the MLP in
    (gate and up as one product when gated) and out. Their FLOPs are 2 s x block_matmul_weights."""
    h, f, q, kv = arch.hidden_size, arch.ffn_hidden_size, arch.q_width, arch.kv_width
    mlp_in = (2 if arch.gated_mlp else 1) * f
    return (Gemm(s, h, q + 2 * kv, "cols"), Gemm(s, q, h, "inner"), Gemm(s, h, mlp_in, "cols"),
            Gemm(s, f, h, "inner"))


def _block(arch: ArchConfig, s: int, e: int, k: _Kernels, names: tuple[str, ...]) -> LayerProfile:
    """One block, standing for the run of identical ``names``."""
    sh, f = s * arch.hidden_size, arch.ffn_hidden_size
    core_fwd = 2 * 2 * s * s * arch.q_width  # QK^T and PV, each 2*s*s*d per head
    linear_fwd = 2 * s * block_matmul_weights(arch)
    fwd_flops = TPSplit(0.0, linear_fwd + core_fwd)
    core_bwd_ratio = FUSED_ATTENTION_BWD_PER_FWD if k.fused else BWD_FLOPS_PER_FWD
    bwd_flops = TPSplit(0.0, BWD_FLOPS_PER_FWD * linear_fwd + core_bwd_ratio * core_fwd)
    none, core_saved = _block_saved(arch, s, e, k)
    core_traffic = _core_traffic(arch, s, e, k)
    masks = _resid_masks(arch) * sh * k.mask_bytes if arch.resid_dropout > 0 else 0
    # Non-matmul traffic, forward: each norm reads and writes s*h; each
    # residual (+ dropout) reads two and writes one; the activation reads and
    # writes the MLP hidden (twice for a gated MLP's multiply).
    fwd_traffic = TPSplit((2 * arch.block_norms + 2 * 3) * sh * e + masks,
                          (4 if arch.gated_mlp else 2) * s * f * e + core_traffic)
    return LayerProfile(
        kind=LayerKind.BLOCK, module_names=names, params=_block_params(arch),
        fwd_flops=fwd_flops, bwd_flops=bwd_flops,
        fwd_traffic_bytes=fwd_traffic, bwd_traffic_bytes=fwd_traffic.scale(BWD_TRAFFIC_PER_FWD),
        activation_bytes={
            Recompute.NONE: none,
            Recompute.SELECTIVE: TPSplit(none.replicated, none.sharded - core_saved),
            Recompute.FULL: TPSplit(sh * e, 0.0),  # only the block input is kept
        },
        recompute_flops={Recompute.NONE: TPSplit(), Recompute.SELECTIVE: TPSplit(0.0, core_fwd),
                         Recompute.FULL: fwd_flops},
        recompute_traffic_bytes={Recompute.NONE: TPSplit(), Recompute.SELECTIVE: TPSplit(0.0, core_traffic),
                                 Recompute.FULL: fwd_traffic},
        output_bytes=sh * e,
        tp_allreduce_bytes=2 * sh * e,  # after attention and after the MLP
        # Under sequence parallelism the q/k/v and MLP-in inputs are the all-gathered tensors, kept whole;
        # selective recomputation checkpoints the attention (its gather included), full the whole block.
        sp_gathered_bytes={Recompute.NONE: _linear_inputs(arch) * sh * e,
                           Recompute.SELECTIVE: (_linear_inputs(arch) - 1) * sh * e},
        param_tensors=param_tensors(arch)["block"],
        gemms=block_gemms(arch, s),
        attention=AttentionCore(heads=arch.num_attention_heads, seq_len=s, head_dim=arch.head_dim,
                                kernel="fused" if k.fused else "eager"),
    )


def _core_traffic(arch: ArchConfig, s: int, e: int, k: _Kernels) -> float:
    """Forward bytes moved by the attention core outside matmuls."""
    if k.fused:
        return 0.0  # scores stay in on-chip memory
    scores = arch.num_attention_heads * s * s
    # QK^T writes the scores, softmax reads and writes them, dropout reads,
    # writes and stores its mask, PV reads them: Megatron's fused kernels.
    if arch.attn_dropout > 0:
        return scores * e * 5 + scores * k.mask_bytes
    return scores * e * 3


def _simple(kind: LayerKind, name: str, params: TPSplit, saved: dict[Recompute, TPSplit], traffic: TPSplit,
            output_bytes: float, fwd_flops: TPSplit = TPSplit(), tied_to: str | None = None,
            tp_allreduce_bytes: float = 0.0, sp_gathered_bytes: dict | None = None,
            gemms: tuple[Gemm, ...] = (), **extra) -> LayerProfile:
    """A layer that is not a block: no recomputation applies to it."""
    zero = {m: TPSplit() for m in Recompute}
    return LayerProfile(
        kind=kind, module_names=(name,), params=params, fwd_flops=fwd_flops,
        bwd_flops=fwd_flops.scale(BWD_FLOPS_PER_FWD), fwd_traffic_bytes=traffic,
        bwd_traffic_bytes=traffic.scale(BWD_TRAFFIC_PER_FWD),
        activation_bytes=saved, recompute_flops=zero,
        recompute_traffic_bytes=zero, output_bytes=output_bytes, tied_to=tied_to,
        tp_allreduce_bytes=tp_allreduce_bytes, sp_gathered_bytes=sp_gathered_bytes or {}, gemms=gemms,
        **extra,
    )


def _embedding_saved(arch: ArchConfig, s: int, e: int, attention: str,
                     k: _Kernels) -> tuple[dict[Recompute, TPSplit], dict[Recompute, float]]:
    """Token ids (and the position ids of a learned table), the dropout mask,
    BLOOM's embedding LayerNorm and OPT's project_in inputs, and the tensors the
    model builds once and hands to every block: rotary cos/sin (saved by each
    block's multiply, or held by each checkpoint), and under full recomputation
    also the position ids and eager attention's s x s mask, which the
    checkpoints hold as arguments. Second: of those, the integer indices (ids), for each mode."""
    sh = s * arch.hidden_size
    ids = s * INDEX_BYTES * (2 if arch.learned_positions else 1)
    mask = sh * k.mask_bytes if arch.embd_dropout > 0 else 0
    # cos and sin, one pair per rotary kind (Gemma 3: local and global)
    rotary = 2 * s * _rotary_dim(arch) * e * (len(attention_kinds(arch)) if arch.profile == "gemma3_text" else 1)
    norm = _norm_saved(arch, s, e) if arch.embedding_norm else 0
    project_in = s * arch.embed_dim * e
    # Falcon's ALiBi reaches SDPA as one float (heads, s, s) bias, built once and kept by every block's attention.
    alibi = arch.num_attention_heads * s * s * e if arch.profile == "falcon" and not arch.rotary_fraction else 0
    base = TPSplit(ids + mask + rotary + norm + project_in + alibi, 0.0)
    eager = attention == "eager" or not arch.sdpa
    held_ids = s * INDEX_BYTES if rotary else 0
    held_args = held_ids + (s * s * e * len(attention_kinds(arch)) if eager else 0)
    full = TPSplit(base.replicated + held_args, 0.0)
    return ({Recompute.NONE: base, Recompute.SELECTIVE: base, Recompute.FULL: full},
            {Recompute.NONE: ids, Recompute.SELECTIVE: ids, Recompute.FULL: ids + held_ids})


def _embedding(arch: ArchConfig, s: int, e: int, attention: str, k: _Kernels) -> LayerProfile:
    """Token embedding, plus learned positions, BLOOM's LayerNorm and OPT's
    project_in and project_out (all their parameters sit here, as meta counts
    them; project_out's FLOPs are the final norm's, where it runs)."""
    h, sh, wp = arch.hidden_size, s * arch.hidden_size, arch.embed_dim
    positions = h * (arch.max_position_embeddings + arch.position_offset) if arch.learned_positions else 0
    extras = positions + (arch.norm_params * h if arch.embedding_norm else 0) + 2 * wp * h
    embd_mask = sh * k.mask_bytes if arch.embd_dropout > 0 else 0
    saved, index = _embedding_saved(arch, s, e, attention, k)
    return _simple(
        LayerKind.EMBEDDING, arch.spec.embedding, TPSplit(extras, arch.vocab_size * arch.token_width),
        saved,
        TPSplit((3 if arch.learned_positions else 1) * sh * e + embd_mask, 0.0), sh * e,
        fwd_flops=TPSplit(2.0 * s * wp * h, 0.0),  # project_in: s x wp @ wp x h
        tp_allreduce_bytes=sh * e,  # vocab-parallel embedding sums partial lookups
        gemms=(Gemm(s, wp, h),) if wp else (),
        index_bytes=index, tp_saved_bytes=s * BOOL_BYTES, param_tensors=param_tensors(arch)["embedding"],
    )


def _final_norm(arch: ArchConfig, s: int, e: int) -> LayerProfile:
    """The final norm (and OPT's project_out, which runs after it and keeps its input)."""
    sh, wp = s * arch.hidden_size, arch.embed_dim
    saved = TPSplit(_norm_saved(arch, s, e) + (sh * e if wp else 0), 0.0)
    return _simple(LayerKind.FINAL_NORM, arch.spec.final_norm, TPSplit(arch.norm_params * arch.hidden_size, 0.0),
                   {m: saved for m in Recompute}, TPSplit(2 * sh * e, 0.0), s * arch.token_width * e,
                   fwd_flops=TPSplit(2.0 * sh * wp, 0.0), gemms=(Gemm(s, arch.hidden_size, wp),) if wp else (),
                   param_tensors=param_tensors(arch)["final_norm"])


SOFTCAP_DEFAULTS = {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}
"""Gemma 2's caps when its config names none (Gemma 3's default is no cap)."""


def _softcapped(arch: ArchConfig, key: str = "final_logit_softcapping") -> bool:
    """Logits (or attention scores) are soft-capped, ``cap * tanh(x / cap)``: Gemma 2 by default, Gemma 3 when set."""
    if arch.profile not in ("gemma2", "gemma3_text"):
        return False
    default = SOFTCAP_DEFAULTS[key] if arch.profile == "gemma2" else None
    return (arch.raw or {}).get(key, default) is not None


def _head(arch: ArchConfig, s: int, e: int) -> LayerProfile:
    """LM head: x @ W^T (2 s w V FLOPs, w the head's input width) keeps x; the
    loss keeps the labels and log_softmax's fp32 output, soft-capping its tanh
    output (vocab-parallel, so sharded)."""
    V, w = arch.vocab_size, arch.token_width
    logits_f32 = s * V * LOSS_DTYPE_BYTES
    head_saved = TPSplit(s * w * e + s * INDEX_BYTES, logits_f32 + (s * V * e if _softcapped(arch) else 0))
    return _simple(
        LayerKind.LM_HEAD, arch.spec.head, TPSplit(0.0, V * w), {m: head_saved for m in Recompute},
        TPSplit(0.0, s * V * e + 4 * logits_f32), 4.0,  # output: the scalar loss
        fwd_flops=TPSplit(0.0, 2.0 * s * w * V),
        tied_to=arch.spec.embedding if arch.tie_word_embeddings else None,
        sp_gathered_bytes={m: s * w * e for m in Recompute},  # the head's input, all-gathered under SP
        gemms=(Gemm(s, w, V, "cols"),),
        index_bytes={m: s * INDEX_BYTES for m in Recompute},  # the labels
        call_saved_bytes=LOSS_DTYPE_BYTES, param_tensors=param_tensors(arch)["head"],
    )


def _check(arch: ArchConfig, seq_len: int, dtype_bytes: int, attention: str, device_type: str) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise AutoparError(f"seq_len={seq_len!r} must be a positive integer number of tokens")
    if arch.learned_positions and seq_len > arch.max_position_embeddings:
        raise AutoparError(
            f"seq_len={seq_len} exceeds {arch.name!r}'s learned position table "
            f"({arch.max_position_embeddings} positions); use seq_len <= {arch.max_position_embeddings}")
    if dtype_bytes not in (1, 2, 4, 8):
        raise AutoparError(f"dtype_bytes={dtype_bytes!r} must be 1, 2, 4 or 8 (2 for bf16)")
    if attention not in ("sdpa", "eager"):
        raise AutoparError(f"attention={attention!r} is not supported; pass 'sdpa' or 'eager'")
    if device_type not in ("cuda", "cpu"):
        raise AutoparError(f"device_type={device_type!r} is not supported; pass 'cuda' or 'cpu'")


def profile_analytic(arch: ArchConfig, *, seq_len: int, dtype_bytes: int = 2,
                     attention: str = "sdpa", device_type: str = "cuda") -> ModelProfile:
    """Profile ``arch`` for one sequence of ``seq_len`` tokens.

    Args:
        arch: the model's shape.
        seq_len: tokens per sequence.
        dtype_bytes: bytes per element of weights and activations (2 for bf16).
        attention: ``sdpa`` (flash-style, no s x s scores kept) or ``eager``.
        device_type: whose kernels: ``cuda`` (the default, what plans are for)
            or ``cpu`` (float dropout masks, unfused SDPA under dropout), which
            the tests use to compare with real CPU runs.

    Raises:
        AutoparError: an argument is out of range.
    """
    _check(arch, seq_len, dtype_bytes, attention, device_type)
    s, e = seq_len, dtype_bytes
    k = _kernels(arch, attention, device_type, e)
    block_names = tuple(arch.spec.blocks.format(i) for i in range(arch.num_layers))
    layers = (_embedding(arch, s, e, attention, k), _block(arch, s, e, k, block_names), _final_norm(arch, s, e),
              _head(arch, s, e))
    return ModelProfile(
        name=arch.name, architecture=arch.architecture, seq_len=s, hidden_size=arch.hidden_size,
        num_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, vocab_size=arch.vocab_size, dtype_bytes=e,
        layers=layers, source="analytic", ffn_hidden_size=arch.ffn_hidden_size,
        notes=(f"attention={attention}", f"kernels={device_type}"),
    )
