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
from autopar.families import FAMILIES, FamilySpec, family_spec, known
from autopar.schema import (MODEL_CONFIG, MODEL_NAME, MODEL_TYPE, Checked, check_fields, check_path_text,
                            load_json_file, show)

@dataclass(frozen=True, kw_only=True)
class ArchConfig:
    """The shape of a decoder-only transformer, read from its HF config."""

    name: str
    model_type: str
    family: str
    """The registry record (``autopar.families.FAMILIES`` key, the ``model_type``)."""
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    """Width of one attention head; heads x head_dim may differ from hidden_size (Gemma, Qwen3, Mistral-NeMo)."""
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    gated_mlp: bool
    """A gate, an up and a down projection (SwiGLU, GeGLU) instead of up and down."""
    learned_positions: bool
    """A learned position-embedding table (GPT-2's ``wpe``, OPT's ``embed_positions``)."""
    qkv_bias: bool
    """The q, k and v projections have biases."""
    out_bias: bool
    """The attention output projection has a bias."""
    mlp_bias: bool
    """Every MLP projection has a bias."""
    norm: str
    """``layernorm`` or ``rmsnorm``."""
    norm_params: int = 2
    """Parameters per element of a norm: 2 (LayerNorm weight and bias), 1 (RMSNorm, bias-free LayerNorm), 0."""
    block_norms: int = 2
    """Norms in a block: 1 (Falcon-7B's shared one), 2, or 4 (Gemma 2 and 3: before and after each sublayer)."""
    norm_inputs: int = 2
    """Distinct tensors the block's norms read (1 when attention and MLP share one input)."""
    qk_norm: str = ""
    """RMSNorm on q and k: ``head`` (per head, Qwen3, Gemma 3), ``width`` (over the projected width, OLMo 2)."""
    fused_qkv: bool = False
    """q, k and v come out of one projection as views of one buffer (GPT-2, NeoX, Phi-3, Falcon, BLOOM, MPT)."""
    rotary_fraction: float = 1.0
    """Fraction of a head rotated by rotary embeddings (0 for learned positions or ALiBi)."""
    sdpa: bool = True
    """transformers can run its attention with SDPA (BLOOM's and MPT's always materialise the scores)."""
    position_offset: int = 0
    """Extra rows of the learned position table (OPT's 2)."""
    embedding_norm: bool = False
    """A LayerNorm right after the token embedding (BLOOM)."""
    embed_dim: int = 0
    """Width of the token embedding and LM head when projected to and from hidden_size (OPT's
    ``word_embed_proj_dim``); 0 when they are hidden_size wide."""
    activation: str
    attn_dropout: float
    resid_dropout: float
    embd_dropout: float
    parallel_residual: bool = False
    """Attention and MLP read the same input (GPT-NeoX, Falcon)."""
    raw: dict | None = None
    """The config dict it came from, to rebuild the model with transformers."""

    @property
    def spec(self) -> FamilySpec:
        """The registry record of this model's family."""
        return family_spec(self.family)

    @property
    def profile(self) -> str:
        """Which analytic formulas profile it (the registry's ``profile``)."""
        return self.spec.profile

    @property
    def q_width(self) -> int:
        """Width of the queries and of the attention output: heads x head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of the keys and of the values: key/value heads x head_dim."""
        return self.num_key_value_heads * self.head_dim

    @property
    def token_width(self) -> int:
        """Width of the token embedding and the LM head."""
        return self.embed_dim or self.hidden_size


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
    return path, config_name(path, name), raw


def config_name(path: Path, autopar_name: str | None = None) -> str:
    """The model's name in plans (``Plan.model``) for the config.json at ``path``: its ``_autopar_name``,
    else its folder's name (a file's stem); in the HF cache, the model id. The executor names a config
    loaded from ``path`` the same way, so explain's plan and the run's have one digest."""
    name = autopar_name or (path.parent.name if path.name == "config.json" else path.stem)
    if path.parent.parent.name == "snapshots":  # the HF cache: models--org--name/snapshots/<hash>/
        name = path.parent.parent.parent.name.removeprefix("models--").replace("--", "/")
    return name


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


def _even_heads(c: Checked, heads: int, where: str) -> int:
    """head_dim of a family whose heads split hidden_size evenly (transformers refuses the rest)."""
    hidden = c["hidden_size"]
    if hidden % heads:
        raise AutoparError(f"{where}: hidden_size={hidden}, heads={heads}: hidden_size must divide by the heads "
                           "(head_dim = hidden_size / heads) unless the family's config sets head_dim; fix the config")
    return hidden // heads


