"""Turn a plan into this rank's part of the model, on PyTorch's own engine.

The order is torchtitan's: build on the meta device, cut out this rank's
pipeline chunks, apply tensor parallelism (DTensor ``parallelize_module``),
activation checkpointing, then FSDP2 ``fully_shard`` over the data-parallel
mesh axis, and only then allocate (``to_empty``) and fill each local tensor
from the weight source (see :mod:`autopar.execute.weights`).

The model object the user receives is the transformers model itself, holding
only this rank's modules (blocks under their original names, in a
``ModuleDict``) with its ``forward`` replaced by the planned step
(:mod:`autopar.execute.step`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from autopar.errors import AutoparError
from autopar.execute.families import Family
from autopar.execute.runtime import Runtime
from autopar.execute.stage import StageModule
from autopar.plan.types import Plan
from autopar.profile.types import Recompute


@dataclass
class Layout:
    """This rank's place in the plan's mesh and what it holds."""

    plan: Plan
    mesh: object | None  # DeviceMesh (dp, pp, tp) or None for a world of one
    dp_rank: int = 0
    pp_rank: int = 0
    tp_rank: int = 0
    chunks: list[int] = field(default_factory=list)
    """Chunk indices (model order) this pipeline rank runs."""

    def sub(self, axis: str):
        return None if self.mesh is None else self.mesh[axis]

    @property
    def num_chunks(self) -> int:
        return self.plan.pp * self.plan.virtual_stages


def make_layout(plan: Plan, rt: Runtime) -> Layout:
    if plan.world_size != rt.world_size:
        raise AutoparError(f"plan for {plan.world_size} ranks (dp{plan.dp} x pp{plan.pp} x tp{plan.tp}) "
                           f"but WORLD_SIZE={rt.world_size}; plan for this world")
    mesh = None
    coords = (0, 0, 0)
    if rt.distributed:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(rt.device.type, (plan.dp, plan.pp, plan.tp), mesh_dim_names=("dp", "pp", "tp"))
        coords = tuple(mesh[a].get_local_rank() for a in ("dp", "pp", "tp"))
    chunks = [c for c in range(plan.pp * plan.virtual_stages) if plan.stage_rank(c) == coords[1]]
    return Layout(plan=plan, mesh=mesh, dp_rank=coords[0], pp_rank=coords[1], tp_rank=coords[2], chunks=chunks)


def _block_indices(family: Family, names) -> list[int]:
    pattern = re.compile("^" + re.escape(family.names[1]).replace(r"\{\}", r"(\d+)") + "$")
    return [int(m.group(1)) for n in names if (m := pattern.match(n))]


def _checkpointed(module: nn.Module) -> None:
    """Recompute ``module`` in backward (non-reentrant torch.utils.checkpoint), whatever its train mode."""
    inner = module.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def cut_to_rank(model: nn.Module, family: Family, layout: Layout) -> dict[int, dict[str, nn.Module]]:
    """Keep this rank's blocks (original names, in a ModuleDict), embedding and head; drop the rest."""
    base = getattr(model, family.base)
    blocks = getattr(base, family.blocks_attr)
    per_chunk: dict[int, dict[str, nn.Module]] = {}
    for c in layout.chunks:
        per_chunk[c] = {str(i): blocks[i] for i in _block_indices(family, layout.plan.stages[c].layers)}
    kept = {k: m for chunk in per_chunk.values() for k, m in chunk.items()}
    setattr(base, family.blocks_attr, nn.ModuleDict(dict(sorted(kept.items(), key=lambda kv: int(kv[0])))))
    first, last = 0 in layout.chunks, layout.num_chunks - 1 in layout.chunks
    if not first:
        for name in (("wte", "wpe") if family.name == "gpt2" else ("embed_tokens",)):
            setattr(base, name, None)
    if not last:
        setattr(base, "ln_f" if family.name == "gpt2" else "norm", None)
        model.lm_head = None
    return per_chunk


