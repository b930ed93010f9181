"""Every family of the registry (autopar/families.py) profiled against transformers' own model.

Each case is a tiny config built by transformers' own config class
(``AutoConfig.for_model(...).to_dict()``, every default written out as a
checkpoint's config.json has it): two blocks, hidden 64, 4 heads, vocab 128,
head_dim != hidden / heads where the family allows it. For each:

* parameters per layer and in total == the HF model on the meta device, exact;
* the registry's module names exist in that model;
* forward and backward FLOPs per layer == ``FlopCounterMode`` on a real CPU model, within 1%;
* bytes saved for backward within 10% of what autograd keeps on real CPU tensors
  (fp32 with SDPA, with and without checkpointing; fp32 eager; bf16 SDPA), whole
  model and one block, as tests/test_profile.py checks GPT-2, Llama and NeoX.

The new presets are checked too: exact parameter counts on meta, and
``profile_meta`` against ``profile_analytic``.
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from autopar.errors import UnsupportedModelError  # noqa: E402
from autopar.families import FAMILIES  # noqa: E402
from autopar.profile.analytic import attention_kinds, profile_analytic  # noqa: E402
from autopar.profile.config import arch_from_dict, load_arch  # noqa: E402
from autopar.profile.measured import build_model, profile_measured, set_checkpointing, shard_block  # noqa: E402
from autopar.profile.meta import profile_meta  # noqa: E402
from autopar.profile.record import record_step  # noqa: E402
from autopar.profile.types import LayerKind, Recompute  # noqa: E402

SEQ = 32
"""Longer than the tiny sliding windows (8, 16), so their masks are exercised."""
FLOP_RTOL = 0.01
ACT_RTOL = 0.10
PHASES = {LayerKind.EMBEDDING: "embedding", LayerKind.BLOCK: "block.1",
          LayerKind.FINAL_NORM: "final_norm", LayerKind.LM_HEAD: "lm_head"}

_IDS = dict(vocab_size=128, pad_token_id=0, bos_token_id=0, eos_token_id=0)
_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=64, **_IDS)
_FALCON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **_IDS)
_OPT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96, max_position_embeddings=64,
            dropout=0.0, **_IDS)

CASES = {
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, **_IDS),
    "llama": dict(model_type="llama", head_dim=24, **_DECODER),  # heads x head_dim = 96 != hidden 64
    "mistral": dict(model_type="mistral", head_dim=24, **_DECODER),  # Mistral-NeMo's layout
    "qwen2": dict(model_type="qwen2", **_DECODER),
    "qwen3": dict(model_type="qwen3", head_dim=24, **_DECODER),
    "gemma": dict(model_type="gemma", head_dim=24, **_DECODER),
    "gemma2": dict(model_type="gemma2", head_dim=24, sliding_window=8, query_pre_attn_scalar=24, **_DECODER),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=24, sliding_window=8, query_pre_attn_scalar=24,
                        final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"],
                        **_DECODER),
    "phi3": dict(model_type="phi3", **_DECODER),
    "olmo2": dict(model_type="olmo2", **_DECODER),
    "granite": dict(model_type="granite", embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.0078, logits_scaling=8.0, **_DECODER),
    "nemotron": dict(model_type="nemotron", head_dim=24, **_DECODER),
    "starcoder2": dict(model_type="starcoder2", sliding_window=16, **_DECODER),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=64, rotary_pct=0.25, **_IDS),
    "falcon-7b": dict(model_type="falcon", **_FALCON),  # multi-query, one shared norm, parallel
    "falcon-40b": dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2, **_FALCON),
    "falcon-rw": dict(model_type="falcon", alibi=True, multi_query=False, parallel_attn=False, bias=True,
                      **_FALCON),
    "opt": dict(model_type="opt", **_OPT),
    "opt-project": dict(model_type="opt", word_embed_proj_dim=32, **_OPT),  # project_in / project_out
    "bloom": dict(model_type="bloom", hidden_size=64, n_layer=2, n_head=4, **_IDS),
    "mpt": dict(model_type="mpt", d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **_IDS),
}
"""Tiny configs, at least one per registry family (the test below checks that)."""

NEW_PRESETS = ["qwen3-8b", "gemma-2-9b", "gemma-3-12b", "phi-3-mini", "olmo-2-7b", "granite-3-8b", "minitron-8b",
               "starcoder2-7b", "falcon-7b", "opt-6.7b", "bloom-7b1", "mpt-7b", "mpt-30b", "mistral-nemo-12b"]


@functools.cache
def arch_of(case: str):
    """The case's config as transformers writes it, read by autopar."""
    kwargs = dict(CASES[case])
    raw = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs).to_dict()
    return arch_from_dict(f"tiny-{case}", raw)