def _rotary(c: Checked, default: float) -> float:
    """The rotated fraction of a head: ``rotary_pct``, ``partial_rotary_factor`` (top level or in rope_parameters)."""
    rope = c["rope_parameters"] or {}
    return _or(c["rotary_pct"], _or(c["partial_rotary_factor"], _or(rope.get("partial_rotary_factor"), default)))


def _gpt2(c: Checked, where: str) -> dict:
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    return dict(num_key_value_heads=heads, head_dim=_even_heads(c, heads, where),
                ffn_hidden_size=_or(c["n_inner"], 4 * hidden), activation=_or(c["activation_function"], "gelu_new"),
                attn_dropout=_or(c["attn_pdrop"], 0.1), resid_dropout=_or(c["resid_pdrop"], 0.1),
                embd_dropout=_or(c["embd_pdrop"], 0.1), gated_mlp=False, learned_positions=True, qkv_bias=True,
                out_bias=True, mlp_bias=True, norm="layernorm", fused_qkv=True, rotary_fraction=0.0,
                tie_default=True)


def _gpt_neox(c: Checked, where: str) -> dict:
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    hidden_dropout = _or(c["hidden_dropout"], 0.0)  # GPT-NeoX drops out its embeddings with it too
    parallel = _flag(c, "use_parallel_residual", True)
    return dict(num_key_value_heads=heads, head_dim=_even_heads(c, heads, where),
                ffn_hidden_size=_or(c["intermediate_size"], 4 * hidden), activation=_or(c["hidden_act"], "gelu"),
                attn_dropout=_or(c["attention_dropout"], 0.0), resid_dropout=hidden_dropout,
                embd_dropout=hidden_dropout, gated_mlp=False, learned_positions=False, qkv_bias=True,
                out_bias=True, mlp_bias=True, norm="layernorm", fused_qkv=True, rotary_fraction=_rotary(c, 0.25),
                parallel_residual=parallel, norm_inputs=1 if parallel else 2, tie_default=False)


_DECODER_LAYOUT = {
    "qwen3": dict(qk_norm="head"),
    "gemma2": dict(block_norms=4, norm_inputs=4),
    "gemma3_text": dict(block_norms=4, norm_inputs=4, qk_norm="head"),
    "phi3": dict(fused_qkv=True),
    "olmo2": dict(qk_norm="width"),
    "nemotron": dict(norm="layernorm", norm_params=2, gated_mlp=False),
    "starcoder2": dict(norm="layernorm", norm_params=2, gated_mlp=False),
}
"""How each Llama-like profile's block differs from Llama's (RMSNorm before attention and MLP, SwiGLU)."""

_HEAD_DIM_DEFAULT = {"qwen3": 128, "gemma": 256, "gemma2": 256, "gemma3_text": 256}
"""head_dim transformers uses when the config has none (not hidden_size / heads) for these profiles."""

_TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3_text", "starcoder2"})
"""Profiles whose transformers config ties the LM head to the embedding unless told otherwise."""


def _decoder_biases(c: Checked, model_type: str, profile: str) -> tuple[bool, bool, bool]:
    """(q/k/v, attention output, MLP) biases, as each modeling file builds its linears."""
    if model_type == "mistral" or profile == "phi3":
        return False, False, False
    if model_type == "qwen2":
        return True, False, False
    if profile == "starcoder2":
        bias = _flag(c, "use_bias", True)
        return bias, bias, bias
    attention = _flag(c, "attention_bias", False)
    mlp = _flag(c, "mlp_bias", False) if profile in ("llama", "granite", "nemotron") else False
    return attention, attention, mlp


def _decoder(c: Checked, raw: dict, model_type: str, profile: str, where: str) -> dict:
    """The Llama-like families (``model.layers.N``): GQA, head_dim free, rotary."""
    heads = c["num_attention_heads"]
    if c["intermediate_size"] is None:
        raise AutoparError(f"{where}: missing 'intermediate_size'; add it (a Llama-family config.json has it)")
    head_dim = c["head_dim"] or _HEAD_DIM_DEFAULT.get(profile) or _even_heads(c, heads, where)
    qkv_bias, out_bias, mlp_bias = _decoder_biases(c, model_type, profile)
    resid = _or({"phi3": c["resid_pdrop"], "starcoder2": c["residual_dropout"]}.get(profile), 0.0)
    default_act = "gelu_pytorch_tanh" if profile in ("gemma", "gemma2", "gemma3_text", "starcoder2") else "silu"
    activation = c["hidden_activation"] if profile in ("gemma2", "gemma3_text") else None
    layout = {"norm": "rmsnorm", "norm_params": 1, "gated_mlp": True, **_DECODER_LAYOUT.get(profile, {})}
    if profile == "gemma2" and raw.get("attn_logit_softcapping", 50.0) is not None:  # null: no cap
        layout["sdpa"] = False  # SDPA cannot soft-cap the scores: transformers refuses it, eager runs
    return dict(num_key_value_heads=c["num_key_value_heads"] or heads, head_dim=head_dim,
                ffn_hidden_size=c["intermediate_size"], activation=_or(activation, _or(c["hidden_act"], default_act)),
                attn_dropout=_or(c["attention_dropout"], 0.0), resid_dropout=resid,
                embd_dropout=_or(c["embedding_dropout"], 0.0) if profile == "starcoder2" else 0.0,
                learned_positions=False, qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias,
                rotary_fraction=_rotary(c, 0.5 if profile == "nemotron" else 1.0),
                tie_default=profile in _TIED_BY_DEFAULT, **layout)