def apply_tp(model: nn.Module, family: Family, layout: Layout, converted: set[str]) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp_mesh = layout.sub("tp")
    tp = layout.plan.tp
    base = getattr(model, family.base)
    for key, block in getattr(base, family.blocks_attr).items():
        before = {n for n, m in block.named_modules() if type(m).__name__ == "Conv1D"}
        family.prepare_block_for_tp(block, tp)
        prefix = f"{family.block_name(int(key))}."
        converted.update(prefix + n for n in before)
        parallelize_module(block, tp_mesh, family.block_tp_plan(model.config))
    tied = model.lm_head is not None and getattr(model.config, "tie_word_embeddings", False)
    emb = base.wte if family.name == "gpt2" else base.embed_tokens
    if emb is not None:
        parallelize_module(emb, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
    if model.lm_head is not None:
        parallelize_module(model.lm_head, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
        if tied and emb is not None:
            model.lm_head.weight = emb.weight  # both Shard(0) over the vocabulary: one parameter again


def replicated_grad_params(model: nn.Module, family: Family, layout: Layout) -> list[nn.Parameter]:
    """Parameters whose gradient DTensor returns replicated though the parameter is sharded: the
    vocab-parallel embedding (the whole table's gradient on every TP rank). The step cuts them back to
    the rank's rows (``ParallelRuntime._shard_grads``); under FSDP2 (dp > 1) its reduce-scatter does."""
    emb = getattr(getattr(model, family.base), "wte" if family.name == "gpt2" else "embed_tokens")
    if layout.plan.tp > 1 and layout.plan.dp == 1 and emb is not None:
        return [emb.weight]
    return []


def apply_recompute(model: nn.Module, family: Family, recompute: Recompute) -> None:
    if recompute == Recompute.NONE:
        return
    for block in getattr(getattr(model, family.base), family.blocks_attr).values():
        _checkpointed(block if recompute == Recompute.FULL else family.attention(block))


def apply_fsdp(stages: list[StageModule], layout: Layout) -> None:
    from torch.distributed.fsdp import fully_shard

    dp_mesh = layout.sub("dp")
    reshard = layout.plan.zero_stage == 3
    for stage in stages:
        for block in stage.blocks.values():
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
            sum_gradients(block)
        fully_shard(stage, mesh=dp_mesh, reshard_after_forward=reshard)
        sum_gradients(stage)


def sum_gradients(module) -> None:
    """FSDP2 sums gradients over data-parallel ranks instead of averaging: the loss is already divided
    by the global token count. Plain SUM collectives (gloo has no PREMUL_SUM)."""
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def _fill_param(name: str, param, source, family: Family | None, tp: int, converted: set[str],
                device: torch.device) -> None:
    """Copy this rank's part of checkpoint tensor ``name`` into ``param`` (boxes if it can, else whole)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from autopar.execute import weights

    is_converted = name.rsplit(".", 1)[0] in converted
    if hasattr(source, "read") and hasattr(source, "info"):
        local = param.to_local() if isinstance(param, DTensor) else param.detach()
        reads = weights.local_reads(family, name, param, local, source.info(name)[0], tp, is_converted)
        if reads is not None:
            for box, dest in reads:
                source.read(name, box, dest)
            return
    full = source.get(name)
    if family is not None:
        full = family.checkpoint_transform(name, full, tp, converted=is_converted)
    full = full.to(device=device, dtype=param.dtype)
    if isinstance(param, DTensor):
        param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
    else:
        param.copy_(full)


def fill_from(model: nn.Module, family: Family | None, source, tp: int, converted: set[str],
              device: torch.device) -> None:
    """Allocate this rank's tensors and copy its shard of each from ``source``.

    Each parameter's local part is read as boxes of the stored tensor straight into the local tensor
    (:func:`autopar.execute.weights.local_reads`); a parameter whose placements or layout it cannot map
    is read whole, transformed and cut by ``distribute_tensor`` (values are the same either way). A
    streaming source (``stream()``, ``canonical(name)``: the replayed initialisation) hands each tensor
    once, whole, and every parameter stored under that name takes its part.
    """
    from autopar.execute import weights

    unknown = [n for n, _ in model.named_buffers() if ".rotary_emb." not in n]
    if unknown:  # to_empty leaves buffers uninitialised; only the rotary tables are rebuilt below
        raise AutoparError(f"buffers {unknown} of {type(model).__name__} are not in the checkpoint and autopar "
                           "cannot rebuild them; this architecture needs an adapter (docs/executor.md)")
    owners: dict[int, tuple[nn.Module, str]] = {}
    shared = []
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in owners:
                shared.append((module, attr, *owners[id(param)]))
            else:
                owners[id(param)] = (module, attr)
    model.to_empty(device=device)  # gives each module its own new tensor: re-tie what was shared
    for module, attr, owner, owner_attr in shared:
        setattr(module, attr, getattr(owner, owner_attr))
    with torch.no_grad():
        if hasattr(source, "stream"):  # tensors arrive one at a time, in the source's order
            by_name: dict[str, list[tuple[str, nn.Parameter]]] = {}
            for name, param in model.named_parameters():
                by_name.setdefault(source.canonical(name), []).append((name, param))
            for stored, full in source.stream():
                for name, param in by_name.pop(stored, []):
                    _fill_param(name, param, weights.StateDictSource({name: full}, {}), family, tp, converted,
                                device)
            if by_name:
                raise AutoparError(f"the weight source gave no tensor for {sorted(by_name)[:4]}")
        else:
            for name, param in model.named_parameters():
                _fill_param(name, param, source, family, tp, converted, device)
    if family is not None and family.name == "llama":
        base = getattr(model, family.base)
        fresh = type(base.rotary_emb)(config=model.config)
        base.rotary_emb = fresh.to(device)
