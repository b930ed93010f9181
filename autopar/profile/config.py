"""Find a model's Hugging Face config and read the shape autopar needs from it.

A model is named by a preset shipped in ``autopar/presets/models/`` (a
``config.json`` each), a path to a ``config.json`` or to a folder holding one,
or a model id present in the local Hugging Face cache. Nothing touches the
network and nothing here imports torch or transformers, so ``autopar explain``
starts fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from autopar.errors import AutoparError, UnsupportedModelError
from autopar.schema import (MODEL_CONFIG, MODEL_NAME, MODEL_TYPE, Checked, check_fields, check_path_text,
                            load_json_file, show)

# model_type -> family. Each family has its own formulas in analytic.py and its
# own module-name layout; everything else is refused with the list below.
FAMILIES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt_neox": "gpt_neox",
}


@dataclass(frozen=True, kw_only=True)
class ArchConfig:
    """The shape of a decoder-only transformer, read from its HF config."""

    name: str
    model_type: str
    family: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    gated_mlp: bool
    """SwiGLU-style MLP with gate, up and down projections (Llama family)."""
    learned_positions: bool
    """A learned position-embedding table (GPT-2's ``wpe``)."""
    attention_bias: bool
    mlp_bias: bool
    norm: str
    """``layernorm`` or ``rmsnorm``."""
    activation: str
    attn_dropout: float
    resid_dropout: float
    embd_dropout: float
    parallel_residual: bool = False
    """GPT-NeoX's attention and MLP read the same input."""
    raw: dict | None = None
    """The config dict it came from, to rebuild the model with transformers."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def list_presets() -> list[str]:
    """Names of the model configs shipped with autopar."""
    folder = resources.files("autopar.presets") / "models"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _preset_path(name: str) -> Path | None:
    folder = resources.files("autopar.presets") / "models"
    candidate = folder / f"{name.lower()}.json"
    return Path(str(candidate)) if candidate.is_file() else None


def _hf_cache_config(model_id: str) -> Path | None:
    """config.json of ``model_id`` in the local HF hub cache, if it is there."""
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    snapshots = Path(home) / f"models--{model_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    for snap in sorted(snapshots.iterdir()):
        if (snap / "config.json").is_file():
            return snap / "config.json"
    return None


def resolve_config_path(model: str) -> Path:
    """Turn a preset name, a path or a cached model id into a config.json path.

    Raises:
        AutoparError: nothing of that name exists; the message lists the presets.
    """
    path = check_path_text(model, "MODEL")
    if os.path.isdir(path):
        path = path / "config.json"
        if not os.path.lexists(path):
            raise AutoparError(f"folder {show(model)} holds no config.json; pass a folder with one")
        return path
    if path.suffix == ".json" or os.path.lexists(path):
        if not os.path.lexists(path):
            raise AutoparError(f"config file {show(model)} does not exist; pass an existing config.json")
        return path
    preset = _preset_path(model)
    if preset is not None:
        return preset
    cached = _hf_cache_config(model)
    if cached is not None:
        return cached
    raise AutoparError(
        f"unknown model {show(model)}: not a preset, a config.json path, or a model in the "
        f"local Hugging Face cache; pass a config.json or one of the presets: {', '.join(list_presets())}"
    )


def _load(model: str) -> tuple[Path, str, dict]:
    path = resolve_config_path(model)
    raw = load_json_file(path, "config")
    name = check_fields(raw, (MODEL_NAME,), where=f"config {show(str(path))}")["_autopar_name"]
    name = name or (path.parent.name if path.name == "config.json" else path.stem)
    if path.parent.parent.name == "snapshots":  # the HF cache: models--org--name/snapshots/<hash>/
        name = path.parent.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path, name, raw


def load_config_dict(model: str) -> tuple[str, dict]:
    """(display name, config dict) for a model reference."""
    _, name, raw = _load(model)
    return name, raw


_NULL_IS_ABSENT = ("rotary_pct", "partial_rotary_factor")
"""Fields autopar.profile.analytic reads from ``raw`` with a default: a null must read as absent, as in the schema."""


def _flag(c: Checked, key: str, default: bool) -> bool:
    return default if c[key] is None else c[key]


def _or(value, default):
    return default if value is None else value


def _family_mlp(c: Checked, family: str, hidden: int, where: str) -> tuple[int, str, tuple[float, float, float]]:
    """(MLP width, activation, (attention, residual, embedding) dropout) as each family's config names them."""
    if family == "gpt2":
        dropouts = tuple(_or(c[key], 0.1) for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop"))
        return _or(c["n_inner"], 4 * hidden), _or(c["activation_function"], "gelu_new"), dropouts
    if family == "gpt_neox":
        # GPT-NeoX drops out its embeddings with hidden_dropout (emb_dropout).
        hidden_dropout = _or(c["hidden_dropout"], 0.0)
        dropouts = (_or(c["attention_dropout"], 0.0), hidden_dropout, hidden_dropout)
        return _or(c["intermediate_size"], 4 * hidden), _or(c["hidden_act"], "gelu"), dropouts
    if c["intermediate_size"] is None:
        raise AutoparError(f"{where}: missing 'intermediate_size'; add it (a Llama-family config.json has it)")
    return c["intermediate_size"], _or(c["hidden_act"], "silu"), (_or(c["attention_dropout"], 0.0), 0.0, 0.0)


def arch_from_dict(name: str, raw: dict, where: str | None = None) -> ArchConfig:
    """Read an :class:`ArchConfig` from a HF config dict, checked against :data:`autopar.schema.MODEL_CONFIG`.

    Args:
        where: how errors name the config (default ``config 'NAME'``).

    Raises:
        UnsupportedModelError: the ``model_type`` is not a supported family.
        AutoparError: a field autopar reads is missing, of the wrong type or out of bounds.
    """
    where = where or f"config {show(name)}"
    model_type = check_fields(raw, (MODEL_TYPE,), where)["model_type"]
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model {show(name)} has architecture {show(model_type)} (model_type), which autopar cannot "
            f"profile; use a model of a supported model_type: {', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES[model_type]
    c = check_fields(raw, MODEL_CONFIG, where)
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    kv_heads = c["num_key_value_heads"] or heads
    head_dim = c["head_dim"]
    if head_dim is not None and head_dim * heads != hidden:
        raise UnsupportedModelError(
            f"model {show(name)} sets head_dim={head_dim} with {heads} heads != hidden_size {hidden}; autopar's "
            "profiles assume heads x head_dim = hidden_size; use a model where they match")
    if hidden % heads or heads % kv_heads:
        raise AutoparError(
            f"{where}: hidden_size={hidden}, heads={heads}, kv_heads={kv_heads}: "
            "hidden must divide by heads and heads by kv_heads; fix the config"
        )
    ffn, activation, dropouts = _family_mlp(c, family, hidden, where)
    architectures = c["architectures"] or (
        {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}.get(family, "LlamaForCausalLM"),)
    return ArchConfig(
        name=name,
        model_type=model_type,
        family=family,
        architecture=architectures[0],
        num_layers=c["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        ffn_hidden_size=ffn,
        vocab_size=c["vocab_size"],
        max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=_flag(c, "tie_word_embeddings", family == "gpt2"),
        gated_mlp=family == "llama",
        learned_positions=family == "gpt2",
        attention_bias=family != "llama" or _flag(c, "attention_bias", model_type == "qwen2"),
        mlp_bias=family != "llama" or _flag(c, "mlp_bias", False),
        norm="rmsnorm" if family == "llama" else "layernorm",
        activation=activation,
        attn_dropout=dropouts[0],
        resid_dropout=dropouts[1],
        embd_dropout=dropouts[2],
        parallel_residual=family == "gpt_neox" and _flag(c, "use_parallel_residual", True),
        raw={k: v for k, v in raw.items() if not (v is None and k in _NULL_IS_ABSENT)},
    )


def load_arch(model: str) -> ArchConfig:
    """Preset name, config path or cached model id -> :class:`ArchConfig`."""
    path, name, raw = _load(model)
    return arch_from_dict(name, raw, where=f"config {show(str(path))}")
