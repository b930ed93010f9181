"""Closed-form profile of a decoder-only transformer, from its config alone.

This is the fast path behind ``autopar explain``: pure Python, no torch, a
1T-parameter model in milliseconds. The tests check it against the meta-device
profiler (``autopar.profile.meta``) and against the bytes autograd really saves
on CPU (and, when a GPU is present, CUDA) tensors: FLOPs within 1%, parameters
exact, saved activations within 10% (they agree to a few bytes;
docs/profiler.md has the figures).

Notation (per sequence, so b = 1): s sequence length, h hidden size, a heads,
kv = (key/value heads) x d the width of K and of V, d = h/a head dim, f MLP
hidden size, V vocab, e bytes per element of the compute dtype, m bytes per
dropout-mask element.

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
from autopar.profile.config import ArchConfig
from autopar.profile.types import LayerKind, LayerProfile, ModelProfile, Recompute, TPSplit

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

MODULE_NAMES = {
    "gpt2": ("transformer.wte", "transformer.h.{}", "transformer.ln_f", "lm_head"),
    "llama": ("model.embed_tokens", "model.layers.{}", "model.norm", "lm_head"),
    "gpt_neox": ("gpt_neox.embed_in", "gpt_neox.layers.{}", "gpt_neox.final_layer_norm", "lm_head"),
}
"""(embedding, block pattern, final norm, LM head) as transformers 5 names them."""

COLUMN_PARALLEL = frozenset(
    {"c_attn", "c_fc", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "query_key_value", "dense_h_to_4h"}
)
"""Linear layers (by module leaf name) Megatron-style TP splits by output
columns: weight and bias sharded, input replicated (Shoeybi et al. 2019, §3)."""

ROW_PARALLEL = frozenset({"c_proj", "o_proj", "down_proj", "dense", "dense_4h_to_h"})
"""Linear layers split by input rows: weight sharded, bias replicated (added
once after the all-reduce), input sharded."""

VOCAB_PARALLEL = frozenset({"wte", "embed_tokens", "embed_in", "lm_head"})
"""Vocabulary tables TP shards by rows (GPT-2's position table ``wpe`` is replicated)."""

SOFTMAX_FP32_FAMILIES = frozenset({"llama", "gpt_neox"})
"""Families whose eager attention runs softmax in fp32 and casts the
probabilities back: the fp32 softmax output and the cast copy are both kept."""

SOFTMAX_DTYPE_BYTES = 4
"""Bytes per element of those families' fp32 softmax output."""

MATH_SDPA_BYTES = 4
"""SDPA's unfused CPU fallback upcasts reduced-precision q, k, v to fp32 and
keeps everything it saves (q, k, v, scores, mask, dropped scores) in fp32."""

ROTARY_CAT_FAMILIES = frozenset({"gpt_neox"})
"""Families whose rotary embedding rebuilds q and k with ``torch.cat`` (partial
rotary): they come out head-major, and fused attention allocates its output in
q's layout (CUDA flash, CPU flash and the meta kernel alike), so the output is
copied back to (s, h) before the output projection: one more s x h tensor."""


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
    if attention == "eager":
        kind = "eager"
    else:
        kind = "math" if cpu and arch.attn_dropout > 0 else "fused"
    return _Kernels(attention=kind, mask_bytes=e if cpu else MASK_BYTES)


def _rotary_dim(arch: ArchConfig) -> int:
    """Width of the rotary cos/sin tables (0 for learned positions)."""
    if arch.family == "gpt2":
        return 0
    raw = arch.raw or {}
    default = 0.25 if arch.family == "gpt_neox" else 1.0
    fraction = raw.get("rotary_pct", raw.get("partial_rotary_factor", default))
    return int(arch.head_dim * fraction)


def _norm_saved(arch: ArchConfig, s: int, e: int, inputs: int = 1, norms: int = 1) -> float:
    """Bytes ``norms`` norms keep, reading ``inputs`` distinct input tensors.

    LayerNorm keeps its input and two fp32 statistics per row. RMSNorm keeps the
    fp32 upcast of its input, the normalised tensor (before the weight) and
    1/rms per row.
    """
    sh = s * arch.hidden_size
    if arch.norm == "rmsnorm":
        return norms * (sh * RMSNORM_UPCAST_BYTES + sh * e + s * NORM_STAT_BYTES)
    return inputs * sh * e + norms * 2 * s * NORM_STAT_BYTES


def _mlp_saved_elems(arch: ArchConfig) -> float:
    """Elements of s x f the MLP keeps, counting the down projection's input.

    SwiGLU: gate out, up out, silu out, and their product. A single-op
    activation (gelu, relu): its input and its output. GPT-2's ``gelu_new`` is
    written out in Python and keeps x, tanh(.), 1 + tanh(.), 0.5x and the output.
    """
    if arch.gated_mlp:
        return 4.0
    return 5.0 if arch.activation in ("gelu_new", "gelu_pytorch_tanh_python") else 2.0


def _qkv_saved(arch: ArchConfig, s: int, e: int, k: _Kernels) -> float:
    """Bytes of q, k, v kept for the attention's backward."""
    h, kv = arch.hidden_size, arch.num_key_value_heads * arch.head_dim
    if not k.fused:
        # bmm needs contiguous (b*a, s, d) operands: q, K and V are copied at
        # full head count (repeat_kv expands grouped K and V), 3sh.
        return 3 * s * h * (MATH_SDPA_BYTES if k.attention == "math" else e)
    if arch.family == "llama":
        return s * (h + 2 * kv) * e  # rotary q and k replace q_proj/k_proj outputs; v_proj out
    fused_buffer = s * (h + 2 * kv) * e  # c_attn / query_key_value output, kept by the v view
    rotary_copies = s * (h + kv) * e if _rotary_dim(arch) else 0
    return fused_buffer + rotary_copies


def _core_saved(arch: ArchConfig, s: int, e: int, k: _Kernels) -> float:
    """Bytes the attention core (softmax(QK^T)V) keeps beyond q, k, v: what
    selective recomputation drops (Korthikanti et al. 2022 §4.3)."""
    a = arch.num_attention_heads
    if k.fused:
        return a * s * LOGSUMEXP_BYTES
    scores = a * s * s
    if k.attention == "math":
        return scores * MATH_SDPA_BYTES * (3 if arch.attn_dropout > 0 else 1)  # probs (+ mask, dropped)
    upcast = arch.family in SOFTMAX_FP32_FAMILIES and e < SOFTMAX_DTYPE_BYTES
    softmax = scores * (SOFTMAX_DTYPE_BYTES if upcast else e)  # kept by softmax's backward
    if arch.attn_dropout > 0:
        return softmax + scores * (k.mask_bytes + e)  # + mask, dropped probs: Korthikanti's 5as²b in fp16
    return softmax + (scores * e if upcast else 0)  # PV keeps the probabilities cast back, if they were


def _block_saved(arch: ArchConfig, s: int, e: int, k: _Kernels) -> tuple[TPSplit, float]:
    """(bytes saved by one block with no recomputation, the core's part of them).

    Replicated under TP: norm inputs, inputs of the column-parallel linears
    (QKV, MLP in), residual dropout masks. Sharded: the rest.
    """
    sh = s * arch.hidden_size
    norms = _norm_saved(arch, s, e, inputs=1 if arch.parallel_residual else 2, norms=2)
    masks = 2 * sh * k.mask_bytes if arch.resid_dropout > 0 else 0
    replicated = norms + 2 * sh * e + masks
    # The o_proj input; a fused kernel also keeps its output, the same storage
    # unless q was head-major (ROTARY_CAT_FAMILIES).
    copies = 2 if k.fused and arch.family in ROTARY_CAT_FAMILIES else 1
    core = _core_saved(arch, s, e, k)
    mlp = _mlp_saved_elems(arch) * s * arch.ffn_hidden_size * e
    sharded = _qkv_saved(arch, s, e, k) + core + copies * sh * e + mlp
    return TPSplit(replicated, sharded), core


def _block_params(arch: ArchConfig) -> TPSplit:
    """Column-parallel weights and biases sharded; row-parallel weights sharded,
    their biases replicated (Megatron-LM); norms replicated."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    kv = arch.num_key_value_heads * arch.head_dim
    norm = 2 * h if arch.norm == "layernorm" else h
    sharded, replicated = block_matmul_weights(arch), 2 * norm
    if arch.attention_bias and arch.model_type != "mistral":  # Mistral's linears have no bias
        sharded += h + 2 * kv
        replicated += 0 if arch.model_type == "qwen2" else h  # Qwen2's o_proj has none
    if arch.mlp_bias and arch.model_type not in ("mistral", "qwen2"):  # their MLPs have no bias
        sharded += (2 if arch.gated_mlp else 1) * f
        replicated += h
    return TPSplit(replicated, sharded)


def block_matmul_weights(arch: ArchConfig) -> int:
    """Weights (no biases) of one block's linear layers: what the matmuls multiply."""
    h, f, kv = arch.hidden_size, arch.ffn_hidden_size, arch.num_key_value_heads * arch.head_dim
    return h * (h + 2 * kv) + h * h + (3 if arch.gated_mlp else 2) * h * f


def _block(arch: ArchConfig, s: int, e: int, k: _Kernels, names: tuple[str, ...]) -> LayerProfile:
    """One block, standing for the run of identical ``names``."""
    sh, f = s * arch.hidden_size, arch.ffn_hidden_size
    core_fwd = 2 * 2 * s * s * arch.hidden_size  # QK^T and PV, each 2*s*s*d per head
    linear_fwd = 2 * s * block_matmul_weights(arch)
    fwd_flops = TPSplit(0.0, linear_fwd + core_fwd)
    core_bwd_ratio = FUSED_ATTENTION_BWD_PER_FWD if k.fused else BWD_FLOPS_PER_FWD
    bwd_flops = TPSplit(0.0, BWD_FLOPS_PER_FWD * linear_fwd + core_bwd_ratio * core_fwd)
    none, core_saved = _block_saved(arch, s, e, k)
    core_traffic = _core_traffic(arch, s, e, k)
    masks = 2 * sh * k.mask_bytes if arch.resid_dropout > 0 else 0
    # Non-matmul traffic, forward: each norm reads and writes s*h; each
    # residual (+ dropout) reads two and writes one; the activation reads and
    # writes the MLP hidden (twice for a gated MLP's multiply).
    fwd_traffic = TPSplit((2 * 2 + 2 * 3) * sh * e + masks, (4 if arch.gated_mlp else 2) * s * f * e + core_traffic)
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
            tp_allreduce_bytes: float = 0.0) -> LayerProfile:
    """A layer that is not a block: no recomputation applies to it."""
    zero = {m: TPSplit() for m in Recompute}
    return LayerProfile(
        kind=kind, module_names=(name,), params=params, fwd_flops=fwd_flops,
        bwd_flops=fwd_flops.scale(BWD_FLOPS_PER_FWD), fwd_traffic_bytes=traffic,
        bwd_traffic_bytes=traffic.scale(BWD_TRAFFIC_PER_FWD),
        activation_bytes=saved, recompute_flops=zero,
        recompute_traffic_bytes=zero, output_bytes=output_bytes, tied_to=tied_to,
        tp_allreduce_bytes=tp_allreduce_bytes,
    )