@functools.cache
def cpu_steps(case: str, attention: str, dtype_bytes: int):
    """(record without recomputation, record with HF checkpointing) on a real CPU model."""
    arch = arch_of(case)
    torch.manual_seed(0)
    model = build_model(arch, attention=attention, dtype_bytes=dtype_bytes, device="cpu")
    none = record_step(model, arch, seq_len=SEQ)
    set_checkpointing(model, True)
    return none, record_step(model, arch, seq_len=SEQ, backward=False)


def close(measured: float, predicted: float, rtol: float, atol: float = 1.0) -> bool:
    return abs(measured - predicted) <= max(rtol * abs(predicted), atol)


def test_cases_cover_the_registry():
    assert {cfg["model_type"] for cfg in CASES.values()} == set(FAMILIES)


# -- parameters and names ------------------------------------------------------------------------

def _params_by_layer(model: torch.nn.Module, spec) -> dict[LayerKind, int]:
    """Distinct parameters per layer kind (block 0 for the block; a tied head counts none)."""
    blocks = spec.blocks.split("{}")[0]
    counts = dict.fromkeys(LayerKind, 0)
    for name, param in model.named_parameters():  # a tied weight is listed once, under the embedding
        if name.startswith(blocks):
            kind = LayerKind.BLOCK if name.startswith(spec.blocks.format(0) + ".") else None
        elif name.startswith(spec.final_norm + "."):
            kind = LayerKind.FINAL_NORM
        elif name.startswith(spec.head + "."):
            kind = LayerKind.LM_HEAD
        else:
            kind = LayerKind.EMBEDDING  # positions, BLOOM's norm and OPT's projections too
        if kind is not None:
            counts[kind] += param.numel()
    return counts


