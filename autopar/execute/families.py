"""How the executor runs each model family: a stage's slice of the forward, the tensor-parallel plan,
the checkpoint layout. The families themselves (names, what may be split) are the registry's,
``autopar.families``; this module turns a record into behaviour.

* :class:`Family` runs every family the registry marks ``runner="decoder"``: the layout transformers
  declares (``base_model_pp_plan``: embedding, blocks, final norm; ``base_model_tp_plan``: a
  ``ParallelStyle`` per block module). A stage runs its slice exactly as the base model's ``forward``
  does: the same masks (chosen per layer from ``config.layer_types``, or sliding-window for every layer
  where the record says so), the same rotary tables (per layer type where the rotary module takes one),
  the same keyword call of each block, and the causal LM's own work after the head (logit scaling,
  soft-capping) on the last stage.
* :class:`GPT2Family` is GPT-2's adapter: learned positions, and ``Conv1D`` weights (stored transposed,
  fused q/k/v) converted to ``nn.Linear`` under tensor parallelism.
* :func:`family_of` is None for a family without a runner: it trains data-parallel only.
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
from torch import nn

from autopar.errors import UnsupportedModelError
from autopar.families import FamilySpec, family_spec, known


def family_of(config) -> "Family | None":
    """The executor's view of ``config``'s family, or None (data parallel only; the registry says why)."""
    model_type = getattr(config, "model_type", None)
    if not known(model_type):
        return None
    spec = family_spec(model_type)
    if spec.runner == "gpt2":
        return GPT2Family(spec)
    return Family(spec) if spec.runner == "decoder" else None


def fallback_reason(config) -> str | None:
    """One line: why ``config`` trains data-parallel only (None if it can be split)."""
    model_type = getattr(config, "model_type", None)
    if not known(model_type):
        return (f"architecture {model_type!r} is not in autopar's family registry (docs/families.md); "
                "training it data-parallel only")
    spec = family_spec(model_type)
    return None if spec.splittable else spec.fallback


@functools.cache
def _mask_params() -> frozenset[str]:
    from transformers.masking_utils import create_causal_mask

    return frozenset(inspect.signature(create_causal_mask).parameters)


MASK_FUNCTIONS = {"full_attention": "create_causal_mask", "sliding_attention": "create_sliding_window_causal_mask"}
"""transformers' mask builder for each ``config.layer_types`` entry (``transformers.masking_utils``)."""


def _mask(kind: str, config, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor):
    """transformers' own 4D mask of ``kind`` for this micro-batch, as the model's forward builds it."""
    from transformers import masking_utils

    if kind not in MASK_FUNCTIONS:
        raise UnsupportedModelError(f"{config.model_type}: layers of attention kind {kind!r} (config.layer_types); "
                                    f"autopar runs {sorted(MASK_FUNCTIONS)}; train it data-parallel "
                                    "(autopar.enable_advanced_parallelization(tp=1, pp=1))")
    params = _mask_params()
    cache_kw = "cache" if "cache" in params else "past_key_values"
    kwargs = {"config": config, "inputs_embeds": hidden, "attention_mask": mask, cache_kw: None,
              "position_ids": position_ids}
    if "cache_position" in params:  # transformers < 5.2x
        kwargs["cache_position"] = position_ids[0]
    return getattr(masking_utils, MASK_FUNCTIONS[kind])(**kwargs)


def torch_style(style: str, sequence_parallel: bool = False):
    """transformers' TP style name (``base_model_tp_plan``) -> torch's ParallelStyle, or None where the
    parameter stays replicated and its gradient is summed over the TP group
    (``replicated_with_grad_allreduce``: per-head norms that see only this rank's heads).

    ``colwise_gather_output`` / ``rowwise_split_input`` are Colwise with a replicated output and Rowwise
    with a replicated input (torch spells them with layouts): the work between them (Phi-3's fused
    q/k/v, OLMo 2's whole-width q/k norms) runs whole on every rank. Under sequence parallelism the
    row-parallel outputs are reduce-scattered over the sequence (``Shard(1)``) instead of all-reduced
    ([Note: sequence parallelism]).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    out = Shard(1) if sequence_parallel else Replicate()
    styles = {
        "colwise": ColwiseParallel, "rowwise": lambda: RowwiseParallel(output_layouts=out),
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=out),
        "replicated_with_grad_allreduce": lambda: None,
    }
    if style not in styles:
        raise UnsupportedModelError(f"tensor-parallel style {style!r} in the model's base_model_tp_plan; autopar "
                                    f"maps {sorted(styles)}; train it with tp=1")
    return styles[style]()


def whole_sequence(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden`` as transformers' mask and rotary builders read it (batch, the whole sequence, dtype,
    device): a view, no copy, when ``hidden`` holds only this rank's slice of the sequence."""
    if hidden.shape[1] == mask.shape[1]:
        return hidden
    return hidden[:, :1].expand(-1, mask.shape[1], -1)


