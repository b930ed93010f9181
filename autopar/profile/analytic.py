"""Closed-form profile of a decoder-only transformer, from its config alone.

This is the fast path behind ``autopar explain``: pure Python, no torch, a
1T-parameter model in milliseconds. Its numbers are checked in the tests
against the meta-device profiler (``autopar.profile.meta``), which builds the
real transformers model and counts with ``FlopCounterMode`` and saved-tensor
hooks: FLOPs within 1%, parameters exact, saved activations within 10%.

Notation (per sequence, so b = 1): s sequence length, h hidden size, a heads,
k key/value heads, d = h/a head dim, f MLP hidden size, V vocab, e bytes per
element of the compute dtype.

FLOPs follow the FlopCounterMode convention (2 per multiply-accumulate) and
count attention over the full s x s score matrix, as Narayanan et al. 2021
eq. (3) does. Backward FLOPs are twice forward (one matmul for the input
gradient, one for the weight gradient).

Activation bytes follow Korthikanti et al. 2022 §4.1 (their 34sbh + 5as²b for
GPT with fp16 and dropout), generalised to GQA, gated MLPs, any dtype, and the
attention implementation: ``eager`` materialises the s x s scores (Megatron-LM
2021 did, with fused softmax); ``sdpa`` (flash / memory-efficient kernels)
keeps only the output and a log-sum-exp per row.
"""

from __future__ import annotations

from autopar.profile.config import ArchConfig
from autopar.profile.types import LayerKind, LayerProfile, ModelProfile, Recompute, TPSplit

BWD_FLOPS_PER_FWD = 2.0
"""Backward FLOPs per forward FLOP for matmuls: dX and dW each cost one forward."""

BWD_TRAFFIC_PER_FWD = 2.0
"""Backward non-matmul bytes per forward byte: each element-wise backward reads
the saved input and the incoming gradient and writes one gradient, about twice
the read-one-write-one of the forward."""

MASK_BYTES = 1
"""A dropout mask is a bool tensor: one byte per element (torch native_dropout)."""

LOGSUMEXP_BYTES = 4
"""Flash attention keeps one fp32 log-sum-exp per query row and head."""

LOSS_DTYPE_BYTES = 4
"""transformers' ForCausalLMLoss upcasts logits to fp32 before cross entropy."""

INDEX_BYTES = 8
"""Token ids are int64; the embedding saves them for its backward."""


def _gelu_saved_elems(activation: str) -> float:
    """Elements saved per MLP-hidden element by the activation function.

    ``gelu``/``relu``/``silu`` are single aten ops saving their input. GPT-2's
    ``gelu_new`` is written out in Python (x, x**3, tanh, ...), and autograd
    keeps several of those intermediates (measured in the tests).
    """
    return 4.0 if activation in ("gelu_new", "gelu_pytorch_tanh_python") else 1.0


def _attention_core(arch: ArchConfig, s: int, e: int, attention: str) -> tuple[float, float, float]:
    """(fwd FLOPs, saved bytes, fwd traffic bytes) of softmax(QK^T)V, all TP-sharded."""
    a, h = arch.num_attention_heads, arch.hidden_size
    flops = 2 * 2 * s * s * h  # QK^T and PV, each 2*s*s*d per head
    if attention == "eager":
        scores = a * s * s
        dropout = arch.attn_dropout > 0
        saved = scores * e * (2 if dropout else 1) + (scores * MASK_BYTES if dropout else 0)
        # QK^T writes the scores, softmax reads and writes them, dropout reads,
        # writes and stores its mask, PV reads them: Megatron's fused kernels.
        traffic = scores * e * (5 if dropout else 3) + (scores * MASK_BYTES if dropout else 0)
    else:
        saved = a * s * LOGSUMEXP_BYTES + s * h * e  # log-sum-exp and the output
        traffic = 0.0  # scores stay in on-chip memory
    return flops, saved, traffic


