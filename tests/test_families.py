"""The family registry (autopar/families.py) against transformers' own models.

Every family's tiny config (tests/workers/family_configs.py) is built by transformers; the registry's
module names must exist, a family with a runner must reproduce the model's own forward bit for bit
when cut into two pipeline chunks, and a family without one must say why. The multi-rank half (tp2 x
pp2, or the fallback, against one process) is in test_families_parallel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

from autopar.errors import UnsupportedModelError
from autopar.execute.families import Family, GPT2Family, fallback_reason, family_of, torch_style
from autopar.execute.stage import StageModule
from autopar.families import FAMILIES, family_spec

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from family_configs import FALLBACK_FAMILIES, SPLIT_FAMILIES, tiny_config  # noqa: E402


def _model(model_type: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def test_every_registry_family_has_a_tiny_config_in_the_tests():
    assert set(FAMILIES) == set(SPLIT_FAMILIES) | set(FALLBACK_FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_registry_names_are_the_models_own(model_type):
    model = _model(model_type)
    names = {n for n, _ in model.named_modules()}
    spec = family_spec(model_type)
    emb, blocks, norm, head = spec.module_names
    assert {emb, norm, head, blocks.format(0), blocks.format(3), *spec.first_extra} <= names
    assert blocks.format(4) not in names


@pytest.mark.parametrize("model_type", SPLIT_FAMILIES)
def test_two_chunks_reproduce_the_models_forward(model_type):
    """Chunk 0 (embedding + blocks 0-1) then chunk 1 (blocks 2-3 + head) == model(...).logits, left-padded
    rows included; the tiny configs put sliding windows (4) below the sequence (12)."""
    model = _model(model_type)
    family = family_of(model.config)
    ids = torch.randint(1, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    blocks = getattr(getattr(model, family.base), family.blocks_attr)
    first = StageModule(family, model, 0, 2, {"0": blocks[0], "1": blocks[1]})
    last = StageModule(family, model, 1, 2, {"2": blocks[2], "3": blocks[3]})
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        got = last(*first(ids, mask.float()))
    assert torch.equal(got, want)


def test_sliding_windows_matter_in_the_chunk_test():
    """The chunk test would pass for a runner that ignored sliding windows only if they changed nothing."""
    model = _model("gemma2")
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windowed = model(ids, use_cache=False).logits
        model.config.layer_types = ["full_attention"] * 4
        for layer in model.model.layers:
            layer.attention_type = "full_attention"
            layer.self_attn.sliding_window = None
        full = model(ids, use_cache=False).logits
    assert not torch.allclose(windowed, full)


@pytest.mark.parametrize("model_type", FALLBACK_FAMILIES)
def test_families_without_a_runner_name_their_fallback(model_type):
    config = tiny_config(model_type)
    assert family_of(config) is None
    reason = fallback_reason(config)
    assert "data-parallel only" in reason and family_spec(model_type).fallback == reason


def test_an_unknown_family_is_refused_with_the_list():
    with pytest.raises(UnsupportedModelError, match="gemma2.*docs/families.md"):
        family_spec("not-a-model")
    assert family_of(transformers.PretrainedConfig()) is None


def test_runners_are_the_registrys():
    assert isinstance(family_of(tiny_config("gpt2")), GPT2Family)
    assert type(family_of(tiny_config("qwen3"))) is Family


def test_transformers_tp_styles_map_to_torchs():
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    gather = torch_style("colwise_gather_output")
    split = torch_style("rowwise_split_input")
    assert type(gather) is ColwiseParallel and gather.output_layouts == (Replicate(),)
    assert type(split) is RowwiseParallel and split.input_layouts == (Replicate(),)
    assert torch_style("replicated_with_grad_allreduce") is None
    with pytest.raises(UnsupportedModelError, match="'packed_rowwise'.*tp=1"):
        torch_style("packed_rowwise")


def test_block_plans_come_from_the_config():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    qwen3 = family_of(tiny_config("qwen3"))
    plan = qwen3.block_tp_plan(tiny_config("qwen3"))
    assert type(plan["self_attn.q_proj"]) is ColwiseParallel and type(plan["mlp.down_proj"]) is RowwiseParallel
    assert "self_attn.q_norm" not in plan  # replicated; its gradient is summed over TP
    assert qwen3.tp_grad_sum_modules(tiny_config("qwen3")) == ("self_attn.q_norm", "self_attn.k_norm")
    gpt2 = family_of(tiny_config("gpt2")).block_tp_plan()  # transformers declares none: autopar's own
    assert type(gpt2["attn.c_attn"]) is ColwiseParallel and type(gpt2["mlp.c_proj"]) is RowwiseParallel
    bare = tiny_config("llama")
    bare.base_model_tp_plan = None
    with pytest.raises(UnsupportedModelError, match="no base_model_tp_plan"):
        family_of(bare).block_tp_plan(bare)
