"""Init replay (autopar.execute.init_replay) against the plain single-device build.

Oracle: ``torch.manual_seed(s); AutoModelForCausalLM.from_config(cfg)`` on CPU. The replay must give every
parameter and buffer bit for bit, leave the default generator where the plain build leaves it, and hold about one
tensor at a time. Single process, tiny configs, a few seconds in all.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from autopar.errors import UnsupportedModelError
from autopar.execute.init_replay import ReplayStats, record_init, replay_init, replay_recording, tied_names

SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=96, num_hidden_layers=2)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=32,
                                            bos_token_id=0, eos_token_id=0),
    "llama-gqa": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False,
                                                  pad_token_id=0),  # padding row zeroed through a view
    "llama-tied": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    "gpt-neox": lambda: transformers.GPTNeoXConfig(**SMALL, max_position_embeddings=32),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2),
}


def _plain(make_config, seed: int, dtype: torch.dtype) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """The oracle: a plain CPU build; returns it, every named tensor (aliases included) and the generator after."""
    torch.manual_seed(seed)
    kwargs = {} if dtype == torch.float32 else {"dtype": dtype}
    model = AutoModelForCausalLM.from_config(make_config(), **kwargs)
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return model, {n: t.detach() for n, t in named}, torch.get_rng_state()


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    assert set(got).isdisjoint(aliases)
    assert set(got) | set(aliases) == set(expected)
    for name, want in expected.items():
        have = got[aliases.get(name, name)]
        assert have.dtype == want.dtype and torch.equal(have, want), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_replay_matches_plain_build(family: str, dtype: torch.dtype) -> None:
    rec = None
    for seed in (0, 1234):  # one recording replays for any generator state
        model, expected, rng_after = _plain(CONFIGS[family], seed, dtype)
        rec = rec or record_init(type(model), CONFIGS[family](), dtype=dtype)
        torch.manual_seed(seed)
        got = dict(replay_recording(rec))
        assert torch.equal(torch.get_rng_state(), rng_after)
        _assert_same(got, expected, rec.aliases)
        assert set(model.state_dict()) <= set(got) | set(rec.aliases)
        for alias, canonical in rec.aliases.items():  # tied in the plain build too
            assert expected[alias].data_ptr() == expected[canonical].data_ptr()


def test_tied_names_follow_config() -> None:
    assert tied_names(transformers.LlamaForCausalLM, CONFIGS["llama-tied"]()) == {
        "lm_head.weight": "model.embed_tokens.weight"}
    assert tied_names(transformers.LlamaForCausalLM, CONFIGS["llama-gqa"]()) == {}


def test_explicit_state_config_untouched_and_caller_draws_between_yields() -> None:
    model, expected, rng_after = _plain(CONFIGS["llama-gqa"], 7, torch.float32)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    config = CONFIGS["llama-gqa"]()
    torch.manual_seed(99)  # the replay must use `state`, not the current generator
    got = {}
    for name, tensor in replay_init(type(model), config, dtype=torch.float32, rng_state=state):
        got[name] = tensor
        torch.rand(3)  # the caller's own draws must not shift the replay's
    _assert_same(got, expected, {})
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert config.dtype is None  # a plain build would set it; the replay builds a copy


def test_peak_memory_is_about_one_tensor() -> None:
    """8 layers whose largest tensor (an MLP matrix) is ~1/30 of the model.

    Bound: transformers' init writes each tensor whole, in one init call, at the start of each of its
    generations, so generations of different tensors overlap only inside one op (copy_ of a rotary buffer from
    its freshly computed value). So the replay holds at most the largest tensor plus what one op reads: at most
    2x the largest tensor. Measured here: exactly the largest tensor (65536 bytes of a ~2.1 MB model).
    """
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=256, vocab_size=96, num_hidden_layers=8)
    rec = record_init(transformers.LlamaForCausalLM, config, dtype=torch.float32)
    stats, model_bytes = ReplayStats(), 0
    for _, tensor in replay_recording(rec, stats=stats):
        model_bytes += tensor.numel() * tensor.element_size()
    assert stats.largest_tensor_bytes == 256 * 64 * 4
    assert stats.peak_live_bytes <= 2 * stats.largest_tensor_bytes
    assert stats.peak_live_bytes * 16 < model_bytes


class _Buildable(nn.Module):
    """A module built the way replay_init builds a transformers model."""

    @classmethod
    def _from_config(cls, config: object, dtype: torch.dtype) -> _Buildable:
        return cls()


class _Toy(_Buildable):
    """Init patterns beyond the transformers families above: real constants, a temporary read into a weight,
    partial writes through views, a non-contiguous parameter and a dead draw into a discarded tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.register_buffer("scale", torch.tensor([0.5, 2.0, 3.0]) * torch.arange(3))
        self.w = nn.Parameter(torch.empty(4, 3).t())
        with torch.no_grad():
            noise = torch.randn(8, 6)
            self.lin.weight.mul_(0.5).add_(noise.t())
            self.lin.weight[:, 0].uniform_(-1, 1)
            nn.init.normal_(self.w)
            torch.empty(5).normal_()  # consumes draws, never read
            self.w[1:].mul_(self.scale[1])


def test_general_ops_match_eager() -> None:
    torch.manual_seed(3)
    model = _Toy._from_config(None, dtype=torch.float32)
    rng_after = torch.get_rng_state()
    torch.manual_seed(3)
    got = dict(replay_init(_Toy, None, dtype=torch.float32))
    assert torch.equal(torch.get_rng_state(), rng_after)
    _assert_same(got, {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}, {})
    assert got["w"].stride() == model.w.stride()


class _ExplicitGenerator(_Buildable):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(4))
        nn.init.normal_(self.w, generator=torch.Generator().manual_seed(0))


class _ValueDependent(_Buildable):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        if self.w.sum() > 0:
            nn.init.zeros_(self.w)


@pytest.mark.parametrize("cls, words", [(_ExplicitGenerator, ["aten.normal_", "Generator"]),
                                        (_ValueDependent, ["depends on tensor values"])])
def test_unreplayable_init_is_named(cls: type, words: list[str]) -> None:
    state = torch.get_rng_state()
    with pytest.raises(UnsupportedModelError) as err:
        replay_init(cls, None, dtype=torch.float32)
    for word in [cls.__name__, *words, "broadcast"]:
        assert word in str(err.value)
    assert torch.equal(torch.get_rng_state(), state)