@pytest.mark.parametrize("case", sorted(CASES))
def test_params_per_layer_match_the_meta_model(case):
    arch = arch_of(case)
    model = build_model(arch, device="meta")
    profile = profile_analytic(arch, seq_len=SEQ)
    assert profile.num_params == sum(p.numel() for p in model.parameters())
    counts = _params_by_layer(model, arch.spec)
    for layer in profile.layers:
        want = 0 if layer.tied_to else int(layer.params.total)
        assert counts[layer.kind] == want, (layer.kind, counts[layer.kind], want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_registry_module_names_are_the_models(case):
    arch = arch_of(case)
    names = {name for name, _ in build_model(arch, device="meta").named_modules()}
    spec = arch.spec
    assert {spec.embedding, spec.final_norm, spec.head, *spec.first_extra} <= names
    for layer in profile_analytic(arch, seq_len=SEQ).layers:
        assert set(layer.module_names) <= names, layer.module_names


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_param_count_exact_on_new_presets(preset):
    arch = load_arch(preset)
    model = build_model(arch, device="meta", dtype_bytes=2)  # every layer, on meta
    assert profile_analytic(arch, seq_len=128).num_params == sum(p.numel() for p in model.parameters())


# -- FLOPs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_flops_match_flop_counter_on_cpu(case):
    arch = arch_of(case)
    none, _ = cpu_steps(case, "sdpa", 4)
    profile = profile_analytic(arch, seq_len=SEQ, dtype_bytes=4, device_type="cpu")
    per_seq = 1.0 / none.micro_batch_size
    for layer in profile.layers:
        phase = PHASES[layer.kind]
        for got, want in ((none.fwd_flops[phase], layer.fwd_flops), (none.bwd_flops[phase], layer.bwd_flops)):
            assert close(got * per_seq, want.total, FLOP_RTOL), (layer.kind, got * per_seq, want)
    measured = (sum(none.fwd_flops.values()) + sum(none.bwd_flops.values())) * per_seq
    assert close(measured, profile.hardware_flops_per_seq(Recompute.NONE), FLOP_RTOL)


# -- saved activations ---------------------------------------------------------------------------

def _check_saved(record, profile, mode: Recompute, replicated: bool, block: bool = True) -> None:
    whole = sum(record.per_sequence(phase).total for phase in record.saved_bytes)
    predicted = sum(layer.activation_bytes[mode].total * layer.count for layer in profile.layers)
    assert close(whole, predicted, ACT_RTOL), (mode, whole, predicted)
    if not block:
        return
    block, predicted_block = record.per_sequence("block.1"), profile.layers[1].activation_bytes[mode]
    assert close(block.total, predicted_block.total, ACT_RTOL), (mode, block, predicted_block)
    if replicated:
        assert close(block.replicated, predicted_block.replicated, ACT_RTOL), (mode, block, predicted_block)


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_bytes_match_autograd_on_cpu(case):
    arch = arch_of(case)
    none, full = cpu_steps(case, "sdpa", 4)
    profile = profile_analytic(arch, seq_len=SEQ, dtype_bytes=4, device_type="cpu")
    _check_saved(none, profile, Recompute.NONE, replicated=True)
    # Checkpointed blocks hold their layer kind's mask and rotary tables; the
    # profile charges those once per model (embedding row), so with two kinds
    # (Gemma 2 and 3) block 1 holds what block 0 did not: whole model only.
    _check_saved(full, profile, Recompute.FULL, replicated=True, block=len(attention_kinds(arch)) == 1)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("attention,dtype_bytes", [("eager", 4), ("sdpa", 2)])
def test_saved_bytes_match_autograd_eager_and_bf16(case, attention, dtype_bytes):
    # eager: materialised scores (fp32 softmax, Gemma 2's soft-capping tanh);
    # bf16: RMSNorm upcasts (Gemma's and OLMo 2's fp32 weight multiply).
    arch = arch_of(case)
    none, _ = cpu_steps(case, attention, dtype_bytes)
    profile = profile_analytic(arch, seq_len=SEQ, dtype_bytes=dtype_bytes, attention=attention, device_type="cpu")
    _check_saved(none, profile, Recompute.NONE, replicated=False)


# -- meta vs analytic on the presets -------------------------------------------------------------

@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_meta_agrees_with_analytic_on_new_presets(preset):
    # 512 tokens: not a head width (Gemma's 256), which meta's s x s test would mistake for scores.
    # The embedding row's activations are not compared: meta puts there what block 0 keeps beyond
    # block 1, and two blocks do not show every layer kind (Gemma 3's five-to-one pattern).
    arch = load_arch(preset)
    meta = profile_meta(arch, seq_len=512)
    analytic = profile_analytic(arch, seq_len=512)
    assert meta.num_params == analytic.num_params
    for got, want in zip(meta.layers, analytic.layers):
        assert got.params == want.params, got.kind
        assert close(got.fwd_flops.total, want.fwd_flops.total, FLOP_RTOL), got.kind
        assert close(got.bwd_flops.total, want.bwd_flops.total, FLOP_RTOL), got.kind
        if got.kind == LayerKind.EMBEDDING:
            continue
        for mode in Recompute:
            if mode == Recompute.FULL and got.kind == LayerKind.BLOCK and len(attention_kinds(arch)) > 1:
                continue  # block 1 holds its own kind's mask (see test_saved_bytes_match_autograd_on_cpu)
            assert close(got.activation_bytes[mode].total, want.activation_bytes[mode].total, ACT_RTOL), (
                got.kind, mode, got.activation_bytes[mode], want.activation_bytes[mode])


# -- one block timed as a TP shard ---------------------------------------------------------------

SHARDABLE = ["qwen3", "gemma", "gemma2", "gemma3_text", "granite", "nemotron", "starcoder2", "opt-project"]


@pytest.mark.parametrize("case", SHARDABLE)
def test_shard_block_holds_one_ranks_parameters(case):
    arch = arch_of(case)
    block = build_model(arch, device="cpu").get_submodule(arch.spec.blocks.format(0))
    shard_block(block, 2)
    assert sum(p.numel() for p in block.parameters()) == profile_analytic(arch, seq_len=SEQ).layers[1].params.at(2)


def test_profile_measured_times_a_shard_or_names_the_family():
    timing = profile_measured(arch_of("qwen3"), seq_len=SEQ, micro_batch_size=1, tp=2, device="cpu",
                              dtype=torch.float32, warmup=0, iters=1)
    assert timing.fwd_s > 0 and timing.bwd_s > 0
    with pytest.raises(UnsupportedModelError, match="tp=2 shard of a phi3 block"):
        profile_measured(arch_of("phi3"), seq_len=SEQ, micro_batch_size=1, tp=2, device="cpu")


# -- what is refused -----------------------------------------------------------------------------

def test_head_dim_apart_from_hidden_is_profiled():
    arch = arch_of("mistral")  # 4 heads x 24 = 96 wide attention in a 64 wide model
    assert arch.q_width == 96 and arch.kv_width == 48 and arch.hidden_size == 64


@pytest.mark.parametrize("change,match", [
    ({"expansion_ratio": 2}, "expansion_ratio=2.*always builds"),
    ({"attn_config": {"alibi": False}}, "attn_config.alibi=False"),
])
def test_mpt_variants_transformers_cannot_build_are_named(change, match):
    with pytest.raises(UnsupportedModelError, match=match):
        arch_from_dict("mpt", {**CASES["mpt"], **change})


def test_post_norm_opt_is_named():
    with pytest.raises(UnsupportedModelError, match="do_layer_norm_before=false"):
        arch_from_dict("opt-350m", {**CASES["opt"], "do_layer_norm_before": False})