def _block(arch: ArchConfig, s: int, e: int, attention: str, names: tuple[str, ...]) -> LayerProfile:
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    kv = arch.num_key_value_heads * d  # width of K and of V
    sh = s * h
    norm_params = 2 * h if arch.norm == "layernorm" else h
    # Parameters: column-parallel weights and their biases are sharded;
    # row-parallel weights are sharded, their biases replicated (Megatron-LM).
    qkv_w = h * (h + 2 * kv)
    mlp_w = (3 if arch.gated_mlp else 2) * h * f
    sharded_params = qkv_w + h * h + mlp_w
    replicated_params = 2 * norm_params
    if arch.attention_bias:
        sharded_params += h + 2 * kv
        replicated_params += h if arch.family != "llama" else 0  # o_proj bias (not in Qwen2)
    if arch.mlp_bias:
        sharded_params += (2 if arch.gated_mlp else 1) * f
        replicated_params += h
    attn_flops, attn_saved, attn_traffic = _attention_core(arch, s, e, attention)
    linear_flops = 2 * s * sharded_params_weights(arch)
    fwd_flops = TPSplit(0.0, linear_flops + attn_flops)

    dropout = arch.resid_dropout > 0
    masks = (2 * sh * MASK_BYTES) if dropout else 0
    # Saved for backward, "none" recomputation.
    #   replicated: 2 norm inputs, QKV input, MLP input, dropout masks
    #   sharded:    Q, K, V; attention output (o_proj input); MLP hidden saves
    norm_saved = 2 * sh * e * (3 if arch.norm == "rmsnorm" and e < 4 else 1)
    rep_saved = norm_saved + 2 * sh * e + masks
    mlp_hidden = s * f * e
    if arch.gated_mlp:
        mlp_saved = 4 * mlp_hidden  # gate out, silu out, up out, down input
    else:
        mlp_saved = (1 + _gelu_saved_elems(arch.activation)) * mlp_hidden
    shard_saved_wo_core = (sh + 2 * s * kv) * e + sh * e + mlp_saved
    none = TPSplit(rep_saved, shard_saved_wo_core + attn_saved)
    selective = TPSplit(rep_saved, shard_saved_wo_core)
    full = TPSplit(sh * e, 0.0)  # only the block input is kept

    # Non-matmul traffic, forward: each norm reads and writes s*h; each
    # residual (+ dropout) reads two and writes one; the activation reads and
    # writes the MLP hidden (twice for a gated MLP's multiply).
    fwd_traffic = TPSplit((2 * 2 + 2 * 3) * sh * e + masks, (4 if arch.gated_mlp else 2) * s * f * e + attn_traffic)
    return LayerProfile(
        kind=LayerKind.BLOCK,
        module_names=names,
        params=TPSplit(replicated_params, sharded_params),
        fwd_flops=fwd_flops,
        bwd_flops=fwd_flops.scale(BWD_FLOPS_PER_FWD),
        fwd_traffic_bytes=fwd_traffic,
        bwd_traffic_bytes=fwd_traffic.scale(BWD_TRAFFIC_PER_FWD),
        activation_bytes={Recompute.NONE: none, Recompute.SELECTIVE: selective, Recompute.FULL: full},
        recompute_flops={
            Recompute.NONE: TPSplit(),
            Recompute.SELECTIVE: TPSplit(0.0, attn_flops),
            Recompute.FULL: fwd_flops,
        },
        recompute_traffic_bytes={
            Recompute.NONE: TPSplit(),
            Recompute.SELECTIVE: TPSplit(0.0, attn_traffic),
            Recompute.FULL: fwd_traffic,
        },
        output_bytes=sh * e,
        tp_allreduce_bytes=2 * sh * e,  # after attention and after the MLP
    )


def sharded_params_weights(arch: ArchConfig) -> int:
    """Weights (no biases) of one block's linear layers: what the matmuls multiply."""
    h, f, kv = arch.hidden_size, arch.ffn_hidden_size, arch.num_key_value_heads * arch.head_dim
    return h * (h + 2 * kv) + h * h + (3 if arch.gated_mlp else 2) * h * f