def _falcon(c: Checked, where: str) -> dict:
    """Falcon: fused query_key_value (multi-query, or grouped with new_decoder_architecture), parallel blocks."""
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    new_arch, parallel = _flag(c, "new_decoder_architecture", False), _flag(c, "parallel_attn", True)
    if new_arch or not _flag(c, "multi_query", True):
        kv_heads = c["num_kv_heads"] or heads
    else:
        kv_heads = 1
    norms = c["num_ln_in_parallel_attn"] or (2 if new_arch else 1)
    block_norms, inputs = (2, 2) if not parallel else (norms, 1)
    bias, alibi = _flag(c, "bias", False), _flag(c, "alibi", False)
    dropout = _or(c["hidden_dropout"], 0.0)
    return dict(num_key_value_heads=kv_heads, head_dim=_even_heads(c, heads, where),
                ffn_hidden_size=_or(c["ffn_hidden_size"], 4 * hidden), activation=_or(c["activation"], "gelu"),
                attn_dropout=_or(c["attention_dropout"], 0.0) if alibi else 0.0, resid_dropout=dropout,
                embd_dropout=0.0, gated_mlp=False, learned_positions=False, qkv_bias=bias, out_bias=bias,
                mlp_bias=bias, norm="layernorm", block_norms=block_norms, norm_inputs=inputs, fused_qkv=True,
                rotary_fraction=0.0 if alibi else 1.0, parallel_residual=parallel, tie_default=True,
                # One shared k/v head (no enable_gqa): SDPA's fused kernels refuse the shapes and torch runs
                # its unfused math kernel, which keeps the s x s probabilities, as eager does.
                sdpa=kv_heads == heads or new_arch)


def _opt(c: Checked, where: str) -> dict:
    """OPT: learned positions offset by 2, ReLU fc1/fc2, optional project_in/out around the blocks."""
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    if c["ffn_dim"] is None:
        raise AutoparError(f"{where}: missing 'ffn_dim'; add it (an OPT config.json has it)")
    if not _flag(c, "do_layer_norm_before", True):
        raise UnsupportedModelError(
            f"{where}: do_layer_norm_before=false (OPT-350m's post-norm layout, no final norm) is not profiled; "
            "use an OPT with do_layer_norm_before=true (every OPT but 350m)")
    embed = c["word_embed_proj_dim"] or hidden
    bias = _flag(c, "enable_bias", True)
    return dict(num_key_value_heads=heads, head_dim=_even_heads(c, heads, where), ffn_hidden_size=c["ffn_dim"],
                activation=_or(c["activation_function"], "relu"), attn_dropout=_or(c["attention_dropout"], 0.0),
                resid_dropout=_or(c["dropout"], 0.1), embd_dropout=0.0, gated_mlp=False, learned_positions=True,
                position_offset=2, qkv_bias=bias, out_bias=bias, mlp_bias=bias, norm="layernorm",
                norm_params=2 if _flag(c, "layer_norm_elementwise_affine", True) else 0,
                embed_dim=0 if embed == hidden else embed, rotary_fraction=0.0, tie_default=True)


def _bloom(c: Checked, where: str) -> dict:
    """BLOOM: ALiBi, fused per-head query_key_value, an embedding LayerNorm, 4h GELU, biases everywhere."""
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    return dict(num_key_value_heads=heads, head_dim=_even_heads(c, heads, where), ffn_hidden_size=4 * hidden,
                activation="bloom_gelu", attn_dropout=_or(c["attention_dropout"], 0.0),
                resid_dropout=_or(c["hidden_dropout"], 0.0), embd_dropout=0.0, gated_mlp=False,
                learned_positions=False, qkv_bias=True, out_bias=True, mlp_bias=True, norm="layernorm",
                embedding_norm=True, fused_qkv=True, rotary_fraction=0.0, sdpa=False, tie_default=True)


