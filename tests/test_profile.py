"""The profilers against each other and against what torch really does.

* analytic FLOPs vs ``FlopCounterMode`` (real CPU tensors and meta), within 1%;
* analytic parameter counts vs ``sum(p.numel())`` of the HF model, exact;
* analytic saved bytes vs the bytes autograd saves on real fp32 CPU tensors,
  with and without HF activation checkpointing, within 10% (they agree to a few
  bytes: the loss scalar);
* ``profile_meta`` vs ``profile_analytic`` on presets;
* ``profile_measured`` runs on CPU.

Tiny models: hidden 64, 4 heads, 2 blocks, vocab 128, 32 tokens, micro-batch 2.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from autopar.errors import AutoparError  # noqa: E402
from autopar.profile.analytic import MODULE_NAMES, profile_analytic  # noqa: E402
from autopar.profile.config import arch_from_dict, load_arch  # noqa: E402
from autopar.profile.meta import profile_meta  # noqa: E402
from autopar.profile.record import record_step  # noqa: E402
from autopar.profile.measured import build_model, profile_measured, set_checkpointing, shard_block  # noqa: E402
from autopar.profile.types import LayerKind, Recompute  # noqa: E402

SEQ = 32
FLOP_RTOL = 0.01
ACT_RTOL = 0.10
PHASES = {LayerKind.EMBEDDING: "embedding", LayerKind.BLOCK: "block.1",
          LayerKind.FINAL_NORM: "final_norm", LayerKind.LM_HEAD: "lm_head"}


def tiny(family: str, dropout: float = 0.0, **extra) -> dict:
    """A two-block config dict of ``family`` with hidden 64 and 4 heads."""
    if family == "gpt2":
        cfg = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                   activation_function="gelu_new", attn_pdrop=dropout, resid_pdrop=dropout,
                   embd_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    elif family == "llama":  # GQA: 4 query heads, 2 key/value heads
        cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=96, vocab_size=128, max_position_embeddings=64,
                   attention_dropout=dropout, tie_word_embeddings=False)
    else:
        cfg = dict(model_type="gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=256, vocab_size=128, max_position_embeddings=64, rotary_pct=0.25,
                   attention_dropout=dropout, hidden_dropout=dropout, tie_word_embeddings=False)
    return {**cfg, **extra}


CASES = [("gpt2", 0.0), ("gpt2", 0.1), ("llama", 0.0), ("gpt_neox", 0.0), ("gpt_neox", 0.1)]


@functools.cache
def cpu_steps(family: str, dropout: float, attention: str):
    """(arch, record without recomputation, record with HF checkpointing) on real fp32 CPU tensors."""
    arch = arch_from_dict(f"tiny-{family}", tiny(family, dropout))
    torch.manual_seed(0)
    model = build_model(arch, attention=attention, dtype_bytes=4, device="cpu")
    none = record_step(model, arch, seq_len=SEQ)
    set_checkpointing(model, True)
    full = record_step(model, arch, seq_len=SEQ, backward=False)
    return arch, none, full


@functools.cache
def meta_step(family: str, dropout: float, attention: str):
    arch = arch_from_dict(f"tiny-{family}", tiny(family, dropout))
    model = build_model(arch, attention=attention, dtype_bytes=4, device="meta")
    return arch, record_step(model, arch, seq_len=SEQ, emulate_cuda=True)


def close(measured: float, predicted: float, rtol: float, atol: float = 1.0) -> bool:
    return abs(measured - predicted) <= max(rtol * abs(predicted), atol)


def check_flops(record, profile) -> None:
    """Per layer kind and in total, forward and backward. A layer the formulas
    give no FLOPs may show a trace (transformers < 5.2x builds rotary tables
    with a tiny matmul); 0.01% of the model is the slack."""
    per_seq = 1.0 / record.micro_batch_size
    atol = 1e-4 * profile.model_flops_per_seq()
    for layer in profile.layers:
        phase = PHASES[layer.kind]
        for got, want in ((record.fwd_flops[phase], layer.fwd_flops), (record.bwd_flops[phase], layer.bwd_flops)):
            assert close(got * per_seq, want.total, FLOP_RTOL, atol), (layer.kind, got * per_seq, want)
    measured = (sum(record.fwd_flops.values()) + sum(record.bwd_flops.values())) * per_seq
    assert close(measured, profile.hardware_flops_per_seq(Recompute.NONE), FLOP_RTOL)


# -- FLOPs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family,dropout", CASES)
def test_flops_match_flop_counter_on_cpu(family, dropout, attention):
    # FlopCounterMode has no formula for CPU's fused SDPA kernel; record_step
    # supplies one (meta.SDPA_OPS), so both attentions are counted here.
    arch, none, _ = cpu_steps(family, dropout, attention)
    check_flops(none, profile_analytic(arch, seq_len=SEQ, dtype_bytes=4, attention=attention, device_type="cpu"))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family,dropout", CASES)
def test_flops_match_flop_counter_on_meta(family, dropout, attention):
    # On meta the flash kernel runs and is counted: its backward is 2.5x forward.
    arch, record = meta_step(family, dropout, attention)
    check_flops(record, profile_analytic(arch, seq_len=SEQ, dtype_bytes=4, attention=attention))


# -- parameters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    tiny("gpt2"), tiny("llama"), tiny("gpt_neox"), tiny("gpt2", tie_word_embeddings=False),
    tiny("llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    {**tiny("llama"), "model_type": "qwen2"}, {**tiny("llama"), "model_type": "mistral"},
])
def test_param_count_exact_on_real_models(cfg):
    arch = arch_from_dict("tiny", cfg)
    model = build_model(arch, device="cpu")
    assert profile_analytic(arch, seq_len=SEQ).num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["gpt2", "cerebras-gpt-13b", "llama-3-8b", "mistral-7b", "qwen2-7b",
                                    "gpt-neox-20b", "megatron-gpt-1t"])
def test_param_count_exact_on_presets(preset):
    arch = load_arch(preset)
    model = build_model(arch, device="meta", dtype_bytes=2)  # every layer, on meta
    assert profile_analytic(arch, seq_len=128).num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_module_names_are_the_models(family):
    arch = arch_from_dict("tiny", tiny(family))
    names = {name for name, _ in build_model(arch, device="meta").named_modules()}
    for layer in profile_analytic(arch, seq_len=SEQ).layers:
        assert set(layer.module_names) <= names, layer.module_names


# -- saved activations ---------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family,dropout", CASES)
def test_saved_bytes_match_autograd_on_cpu(family, dropout, attention):
    arch, none, full = cpu_steps(family, dropout, attention)
    profile = profile_analytic(arch, seq_len=SEQ, dtype_bytes=4, attention=attention, device_type="cpu")
    for mode, record in ((Recompute.NONE, none), (Recompute.FULL, full)):
        whole = sum(record.per_sequence(phase).total for phase in record.saved_bytes)
        predicted = sum(layer.activation_bytes[mode].total * layer.count for layer in profile.layers)
        assert close(whole, predicted, ACT_RTOL), (mode, whole, predicted)
        block, predicted_block = record.per_sequence("block.1"), profile.layers[1].activation_bytes[mode]
        assert close(block.total, predicted_block.total, ACT_RTOL), (mode, block, predicted_block)
        assert close(block.replicated, predicted_block.replicated, ACT_RTOL), (mode, block, predicted_block)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_saved_bytes_match_autograd_in_bf16(family, attention):
    # bf16 brings RMSNorm's fp32 upcast, eager softmax in fp32, and CPU's
    # fp32 math SDPA under dropout into play.
    arch = arch_from_dict(f"tiny-{family}", tiny(family, 0.1))
    model = build_model(arch, attention=attention, dtype_bytes=2, device="cpu")
    record = record_step(model, arch, seq_len=SEQ, backward=False)
    profile = profile_analytic(arch, seq_len=SEQ, dtype_bytes=2, attention=attention, device_type="cpu")
    block = profile.layers[1].activation_bytes[Recompute.NONE].total
    assert close(record.per_sequence("block.1").total, block, ACT_RTOL)


def test_storage_identity_dedup_matches_data_pointers():
    # Meta tensors have no data pointers; the recorder dedupes by storage object
    # identity instead. On real tensors both must give the same bytes.
    arch = arch_from_dict("tiny", tiny("gpt2", 0.1))
    model = build_model(arch, device="cpu")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 128, (2, SEQ))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    assert sum(storages.values()) == record_step(model, arch, seq_len=SEQ).total_saved_bytes()


# -- meta vs analytic ----------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("preset", ["gpt2", "cerebras-gpt-111m", "llama-3-8b"])
def test_meta_agrees_with_analytic(preset, attention):
    arch = load_arch(preset)
    meta = profile_meta(arch, seq_len=256, attention=attention)
    analytic = profile_analytic(arch, seq_len=256, attention=attention)
    assert meta.source == "meta" and meta.num_params == analytic.num_params
    for got, want in zip(meta.layers, analytic.layers):
        assert got.params == want.params, got.kind
        assert close(got.fwd_flops.total, want.fwd_flops.total, FLOP_RTOL), got.kind
        assert close(got.bwd_flops.total, want.bwd_flops.total, FLOP_RTOL), got.kind
        for mode in Recompute:
            assert close(got.activation_bytes[mode].total, want.activation_bytes[mode].total, ACT_RTOL), (
                got.kind, mode)
            assert close(got.recompute_flops[mode].total, want.recompute_flops[mode].total, FLOP_RTOL)


def test_meta_profiles_a_1t_model_in_seconds():
    arch = load_arch("megatron-gpt-1t")
    started = time.perf_counter()
    profile = profile_meta(arch, seq_len=2048)
    assert time.perf_counter() - started < 10.0
    assert profile.num_params == profile_analytic(arch, seq_len=2048).num_params


# -- measured ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_profile_measured_runs_on_cpu(family):
    arch = arch_from_dict("tiny", tiny(family, 0.1))
    timing = profile_measured(arch, seq_len=SEQ, micro_batch_size=2, tp=2, device="cpu",
                              dtype=torch.float32, warmup=1, iters=2)
    assert timing.fwd_s > 0 and timing.bwd_s > 0 and timing.fwd_flops_per_s > 0
    block = profile_analytic(arch, seq_len=SEQ, dtype_bytes=4).layers[1]
    assert timing.fwd_flops == block.fwd_flops.at(2) * 2


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_shard_block_holds_one_ranks_parameters(family):
    arch = arch_from_dict("tiny", tiny(family))
    model = build_model(arch, device="cpu")
    block = model.get_submodule(MODULE_NAMES[arch.family][1].format(0))
    shard_block(block, 2)
    assert sum(p.numel() for p in block.parameters()) == profile_analytic(arch, seq_len=SEQ).layers[1].params.at(2)


# -- on a GPU ------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (reported as skipped)")


def two_blocks(preset: str):
    arch = load_arch(preset)
    key = "n_layer" if arch.family == "gpt2" else "num_hidden_layers"
    return arch_from_dict(preset, {**arch.raw, key: 2})


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset,attention", [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama-3-8b", "sdpa"),
                                              ("gpt-neox-20b", "sdpa")])
def test_saved_bytes_match_autograd_on_cuda(preset, attention):
    # The default (CUDA) formulas against real bf16 CUDA kernels, and against
    # the allocator: what a forward leaves allocated is what backward needs.
    arch, seq = two_blocks(preset), 1024
    model = build_model(arch, attention=attention, dtype_bytes=2, device="cuda")
    record = record_step(model, arch, seq_len=seq)
    profile = profile_analytic(arch, seq_len=seq, attention=attention)
    whole = sum(layer.activation_bytes[Recompute.NONE].total * layer.count for layer in profile.layers)
    assert close(record.per_sequence("block.1").total, profile.layers[1].activation_bytes[Recompute.NONE].total,
                 ACT_RTOL)
    assert close(sum(record.per_sequence(phase).total for phase in record.saved_bytes), whole, ACT_RTOL)
    check_flops(record, profile)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    ids = torch.randint(0, arch.vocab_size, (2, seq), device="cuda")
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert close((torch.cuda.memory_allocated() - before) / 2, whole, ACT_RTOL)
    del loss


@pytest.mark.gpu
@needs_cuda
def test_profile_measured_on_cuda():
    timing = profile_measured(load_arch("llama-3-8b"), seq_len=2048, micro_batch_size=1, tp=8)
    assert timing.device == "cuda" and 0 < timing.fwd_flops_per_s < 5e15 and 0 < timing.bwd_flops_per_s < 5e15


# -- errors and imports --------------------------------------------------------------------------

def test_bad_arguments_are_named():
    gpt2 = load_arch("gpt2")
    with pytest.raises(AutoparError, match="attention='flash'"):
        profile_analytic(gpt2, seq_len=128, attention="flash")
    with pytest.raises(AutoparError, match="1024 positions"):
        profile_analytic(gpt2, seq_len=2048)
    with pytest.raises(AutoparError, match="tp=3"):
        profile_measured(arch_from_dict("tiny", tiny("llama")), seq_len=SEQ, micro_batch_size=1, tp=3)


def test_analytic_imports_no_torch():
    code = ("import sys, autopar, autopar.profile.analytic, autopar.profile.config; "
            "sys.exit(1 if {'torch', 'transformers'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
