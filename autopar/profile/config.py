"""Find a model's Hugging Face config and read the shape autopar needs from it.

A model is named by a preset shipped in ``autopar/presets/models/`` (a
``config.json`` each), a path to a ``config.json`` or to a folder holding one,
or a model id present in the local Hugging Face cache. Nothing touches the
network and nothing here imports torch or transformers, so ``autopar explain``
starts fast.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from autopar.errors import AutoparError, UnsupportedModelError

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
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise AutoparError(f"folder {model!r} holds no config.json; pass a folder with one")
        return path
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise AutoparError(f"config file {model!r} does not exist")
        return path
    preset = _preset_path(model)
    if preset is not None:
        return preset
    cached = _hf_cache_config(model)
    if cached is not None:
        return cached
    raise AutoparError(
        f"unknown model {model!r}: not a preset, a config.json path, or a model in the "
        f"local Hugging Face cache; presets: {', '.join(list_presets())}"
    )


def load_config_dict(model: str) -> tuple[str, dict]:
    """(display name, config dict) for a model reference."""
    path = resolve_config_path(model)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AutoparError(f"malformed config {str(path)!r}: {err}; pass a valid HF config.json") from None
    if not isinstance(raw, dict):
        raise AutoparError(f"malformed config {str(path)!r}: expected a JSON object, got {type(raw).__name__}")
    name = raw.get("_autopar_name") or (path.parent.name if path.name == "config.json" else path.stem)
    if path.parent.parent.name == "snapshots":  # the HF cache: models--org--name/snapshots/<hash>/
        name = path.parent.parent.parent.name.removeprefix("models--").replace("--", "/")
    return str(name), raw


def _positive_int(raw: dict, keys: tuple[str, ...], name: str, default: int | None = None) -> int:
    for key in keys:
        if raw.get(key) is not None:
            value = raw[key]
            break
    else:
        key = keys[0]
        if default is None:
            raise AutoparError(f"config {name!r} lacks {keys[0]!r}; a causal-LM config.json needs it")
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AutoparError(f"config {name!r}: {key}={value!r} must be a positive integer")
    return value


def arch_from_dict(name: str, raw: dict) -> ArchConfig:
    """Read an :class:`ArchConfig` from a HF config dict.

    Raises:
        UnsupportedModelError: the ``model_type`` is not a supported family.
        AutoparError: a required field is missing or not a positive integer.
    """
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model {name!r} has architecture {model_type!r} (model_type), which autopar cannot "
            f"profile; supported: {', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES[model_type]
    layers = _positive_int(raw, ("num_hidden_layers", "n_layer"), name)
    hidden = _positive_int(raw, ("hidden_size", "n_embd"), name)
    heads = _positive_int(raw, ("num_attention_heads", "n_head"), name)
    kv_heads = _positive_int(raw, ("num_key_value_heads",), name, default=heads)
    vocab = _positive_int(raw, ("vocab_size",), name)
    positions = _positive_int(raw, ("max_position_embeddings", "n_positions"), name, default=2048)
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise UnsupportedModelError(
            f"model {name!r} sets head_dim={head_dim} with {heads} heads != hidden_size {hidden}; autopar's "
            "profiles assume heads x head_dim = hidden_size")
    if hidden % heads or heads % kv_heads:
        raise AutoparError(
            f"config {name!r}: hidden_size={hidden}, heads={heads}, kv_heads={kv_heads}: "
            "hidden must divide by heads and heads by kv_heads"
        )
    if family == "gpt2":
        ffn = _positive_int(raw, ("n_inner",), name, default=4 * hidden)
        activation = raw.get("activation_function", "gelu_new")
        dropouts = (raw.get("attn_pdrop", 0.1), raw.get("resid_pdrop", 0.1), raw.get("embd_pdrop", 0.1))
    elif family == "gpt_neox":
        ffn = _positive_int(raw, ("intermediate_size",), name, default=4 * hidden)
        activation = raw.get("hidden_act", "gelu")
        # GPT-NeoX drops out its embeddings with hidden_dropout (emb_dropout).
        hidden_dropout = raw.get("hidden_dropout", 0.0)
        dropouts = (raw.get("attention_dropout", 0.0), hidden_dropout, hidden_dropout)
    else:
        ffn = _positive_int(raw, ("intermediate_size",), name)
        activation = raw.get("hidden_act", "silu")
        dropouts = (raw.get("attention_dropout", 0.0), 0.0, 0.0)
    architectures = raw.get("architectures") or [
        {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}.get(family, "LlamaForCausalLM")
    ]
    return ArchConfig(
        name=name,
        model_type=model_type,
        family=family,
        architecture=architectures[0],
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        ffn_hidden_size=ffn,
        vocab_size=vocab,
        max_position_embeddings=positions,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", family == "gpt2")),
        gated_mlp=family == "llama",
        learned_positions=family == "gpt2",
        attention_bias=family != "llama" or bool(raw.get("attention_bias", model_type == "qwen2")),
        mlp_bias=family != "llama" or bool(raw.get("mlp_bias", False)),
        norm="rmsnorm" if family == "llama" else "layernorm",
        activation=str(activation),
        attn_dropout=float(dropouts[0]),
        resid_dropout=float(dropouts[1]),
        embd_dropout=float(dropouts[2]),
        parallel_residual=family == "gpt_neox" and bool(raw.get("use_parallel_residual", True)),
        raw=raw,
    )


def load_arch(model: str) -> ArchConfig:
    """Preset name, config path or cached model id -> :class:`ArchConfig`."""
    name, raw = load_config_dict(model)
    return arch_from_dict(name, raw)