def sequence_parallel_styles(block: nn.Module, plan: dict) -> dict:
    """The styles sequence parallelism adds to a block's TP ``plan`` (torchtitan's ``apply_tp``).

    [Note: sequence parallelism]
    Between the tensor-parallel regions the residual stream is split over the
    sequence: each TP rank holds a local ``[b, s/tp, h]`` tensor (Korthikanti
    et al. 2022, §4.2.2). The embedding reduce-scatters into it, every norm
    directly under a block (a child whose class name contains ``Norm``) runs
    ``SequenceParallel`` on it, each module the plan splits (attention, MLP)
    all-gathers it back with ``PrepareModuleInput``, taking its hidden states
    as the block passes them (``hidden_states=`` or first positional), and the
    row-parallel projections reduce-scatter into it (``output_layouts=Shard(1)``);
    the final norm is ``SequenceParallel`` and the LM head gathers its input. A
    pipeline stage sends its slice (1/tp of the bytes). Masks, positions and
    rotary tables are built for the whole sequence, which the step pads to a
    multiple of tp (positions labelled -100, masked out).

    Raises:
        UnsupportedModelError: a block child holds parameters and is neither a norm nor split by the plan.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, SequenceParallel

    split = {name.split(".", 1)[0] for name in plan}
    styles = {}
    for name, child in block.named_children():
        if name in split:
            if name in _keyword_calls(type(block)):
                styles[name] = PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                  desired_input_kwarg_layouts={"hidden_states": Replicate()},
                                                  use_local_output=True)
            else:
                styles[name] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                  use_local_output=True)
        elif "norm" in type(child).__name__.lower():
            styles[name] = SequenceParallel(use_local_output=True)
        elif any(True for _ in child.parameters()):
            raise UnsupportedModelError(f"{type(block).__name__}.{name} ({type(child).__name__}) is neither a norm "
                                        "nor split by the tensor-parallel plan, so autopar cannot run it on a "
                                        "sequence slice; train with sequence_parallel=False")
    return styles


@functools.cache
def _keyword_calls(block_cls: type) -> frozenset[str]:
    """Children ``block_cls.forward`` calls with ``hidden_states=`` as a keyword (transformers' attention calls)."""
    try:
        source = inspect.getsource(block_cls.forward)
    except (OSError, TypeError) as err:
        raise UnsupportedModelError(f"{block_cls.__name__}.forward has no readable source ({err}), so autopar cannot "
                                    "tell how it passes hidden states to its attention and MLP; train with "
                                    "sequence_parallel=False") from err
    return frozenset(re.findall(r"self\.(\w+)\(\s*hidden_states\s*=", source))


class Family:
    """A registry family with the ``decoder`` runner (see the module docstring)."""

    def __init__(self, spec: FamilySpec):
        self.spec = spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name!r})"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def names(self) -> tuple[str, str, str, str]:
        return self.spec.module_names

    @property
    def base(self) -> str:
        return self.spec.base

    @property
    def blocks_attr(self) -> str:
        return self.spec.blocks.split(".")[1]

    def block_name(self, index: int) -> str:
        return self.spec.blocks.format(index)

    # --- the parts, by the registry's names -------------------------------------------
    def _leaf(self, name: str) -> str:
        return name.rsplit(".", 1)[-1]

    def first_attrs(self) -> tuple[str, ...]:
        """Attributes of the base model the first stage owns: the embedding and what follows it."""
        return tuple(self._leaf(n) for n in (self.spec.embedding, *self.spec.first_extra))

    @property
    def norm_attr(self) -> str:
        return self._leaf(self.spec.final_norm)

    def embedding(self, model: nn.Module) -> nn.Module | None:
        return getattr(getattr(model, self.base), self._leaf(self.spec.embedding))

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(getattr(model, self.base), self.norm_attr)

    def head(self, model: nn.Module) -> nn.Module | None:
        return getattr(model, self.spec.head)

    # --- running a stage -------------------------------------------------------------
    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The first stage's work before the blocks (embedding, then the record's extras)."""
        base = getattr(model, self.base)
        hidden = self.embedding(model)(input_ids)
        for attr in self.first_attrs()[1:]:
            hidden = getattr(base, attr)(hidden)
        if self.spec.embedding_multiplier:
            hidden = hidden * model.config.embedding_multiplier
        return hidden

    def layer_kind(self, config, index: int) -> str:
        """The attention kind of block ``index``, as the base model's forward picks its mask."""
        types = getattr(config, "layer_types", None)
        if types:
            return types[index]
        if self.spec.sliding_window_all and getattr(config, "sliding_window", None) is not None:
            return "sliding_attention"
        return "full_attention"

    def block_context(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
                      indices: list[int]) -> dict:
        """What blocks ``indices`` need besides the hidden states: masks and rotary tables per layer kind,
        for the whole sequence (the padding ``mask``'s length: under sequence parallelism ``hidden`` holds
        only this rank's slice of it)."""
        base = getattr(model, self.base)
        config = model.config
        hidden = whole_sequence(hidden, mask)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kinds = {self.layer_kind(config, i) for i in indices}
        ctx = {"position_ids": position_ids,
               "masks": {k: _mask(k, config, hidden, mask, position_ids) for k in kinds}, "rotary": None}
        rotary = getattr(base, "rotary_emb", None)
        if rotary is not None:
            if "layer_type" in inspect.signature(rotary.forward).parameters:
                ctx["rotary"] = {k: rotary(hidden, position_ids, k) for k in kinds}
            else:
                table = rotary(hidden, position_ids=position_ids)
                ctx["rotary"] = {k: table for k in kinds}
        return ctx

    def run_block(self, block: nn.Module, index: int, hidden: torch.Tensor, ctx: dict, config) -> torch.Tensor:
        """Block ``index``, called as the HF base model's forward calls it."""
        kind = self.layer_kind(config, index)
        kwargs = {"attention_mask": ctx["masks"][kind], "position_ids": ctx["position_ids"]}
        if ctx["rotary"] is not None:
            kwargs["position_embeddings"] = ctx["rotary"][kind]
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The last stage's work after the blocks: final norm, head, and the causal LM's logit transforms."""
        logits = self.head(model)(self.final_norm(model)(hidden))
        config = model.config
        if self.spec.logits_scaling:
            logits = logits / config.logits_scaling
        cap = getattr(config, "final_logit_softcapping", None) if self.spec.final_logit_softcapping else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # --- tensor parallelism --------------------------------------------------------------
    def _declared_tp(self, config) -> dict[str, str]:
        prefix = f"{self.blocks_attr}.*."
        plan = getattr(config, "base_model_tp_plan", None) or {}
        return {k[len(prefix):]: v for k, v in plan.items() if k.startswith(prefix)}

    def block_tp_plan(self, config, sequence_parallel: bool = False) -> dict:
        """DTensor styles by module name inside one block: what transformers declares for the family
        (row-parallel outputs sequence-sharded under ``sequence_parallel``)."""
        declared = self._declared_tp(config)
        if not declared:
            raise UnsupportedModelError(f"{config.model_type}: the config declares no base_model_tp_plan for its "
                                        "blocks; train it with tp=1")
        plan = {name: torch_style(style, sequence_parallel) for name, style in declared.items()}
        return {name: style for name, style in plan.items() if style is not None}

    def block_sp_plan(self, config, block: nn.Module) -> dict:
        """:meth:`block_tp_plan` with sequence parallelism: the block's norms ``SequenceParallel``, the
        modules the plan splits gathering their input over the sequence ([Note: sequence parallelism])."""
        plan = self.block_tp_plan(config, sequence_parallel=True)
        return {**plan, **sequence_parallel_styles(block, plan)}

    def first_stage_sp_plan(self) -> dict:
        """Styles for the first stage's modules after the embedding under sequence parallelism (by attribute
        of the base model): none for transformers' decoders, whose embedding is the whole first stage."""
        return {}

    def tp_grad_sum_modules(self, config) -> tuple[str, ...]:
        """Block modules whose replicated parameters see only this rank's heads: gradients summed over TP."""
        return tuple(n for n, s in self._declared_tp(config).items() if s == "replicated_with_grad_allreduce")

    def attention(self, block: nn.Module) -> nn.Module:
        for attr in ("self_attn", "attention", "attn"):
            if hasattr(block, attr):
                return getattr(block, attr)
        raise UnsupportedModelError(f"{type(block).__name__} has no attention module autopar recognises "
                                    "(self_attn, attention, attn); use recompute='full' or 'none'")

    def prepare_block_for_tp(self, block: nn.Module, tp: int) -> None:
        """Make a block's modules TP-able (nothing to do where transformers declares the plan)."""

    def checkpoint_transform(self, name: str, tensor: torch.Tensor, tp: int, converted: bool) -> torch.Tensor:
        """A checkpoint tensor as the executed parameter ``name`` holds it (whole, before TP): unchanged."""
        return tensor

    def checkpoint_inverse(self, name: str, tensor: torch.Tensor, tp: int, converted: bool) -> torch.Tensor:
        return tensor

    def stored_transposed(self, converted: bool) -> bool:
        """Checkpoint tensors of converted modules are stored transposed (GPT-2's Conv1D)."""
        return False