def _mpt(c: Checked, where: str) -> dict:
    """MPT as transformers builds it: ALiBi, fused Wqkv, 4 x d_model GELU MLP, no biases, bias-free LayerNorm."""
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    attn = c["attn_config"] or {}
    built = {"expansion_ratio": (c["expansion_ratio"], 4), "no_bias": (c["no_bias"], True),
             "attn_config.alibi": (attn.get("alibi"), True), "attn_config.qk_ln": (attn.get("qk_ln"), False),
             "attn_config.attn_type": (attn.get("attn_type"), "multihead_attention")}
    for key, (value, fixed) in built.items():
        if value is not None and value != fixed:
            raise UnsupportedModelError(
                f"{where}: {key}={show(value)}: transformers' MPT always builds {key}={show(fixed)}, so it "
                f"cannot run this model as published; use an MPT with {key}={show(fixed)} (MPT-7B, MPT-30B)")
    dropout = _or(attn.get("attn_pdrop"), 0.0)  # transformers' MPT uses it for the residual dropouts too
    return dict(num_key_value_heads=heads, head_dim=_even_heads(c, heads, where), ffn_hidden_size=4 * hidden,
                activation="gelu", attn_dropout=dropout, resid_dropout=dropout, embd_dropout=0.0, gated_mlp=False,
                learned_positions=False, qkv_bias=False, out_bias=False, mlp_bias=False, norm="layernorm",
                norm_params=1, fused_qkv=True, rotary_fraction=0.0, sdpa=False, tie_default=True)


_FIXED_LAYOUT = {"gpt2": _gpt2, "gpt_neox": _gpt_neox, "falcon": _falcon, "opt": _opt, "bloom": _bloom, "mpt": _mpt}
"""Profiles with their own config fields and block layout; every other profile is read by :func:`_decoder`."""


def _shape(c: Checked, raw: dict, spec: FamilySpec, where: str) -> dict:
    """The family-specific fields of :class:`ArchConfig`, from each family's own config field names."""
    reader = _FIXED_LAYOUT.get(spec.profile)
    shape = reader(c, where) if reader else _decoder(c, raw, spec.name, spec.profile, where)
    heads, kv_heads = c["num_attention_heads"], shape["num_key_value_heads"]
    if heads % kv_heads:
        raise AutoparError(f"{where}: {heads} attention heads and {kv_heads} key/value heads: the heads must "
                           "divide by the key/value heads; fix the config")
    return shape


_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "falcon": "FalconForCausalLM",
                  "opt": "OPTForCausalLM", "bloom": "BloomForCausalLM", "mpt": "MptForCausalLM"}


def arch_from_dict(name: str, raw: dict, where: str | None = None) -> ArchConfig:
    """Read an :class:`ArchConfig` from a HF config dict, checked against :data:`autopar.schema.MODEL_CONFIG`.

    The family is the registry record of ``model_type`` (``autopar.families``); its ``profile`` says
    which config fields and formulas apply.

    Args:
        where: how errors name the config (default ``config 'NAME'``).

    Raises:
        UnsupportedModelError: the ``model_type`` is not in the registry, or a variant transformers cannot build.
        AutoparError: a field autopar reads is missing, of the wrong type or out of bounds.
    """
    where = where or f"config {show(name)}"
    model_type = check_fields(raw, (MODEL_TYPE,), where)["model_type"]
    if not known(model_type):
        raise UnsupportedModelError(
            f"model {show(name)} has architecture {show(model_type)} (model_type), which autopar cannot "
            f"profile; use a model of a supported model_type: {', '.join(sorted(FAMILIES))}"
        )
    spec = family_spec(model_type)
    c = check_fields(raw, MODEL_CONFIG, where)
    shape = _shape(c, raw, spec, where)
    tie_default = shape.pop("tie_default")
    architectures = c["architectures"] or (_ARCHITECTURES.get(spec.profile, "LlamaForCausalLM"),)
    return ArchConfig(
        name=name,
        model_type=model_type,
        family=spec.name,
        architecture=architectures[0],
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=c["num_attention_heads"],
        vocab_size=c["vocab_size"],
        max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=_flag(c, "tie_word_embeddings", tie_default),
        raw={k: v for k, v in raw.items() if not (v is None and k in _NULL_IS_ABSENT)},
        **shape,
    )


def load_arch(model: str) -> ArchConfig:
    """Preset name, config path or cached model id -> :class:`ArchConfig`."""
    path, name, raw = _load(model)
    return arch_from_dict(name, raw, where=f"config {show(str(path))}")
