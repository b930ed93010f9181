"""Sequence and loss parallelism (docs/executor.md#sequence-and-loss-parallelism).

Pure Python: the sequence-parallel block plan is derived from each family's declared TP plan, and the
cost model prices what torch's sequence parallelism keeps. Multi-rank (tests/workers/sequence_parallel_worker.py):
tp2, tp2 x pp2 and dp2 x tp2 with sequence parallelism train like one process (losses to 1e-5 relative,
fp32) for Llama, Qwen3 (tied head, per-head q/k norms), Gemma 2 (soft-capping, post-norms, sliding
windows), GPT-2, Phi-3 and OLMo 2; evaluation of an odd sequence length (padded to a multiple of tp)
returns the single-device loss and logits; and while training with labels no rank allocates a tensor
with a whole-vocabulary dimension (a TorchDispatchMode over the steps).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from autopar.execute.families import family_of
from tests.launch import check, python, torchrun

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from family_configs import SPLIT_FAMILIES, tiny_config  # noqa: E402

LOSS_RTOL = 1e-5
LOGITS_RTOL = 1e-4
TWO_RANKS = ["tp2:llama,qwen3,gemma2,gpt2,phi3,olmo2", "tp2_no_sp:llama"]
FOUR_RANKS = ["tp2pp2:llama,qwen3", "dp2tp2:qwen3", "tp2pp2_loss_fn:llama"]
FAMILIES = ["llama", "qwen3", "gemma2", "gpt2", "phi3", "olmo2"]
HIDDEN, SEQ, MICRO_BATCH = 32, 12, 4
"""The worker's model width, sequence length, and the micro-batch size its tp2 x pp2 plan runs."""


