"""Tiny configs of every family in autopar's registry (autopar/families.py), for tests.

Each exercises what its family does outside a plain Llama block: head_dim != hidden / heads,
sliding-window layers shorter than the test sequence, logit soft-capping and scaling, per-head
and whole-width q/k norms, fused projections, tied and untied heads.
"""

from __future__ import annotations

import transformers

VOCAB = 96
COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "max_position_embeddings": 64}
LLAMA_SHAPE = {"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 64}


def tiny_config(model_type: str):
    """A 4-block config of ``model_type`` small enough for 4 gloo ranks on 2 cores."""
    c = dict(COMMON)
    if model_type == "gpt2":
        return transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=64, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, vocab_size=VOCAB, bos_token_id=0,
                                       eos_token_id=0)
    if model_type == "gpt_neox":
        return transformers.GPTNeoXConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                                          intermediate_size=64, rotary_pct=0.5, hidden_dropout=0.0,
                                          attention_dropout=0.0, **c)
    if model_type == "falcon":
        return transformers.FalconConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                                         new_decoder_architecture=True, num_kv_heads=2, attention_dropout=0.0,
                                         hidden_dropout=0.0, **{k: v for k, v in c.items()
                                                                if k != "max_position_embeddings"})
    if model_type == "opt":
        return transformers.OPTConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                      word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, **c)
    if model_type == "bloom":
        return transformers.BloomConfig(n_layer=4, hidden_size=32, n_head=4, hidden_dropout=0.0,
                                        attention_dropout=0.0, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0)
    if model_type == "mpt":
        return transformers.MptConfig(n_layers=4, d_model=32, n_heads=4, expansion_ratio=4, max_seq_len=64,
                                      vocab_size=VOCAB, resid_pdrop=0.0, emb_pdrop=0.0,
                                      attn_config={"attn_pdrop": 0, "alibi": True})
    shape = dict(LLAMA_SHAPE)
    extra: dict = {}
    if model_type in ("qwen3", "gemma", "gemma2", "gemma3_text"):
        extra["head_dim"] = 16  # heads x head_dim = 64 != hidden 32
    if model_type in ("gemma2", "gemma3_text"):
        extra.update(sliding_window=4, final_logit_softcapping=3.0, attn_logit_softcapping=5.0,
                     query_pre_attn_scalar=16)
    if model_type == "gemma3_text":
        extra["sliding_window_pattern"] = 2
        extra["layer_types"] = ["sliding_attention", "full_attention"] * 2
    if model_type in ("mistral", "starcoder2", "phi3"):
        extra["sliding_window"] = 4
    if model_type == "qwen2":
        extra.update(use_sliding_window=True, sliding_window=4, max_window_layers=2)
    if model_type == "granite":
        extra.update(embedding_multiplier=3.0, logits_scaling=2.0, residual_multiplier=0.5, attention_multiplier=0.2)
    if model_type == "starcoder2":
        extra.update(residual_dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0)
    if model_type == "nemotron":
        extra["partial_rotary_factor"] = 0.5
    if model_type in ("llama", "qwen3"):
        extra["tie_word_embeddings"] = model_type == "qwen3"
    return transformers.AutoConfig.for_model(model_type, **shape, **c, **extra)


SPLIT_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                  "granite", "nemotron", "starcoder2", "gpt_neox")
FALLBACK_FAMILIES = ("falcon", "opt", "bloom", "mpt")