class GPT2Family(Family):
    """GPT-2 (and Cerebras-GPT): transformers declares no plans for it, so autopar's own adapter."""

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        base = getattr(model, self.base)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = base.wte(input_ids)
        return base.drop(hidden + base.wpe(position_ids).to(hidden.device))

    def block_context(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
                      indices: list[int]) -> dict:
        hidden = whole_sequence(hidden, mask)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return {"position_ids": position_ids,
                "masks": {"full_attention": _mask("full_attention", model.config, hidden, mask, position_ids)}}

    def run_block(self, block: nn.Module, index: int, hidden: torch.Tensor, ctx: dict, config) -> torch.Tensor:
        out = block(hidden, None, ctx["masks"]["full_attention"], None, use_cache=False,
                    position_ids=ctx["position_ids"])
        return out[0] if isinstance(out, tuple) else out

    def block_tp_plan(self, config=None, sequence_parallel: bool = False) -> dict:
        """Megatron's split of GPT-2's block (Shoeybi et al. 2019, §3) on the nn.Linear it is converted to."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        out = Shard(1) if sequence_parallel else Replicate()
        return {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(output_layouts=out),
                "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel(output_layouts=out)}

    def first_stage_sp_plan(self) -> dict:
        """The learned positions are computed whole (no communication) and each rank keeps its slice of the
        sequence; their gradient's backward all-gathers the slices, so the table's gradient is whole."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import PrepareModuleOutput

        return {"wpe": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                           use_local_output=True)}

    def tp_grad_sum_modules(self, config) -> tuple[str, ...]:
        return ()

    def prepare_block_for_tp(self, block: nn.Module, tp: int) -> None:
        """GPT-2's Conv1D -> nn.Linear, and the attention's split width per rank."""
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if type(child).__name__ == "Conv1D":
                    setattr(parent, name, _conv1d_as_linear(child))
        block.attn.split_size = block.attn.embed_dim // tp

    def stored_transposed(self, converted: bool) -> bool:
        return converted

    def checkpoint_transform(self, name: str, tensor: torch.Tensor, tp: int, converted: bool) -> torch.Tensor:
        """A checkpoint tensor as the executed parameter ``name`` holds it (whole, before TP).

        GPT-2 stores Conv1D weights as (in, out); where the executor runs an
        nn.Linear instead (``converted``: under TP) it holds (out, in). Its fused
        ``c_attn`` output is [q | k | v]; ColwiseParallel gives rank r the r-th
        contiguous chunk, so the rows are reordered to
        [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] and each rank holds matching heads.
        """
        if not converted:
            return tensor
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight":
            tensor = tensor.t()
        if module.endswith("attn.c_attn") and tp > 1:
            tensor = reorder_qkv(tensor, tp)
        return tensor.contiguous()

    def checkpoint_inverse(self, name: str, tensor: torch.Tensor, tp: int, converted: bool) -> torch.Tensor:
        """The inverse of :meth:`checkpoint_transform`: an executed (whole) tensor in the checkpoint's layout."""
        if not converted:
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