def _embedding_saved(arch: ArchConfig, s: int, e: int, attention: str, k: _Kernels) -> dict[Recompute, TPSplit]:
    """Token ids (and GPT-2's position ids), the dropout mask, and the tensors
    the model builds once and hands to every block: rotary cos/sin (saved by
    each block's multiply, or held by each checkpoint), and under full
    recomputation also the position ids and eager attention's s x s mask, which
    the checkpoints hold as arguments."""
    sh = s * arch.hidden_size
    ids = s * INDEX_BYTES * (2 if arch.learned_positions else 1)
    mask = sh * k.mask_bytes if arch.embd_dropout > 0 else 0
    rotary = 2 * s * _rotary_dim(arch) * e
    base = TPSplit(ids + mask + rotary, 0.0)
    held_args = (s * INDEX_BYTES if rotary else 0) + (s * s * e if attention == "eager" else 0)
    full = TPSplit(base.replicated + held_args, 0.0)
    return {Recompute.NONE: base, Recompute.SELECTIVE: base, Recompute.FULL: full}


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
    s, h, e, V = seq_len, arch.hidden_size, dtype_bytes, arch.vocab_size
    sh = s * h
    k = _kernels(arch, attention, device_type, e)
    emb_name, block_fmt, norm_name, head_name = MODULE_NAMES[arch.family]
    embd_mask = sh * k.mask_bytes if arch.embd_dropout > 0 else 0
    emb_params = TPSplit(h * arch.max_position_embeddings if arch.learned_positions else 0, V * h)
    embedding = _simple(
        LayerKind.EMBEDDING, emb_name, emb_params, _embedding_saved(arch, s, e, attention, k),
        TPSplit((3 if arch.learned_positions else 1) * sh * e + embd_mask, 0.0), sh * e,
        tp_allreduce_bytes=sh * e,  # vocab-parallel embedding sums partial lookups
    )
    blocks = _block(arch, s, e, k, tuple(block_fmt.format(i) for i in range(arch.num_layers)))
    norm_params = 2 * h if arch.norm == "layernorm" else h
    norm_saved = TPSplit(_norm_saved(arch, s, e), 0.0)
    final_norm = _simple(LayerKind.FINAL_NORM, norm_name, TPSplit(norm_params, 0.0),
                         {m: norm_saved for m in Recompute}, TPSplit(2 * sh * e, 0.0), sh * e)
    # LM head: x @ W^T (2*s*h*V FLOPs) keeps x; the loss keeps the labels and
    # log_softmax's fp32 output (vocab-parallel, so sharded).
    logits_f32 = s * V * LOSS_DTYPE_BYTES
    head_saved = TPSplit(sh * e + s * INDEX_BYTES, logits_f32)
    head = _simple(
        LayerKind.LM_HEAD, head_name, TPSplit(0.0, V * h), {m: head_saved for m in Recompute},
        TPSplit(0.0, s * V * e + 4 * logits_f32), 4.0,  # output: the scalar loss
        fwd_flops=TPSplit(0.0, 2.0 * sh * V),
        tied_to=emb_name if arch.tie_word_embeddings else None,
    )
    return ModelProfile(
        name=arch.name, architecture=arch.architecture, seq_len=s, hidden_size=h,
        num_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, vocab_size=V, dtype_bytes=e,
        layers=(embedding, blocks, final_norm, head), source="analytic", ffn_hidden_size=arch.ffn_hidden_size,
        notes=(f"attention={attention}", f"kernels={device_type}"),
    )