def _simple(kind: LayerKind, name: str, params: TPSplit, saved: TPSplit, traffic: TPSplit,
            output_bytes: float, fwd_flops: TPSplit = TPSplit(), tied_to: str | None = None,
            tp_allreduce_bytes: float = 0.0) -> LayerProfile:
    """A layer that is not a block: no recomputation applies to it."""
    zero = {m: TPSplit() for m in Recompute}
    return LayerProfile(
        kind=kind, module_names=(name,), params=params, fwd_flops=fwd_flops,
        bwd_flops=fwd_flops.scale(BWD_FLOPS_PER_FWD), fwd_traffic_bytes=traffic,
        bwd_traffic_bytes=traffic.scale(BWD_TRAFFIC_PER_FWD),
        activation_bytes={m: saved for m in Recompute}, recompute_flops=zero,
        recompute_traffic_bytes=zero, output_bytes=output_bytes, tied_to=tied_to,
        tp_allreduce_bytes=tp_allreduce_bytes,
    )


MODULE_NAMES = {
    "gpt2": ("transformer.wte", "transformer.h.{}", "transformer.ln_f", "lm_head"),
    "llama": ("model.embed_tokens", "model.layers.{}", "model.norm", "lm_head"),
    "gpt_neox": ("gpt_neox.embed_in", "gpt_neox.layers.{}", "gpt_neox.final_layer_norm", "embed_out"),
}


def profile_analytic(arch: ArchConfig, *, seq_len: int, dtype_bytes: int = 2,
                     attention: str = "sdpa") -> ModelProfile:
    """Profile ``arch`` for one sequence of ``seq_len`` tokens.

    Args:
        arch: the model's shape.
        seq_len: tokens per sequence.
        dtype_bytes: bytes per element of weights and activations (2 for bf16).
        attention: ``sdpa`` (flash-style, no s x s scores kept) or ``eager``.
    """
    s, h, e, V = seq_len, arch.hidden_size, dtype_bytes, arch.vocab_size
    sh = s * h
    emb_name, block_fmt, norm_name, head_name = MODULE_NAMES[arch.family]
    embd_mask = sh * MASK_BYTES if arch.embd_dropout > 0 else 0
    emb_params = TPSplit(h * arch.max_position_embeddings if arch.learned_positions else 0, V * h)
    embedding = _simple(
        LayerKind.EMBEDDING, emb_name, emb_params, TPSplit(s * INDEX_BYTES + embd_mask, 0.0),
        TPSplit((3 if arch.learned_positions else 1) * sh * e + embd_mask, 0.0), sh * e,
        tp_allreduce_bytes=sh * e,  # vocab-parallel embedding sums partial lookups
    )
    blocks = _block(arch, s, e, attention, tuple(block_fmt.format(i) for i in range(arch.num_layers)))
    norm_params = 2 * h if arch.norm == "layernorm" else h
    final_norm = _simple(LayerKind.FINAL_NORM, norm_name, TPSplit(norm_params, 0.0),
                         TPSplit(sh * e, 0.0), TPSplit(2 * sh * e, 0.0), sh * e)
    # LM head: x @ W^T (2*s*h*V FLOPs), then the loss upcasts the logits to fp32
    # and log_softmax keeps its fp32 output for backward.
    logits_f32 = s * V * LOSS_DTYPE_BYTES
    head = _simple(
        LayerKind.LM_HEAD, head_name, TPSplit(0.0, V * h),
        TPSplit(sh * e, logits_f32),
        TPSplit(0.0, s * V * e + 4 * logits_f32), 4.0,  # output: the scalar loss
        fwd_flops=TPSplit(0.0, 2.0 * sh * V),
        tied_to=emb_name if arch.tie_word_embeddings else None,
    )
    return ModelProfile(
        name=arch.name, architecture=arch.architecture, seq_len=s, hidden_size=h,
        num_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, vocab_size=V, dtype_bytes=e,
        layers=(embedding, blocks, final_norm, head), source="analytic",
        notes=(f"attention={attention}",),
    )