@pytest.mark.parametrize("model_type", SPLIT_FAMILIES)
def test_sp_plan_is_the_declared_plan_plus_norms_and_gathers(model_type):
    """Rowwise outputs reduce-scatter over the sequence; every norm under the block is SequenceParallel;
    each split module gathers its hidden states the way the block passes them (transformers' decoders
    pass the attention's as ``hidden_states=``, GPT-2 and GPT-NeoX positionally)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, RowwiseParallel, SequenceParallel

    config = tiny_config(model_type)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    family = family_of(config)
    block = getattr(getattr(model, family.base), family.blocks_attr)[0]
    plan = family.block_sp_plan(config, block)
    declared = family.block_tp_plan(config)
    assert set(declared) < set(plan)
    for name, style in plan.items():
        if isinstance(style, RowwiseParallel):
            assert style.output_layouts == (Shard(1),), name
    children = dict(block.named_children())
    norms = {n for n, c in children.items() if "norm" in type(c).__name__.lower()}
    assert norms and all(isinstance(plan[n], SequenceParallel) for n in norms)
    for parent in {n.split(".")[0] for n in declared}:
        style = plan[parent]
        assert isinstance(style, PrepareModuleInput), parent
        keyword = parent in ("self_attn",) and model_type not in ("gpt2", "gpt_neox")
        if keyword:
            assert style.input_kwarg_layouts == {"hidden_states": Shard(1)}, parent
            assert style.desired_input_kwarg_layouts == {"hidden_states": Replicate()}, parent
        else:
            assert style.input_layouts == (Shard(1),) and style.desired_input_layouts == (Replicate(),), parent


def test_sp_prices_the_gathered_inputs_whole():
    """Hand-worked, Llama-shaped: per sequence s = 128, h = 64, fp32 (e = 4), tp = 2.

    With sequence parallelism the replicated saved bytes of a block are divided by tp, but the q/k/v and
    MLP-in inputs (the all-gathered tensors the linears save) stay whole: 2 s h e (1 - 1/tp) =
    2 x 128 x 64 x 4 x 0.5 = 32768 bytes more than dividing everything. Selective recomputation
    checkpoints the attention (gather included): only the MLP input, 16384. The LM head keeps its gathered
    input: s h e (1 - 1/tp) = 16384.
    """
    from autopar.cluster import PRESETS
    from autopar.cost.layers import CostOptions, layer_costs
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict
    from autopar.profile.types import LayerKind, Recompute

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "num_hidden_layers": 2, "vocab_size": 194, "max_position_embeddings": 128}
    profile = profile_analytic(arch_from_dict("tiny", config), seq_len=128, dtype_bytes=4)
    for recompute, block_extra in ((Recompute.NONE, 32768), (Recompute.SELECTIVE, 16384), (Recompute.FULL, 0)):
        costs = layer_costs(profile, PRESETS["a100-80gb"], tp=2, sequence_parallel=True, recompute=recompute,
                            opts=CostOptions())
        for layer, cost in zip((x for x in profile.layers for _ in x.module_names), costs):
            split_all = layer.activation_bytes[recompute].total / 2
            extra = {LayerKind.BLOCK: block_extra, LayerKind.LM_HEAD: 16384}.get(layer.kind, 0)
            # integer indices (ids, labels) stay whole on every rank; TP's embedding adds its bool mask
            extra += layer.index_bytes.get(recompute, 0.0) / 2 + layer.tp_saved_bytes
            assert cost.act_bytes == pytest.approx(split_all + extra), (recompute, layer.kind)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequence_parallel")
    check(python("sequence_parallel_worker.py", str(out), "--reference", *FAMILIES))
    check(torchrun(2, "sequence_parallel_worker.py", str(out), *TWO_RANKS, timeout=400))
    check(torchrun(4, "sequence_parallel_worker.py", str(out), *FOUR_RANKS, timeout=400))
    return out


def _results(runs: Path, layout: str, kind: str, ranks: int) -> list[dict]:
    files = sorted(runs.glob(f"{layout}_{kind}.rank*.json"))
    assert len(files) == ranks, files
    return [json.loads(f.read_text()) for f in files]


def _close(got: float, want: float, rtol: float) -> bool:
    return abs(got - want) <= rtol * abs(want)


@pytest.mark.slow
@pytest.mark.parametrize("layout, kind, ranks", [
    *(("tp2", k, 2) for k in FAMILIES), ("tp2_no_sp", "llama", 2), ("tp2pp2", "llama", 4),
    ("tp2pp2", "qwen3", 4), ("dp2tp2", "qwen3", 4),
])
def test_matches_one_process_and_never_holds_the_whole_vocabulary(runs, layout, kind, ranks):
    for r in _results(runs, layout, kind, ranks):
        assert (" sp " in r["plan"]) == (layout != "tp2_no_sp"), r["plan"]
        assert all(_close(g, w, LOSS_RTOL) for g, w in zip(r["losses"], r["ref_losses"], strict=True)), r
        assert _close(r["eval_loss"], r["ref_eval_loss"], LOSS_RTOL), r
        assert r["logits_shape"] == [8, 11, 194]
        assert r["logits_max_diff"] <= LOGITS_RTOL * r["logits_max"], r
        assert r["whole_vocab_ops"] == [], r["whole_vocab_ops"]
        assert r["local_vocab_outputs"] > 0  # the watch saw the vocab-sharded tensors


@pytest.mark.slow
def test_pipeline_stages_send_the_sequence_shard(runs):
    """tp2 x pp2: the first stage hands on [micro-batch, seq / tp, hidden], 1/tp of the activation."""
    first = _results(runs, "tp2pp2", "llama", 4)[:2]  # ranks 0, 1: pipeline rank 0 (TP innermost)
    for r in first:
        assert r["sends"] and all(s == [MICRO_BATCH, SEQ // 2, HIDDEN] for s in r["sends"]), r["sends"]


@pytest.mark.slow
def test_a_user_loss_fn_gets_whole_logits(runs):
    """loss_fn sees the logits gathered over TP (documented): one process's losses, and the last stage
    (ranks 2, 3) does allocate tokens x vocab, which the default loss never does."""
    results = _results(runs, "tp2pp2_loss_fn", "llama", 4)
    for r in results:
        assert all(_close(g, w, LOSS_RTOL) for g, w in zip(r["losses"], r["ref_losses"], strict=True)), r
    assert [bool(r["whole_vocab_ops"]) for r in results] == [False, False, True, True]
