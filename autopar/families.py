"""The registry of model families: one record per Hugging Face ``model_type``.

The profiler, the planner (through ``autopar explain``) and the executor all ask
this module, so what explain offers for a model is what the executor can run,
and a family is added in one place. A record says:

* where the parts of the model live (module names exactly as ``named_modules()``
  spells them on the causal LM): the token embedding, the block pattern, the
  final norm, the LM head, and any module the first pipeline stage runs between
  the embedding and the first block (GPT-2's learned positions, dropout);
* which analytic formulas profile it (``profile``: a key of
  ``autopar.profile.analytic``'s per-family terms);
* how the executor splits it (``runner``):

  - ``"decoder"``: the layout transformers itself declares. The tensor-parallel
    plan is the config's ``base_model_tp_plan`` (its style names mapped to
    torch's ``ParallelStyle`` in ``autopar.execute.families``); the stage
    split follows ``base_model_pp_plan`` (embedding, blocks, final norm). Work
    the model's forward does outside the blocks is named here as data
    (embedding multiplier, logit scaling and soft-capping, sliding-window masks)
    and performed by one generic stage runner;
  - ``"gpt2"``: GPT-2's own adapter (its ``Conv1D`` weights and fused q/k/v have
    no declared plan);
  - ``None``: no split; the model trains data-parallel only (FSDP2 or DDP over
    every rank), and ``fallback`` says why in one line.

Adding a family that declares both plans is one record here (and a tiny config
in the tests); see docs/families.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.errors import UnsupportedModelError


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """One model family, as the profiler, planner and executor see it."""

    name: str
    """The family's key (a ``model_type``)."""
    profile: str
    """Which analytic formulas profile it (``gpt2``, ``llama``, ``gpt_neox``, ... see autopar.profile)."""
    embedding: str
    """The token embedding's module name."""
    blocks: str
    """The block pattern, ``{}`` standing for the block index."""
    final_norm: str
    head: str = "lm_head"
    first_extra: tuple[str, ...] = ()
    """Modules the first stage runs after the token embedding, in order (positions, dropout)."""
    runner: str | None = "decoder"
    """``decoder`` (what transformers declares), ``gpt2`` (autopar's adapter) or None (data parallel only)."""
    fallback: str | None = None
    """Why a family without a runner trains data-parallel only (one line)."""
    embedding_multiplier: bool = False
    """The base model multiplies the embeddings by ``config.embedding_multiplier`` (Granite)."""
    logits_scaling: bool = False
    """The causal LM divides the logits by ``config.logits_scaling`` (Granite)."""
    final_logit_softcapping: bool = False
    """The causal LM soft-caps the logits, ``cap * tanh(logits / cap)`` with ``config.final_logit_softcapping``
    (Gemma 2 and 3)."""
    sliding_window_all: bool = False
    """Every layer uses a sliding-window mask when ``config.sliding_window`` is set (Mistral, Starcoder2,
    Phi-3); families with ``config.layer_types`` choose the mask per layer from it instead."""
    sequence_parallel: bool = True
    """The executor runs it sequence-parallel under TP (autopar.execute.families [Note: sequence parallelism]);
    False pins sequence parallelism off for it in the planner (explain and the executor)."""

    @property
    def module_names(self) -> tuple[str, str, str, str]:
        """(embedding, block pattern, final norm, LM head)."""
        return self.embedding, self.blocks, self.final_norm, self.head

    @property
    def base(self) -> str:
        """The base model's attribute on the causal LM (``model``, ``transformer``, ``gpt_neox``)."""
        return self.blocks.split(".")[0]

    @property
    def splittable(self) -> bool:
        """Tensor and pipeline parallel are available (otherwise data parallel only)."""
        return self.runner is not None


def _decoder(name: str, profile: str = "llama", **quirks) -> FamilySpec:
    """A family laid out as transformers' Llama: ``model.embed_tokens``, ``model.layers.N``, ``model.norm``."""
    return FamilySpec(name=name, profile=profile, embedding="model.embed_tokens", blocks="model.layers.{}",
                      final_norm="model.norm", **quirks)


def _fallback(name: str, profile: str, names: tuple[str, str, str, str], first_extra: tuple[str, ...],
              reason: str) -> FamilySpec:
    emb, blocks, norm, head = names
    return FamilySpec(name=name, profile=profile, embedding=emb, blocks=blocks, final_norm=norm, head=head,
                      first_extra=first_extra, runner=None, fallback=reason)


FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (
    FamilySpec(name="gpt2", profile="gpt2", embedding="transformer.wte", blocks="transformer.h.{}",
               final_norm="transformer.ln_f", first_extra=("transformer.wpe", "transformer.drop"), runner="gpt2"),
    _decoder("llama"),
    _decoder("mistral", sliding_window_all=True),
    _decoder("qwen2"),
    _decoder("qwen3", profile="qwen3"),
    _decoder("gemma", profile="gemma"),
    _decoder("gemma2", profile="gemma2", final_logit_softcapping=True),
    _decoder("gemma3_text", profile="gemma3_text", final_logit_softcapping=True),
    _decoder("phi3", profile="phi3", sliding_window_all=True),
    _decoder("olmo2", profile="olmo2"),
    _decoder("granite", profile="granite", embedding_multiplier=True, logits_scaling=True),
    _decoder("nemotron", profile="nemotron"),
    _decoder("starcoder2", profile="starcoder2", sliding_window_all=True),
    FamilySpec(name="gpt_neox", profile="gpt_neox", embedding="gpt_neox.embed_in", blocks="gpt_neox.layers.{}",
               final_norm="gpt_neox.final_layer_norm", first_extra=("gpt_neox.emb_dropout",)),
    _fallback("falcon", "falcon", ("transformer.word_embeddings", "transformer.h.{}", "transformer.ln_f", "lm_head"),
              (), "Falcon: transformers declares no tensor/pipeline plan for it (fused multi-query q/k/v, "
                  "ALiBi or rotary variants); training it data-parallel only"),
    _fallback("opt", "opt", ("model.decoder.embed_tokens", "model.decoder.layers.{}",
                             "model.decoder.final_layer_norm", "lm_head"),
              ("model.decoder.embed_positions",),
              "OPT: transformers declares no tensor/pipeline plan for it (learned offset positions, optional "
              "project_in/out); training it data-parallel only"),
    _fallback("bloom", "bloom", ("transformer.word_embeddings", "transformer.h.{}", "transformer.ln_f", "lm_head"),
              ("transformer.word_embeddings_layernorm",),
              "BLOOM: transformers declares no tensor/pipeline plan for it (ALiBi, fused per-head q/k/v); "
              "training it data-parallel only"),
    _fallback("mpt", "mpt", ("transformer.wte", "transformer.blocks.{}", "transformer.norm_f", "lm_head"), (),
              "MPT: transformers declares no tensor/pipeline plan for it (ALiBi, fused Wqkv); training it "
              "data-parallel only"),
)}
"""``model_type`` -> its family."""


def family_spec(model_type: str | None) -> FamilySpec:
    """The record of ``model_type``.

    Raises:
        UnsupportedModelError: no family of that name; the message lists those there are.
    """
    spec = FAMILIES.get(model_type or "")
    if spec is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a family autopar knows; supported: {', '.join(sorted(FAMILIES))} "
            "(docs/families.md says how a family is added)")
    return spec


def known(model_type: str | None) -> bool:
    return (model_type or "") in FAMILIES
