"""What the executor knows of each model family: where the parts are, how a
stage runs them, how tensor parallelism cuts them.

A family adapter answers four questions for one transformers architecture:

* where the embedding, the blocks, the final norm and the LM head live
  (the module names the planner's stages use, ``autopar.profile.analytic.MODULE_NAMES``);
* how a pipeline stage runs a slice of the model exactly as the model's own
  ``forward`` would (same mask, same positions, same call of each block);
* the tensor-parallel plan of a block (DTensor ``ColwiseParallel`` /
  ``RowwiseParallel`` by module name), and what must change so a block runs on
  its shard (GPT-2's fused q/k/v and its transposed ``Conv1D``);
* how a checkpoint tensor maps onto the executed parameter (GPT-2's ``Conv1D``
  weights are stored transposed).

Families: ``gpt2`` (GPT-2, Cerebras-GPT) and ``llama`` (Llama, Mistral, Qwen2).
Anything else runs data-parallel only (see :func:`family_of`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from autopar.profile.analytic import MODULE_NAMES

SPLITTABLE = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
"""HF ``model_type`` -> the family whose adapter splits it (TP and PP)."""


def family_of(config) -> str | None:
    """The adapter family of a transformers config, or None (data parallel only)."""
    return SPLITTABLE.get(getattr(config, "model_type", None))


@functools.cache
def _mask_params() -> frozenset[str]:
    from transformers.masking_utils import create_causal_mask

    return frozenset(inspect.signature(create_causal_mask).parameters)


def _causal_mask(config, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor):
    """transformers' own 4D mask for this micro-batch, as the model's forward builds it."""
    from transformers.masking_utils import create_causal_mask

    params = _mask_params()
    cache_kw = "cache" if "cache" in params else "past_key_values"
    kwargs = {"config": config, "inputs_embeds": hidden, "attention_mask": mask, cache_kw: None,
              "position_ids": position_ids}
    if "cache_position" in params:  # transformers < 5.2x
        kwargs["cache_position"] = position_ids[0]
    return create_causal_mask(**kwargs)


@dataclass(frozen=True)
class Family:
    """Module names of one family: embedding, block pattern, final norm, LM head."""

    name: str

    @property
    def names(self) -> tuple[str, str, str, str]:
        return MODULE_NAMES[self.name]

    @property
    def base(self) -> str:
        """The base model's attribute on the causal LM (``transformer`` or ``model``)."""
        return self.names[0].split(".")[0]

    @property
    def blocks_attr(self) -> str:
        return self.names[1].split(".")[1]

    def block_name(self, index: int) -> str:
        return self.names[1].format(index)

    # --- running a stage -------------------------------------------------------------
    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Token (and, for GPT-2, learned position) embeddings of a micro-batch."""
        base = getattr(model, self.base)
        if self.name == "gpt2":
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            hidden = base.wte(input_ids)
            return base.drop(hidden + base.wpe(position_ids).to(hidden.device))
        return base.embed_tokens(input_ids)

    def block_context(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict:
        """What every block of a stage needs besides the hidden states (mask, positions, rotary)."""
        base = getattr(model, self.base)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        ctx = {"mask": _causal_mask(model.config, hidden, mask, position_ids), "position_ids": position_ids}
        if self.name == "llama":
            ctx["position_embeddings"] = base.rotary_emb(hidden, position_ids=position_ids)
        return ctx

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """One block, called as the HF base model's forward calls it."""
        if self.name == "gpt2":
            out = block(hidden, None, ctx["mask"], None, use_cache=False, position_ids=ctx["position_ids"])
        else:
            out = block(hidden, attention_mask=ctx["mask"], position_embeddings=ctx["position_embeddings"],
                        position_ids=ctx["position_ids"], use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, model: nn.Module) -> nn.Module:
        base = getattr(model, self.base)
        return base.ln_f if self.name == "gpt2" else base.norm

    # --- tensor parallelism --------------------------------------------------------------
    def block_tp_plan(self, config=None) -> dict:
        """DTensor styles by module name inside one block (Shoeybi et al. 2019, §3).

        transformers' ``config.base_model_tp_plan`` is used where it exists and
        speaks only plain ``colwise`` / ``rowwise`` for the blocks (Llama,
        Mistral, Qwen2); otherwise (GPT-2 has none) autopar's own plan.
        """
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        prefix = f"{self.blocks_attr}.*."
        hf = {k[len(prefix):]: v for k, v in (getattr(config, "base_model_tp_plan", None) or {}).items()
              if k.startswith(prefix)}
        if hf and all(v in styles for v in hf.values()):
            return {name: styles[style]() for name, style in hf.items()}
        if self.name == "gpt2":
            return {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
                    "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
        return {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel()}

    def attention(self, block: nn.Module) -> nn.Module:
        return block.attn if self.name == "gpt2" else block.self_attn

    def prepare_block_for_tp(self, block: nn.Module, tp: int) -> None:
        """Make a block's modules TP-able: GPT-2's Conv1D -> nn.Linear, local split width."""
        if self.name != "gpt2":
            return
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if type(child).__name__ == "Conv1D":
                    setattr(parent, name, _conv1d_as_linear(child))
        block.attn.split_size = block.attn.embed_dim // tp

    def checkpoint_transform(self, name: str, tensor: torch.Tensor, tp: int, converted: bool) -> torch.Tensor:
        """A checkpoint tensor as the executed parameter ``name`` holds it (whole, before TP).

        GPT-2 stores Conv1D weights as (in, out); where the executor runs an
        nn.Linear instead (``converted``: under TP) it holds (out, in). Its fused
        ``c_attn`` output is [q | k | v]; ColwiseParallel gives rank r the r-th
        contiguous chunk, so the rows are reordered to
        [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] and each rank holds matching heads.
        """
        if self.name != "gpt2" or not converted:
            return tensor
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight":
            tensor = tensor.t()
        if module.endswith("attn.c_attn") and tp > 1:
            tensor = reorder_qkv(tensor, tp)
        return tensor.contiguous()


    def checkpoint_inverse(self, name: str, tensor: torch.Tensor, tp: int, converted: bool) -> torch.Tensor:
        """The inverse of :meth:`checkpoint_transform`: an executed (whole) tensor in the checkpoint's layout."""
        if self.name != "gpt2" or not converted:
            return tensor
        module, leaf = name.rsplit(".", 1)
        if module.endswith("attn.c_attn") and tp > 1:
            tensor = unorder_qkv(tensor, tp)
        if leaf == "weight":
            tensor = tensor.t()
        return tensor.contiguous()


def unorder_qkv(tensor: torch.Tensor, tp: int) -> torch.Tensor:
    """Per-rank [q_r k_r v_r] chunks -> [q | k | v] (inverse of :func:`reorder_qkv`)."""
    per_rank = [chunk.chunk(3, dim=0) for chunk in tensor.chunk(tp, dim=0)]
    return torch.cat([torch.cat([parts[i] for parts in per_rank]) for i in range(3)])


def reorder_qkv(tensor: torch.Tensor, tp: int) -> torch.Tensor:
    """[q | k | v] along dim 0 -> per-rank [q_r k_r v_r] chunks (see Family.checkpoint_transform)."""
    q, k, v = tensor.chunk(3, dim=0)
    parts = [torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]]) for r in range(tp)]
    return torch.cat(parts)


def _conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """transformers' Conv1D (weight in x out, y = x W + b) as an equal nn.Linear (weight out x in)."""
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device,
                       dtype=conv.weight.dtype)
    if conv.weight.device.type != "meta":
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
    return linear
