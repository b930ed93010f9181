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
from torch.distributed.device_mesh import DeviceMesh

from autopar.errors import AutoparError
from autopar.execute import compat
from autopar.execute.families import Family
from autopar.execute.runtime import Runtime
from autopar.execute.stage import StageModule
from autopar.cost.data_parallel import Wrapper, dp_wrapped, dp_wrapper, executed_zero_stage
from autopar.plan.types import MeshAxis, Plan, Precision
from autopar.profile.types import Recompute


@dataclass
class Layout:
    """This rank's place in the plan's mesh and what it holds."""

    plan: Plan
    mesh: DeviceMesh | None
    """The (dp, pp, tp) mesh (axes named by :class:`MeshAxis`), or None for a world of one."""
    dp_rank: int = 0
    pp_rank: int = 0
    tp_rank: int = 0
    chunks: list[int] = field(default_factory=list)
    """Chunk indices (model order) this pipeline rank runs."""

    def sub(self, axis: MeshAxis) -> DeviceMesh | None:
        """The 1-D mesh of one axis (None in a world of one)."""
        return None if self.mesh is None else self.mesh[MeshAxis(axis).value]

    @property
    def num_chunks(self) -> int:
        return self.plan.pp * self.plan.virtual_stages


def make_layout(plan: Plan, rt: Runtime) -> Layout:
    if plan.world_size != rt.world_size:
        raise AutoparError(f"plan for {plan.world_size} ranks (dp{plan.dp} x pp{plan.pp} x tp{plan.tp}) "
                           f"but WORLD_SIZE={rt.world_size}; plan for this world")
    mesh = None
    coords = (0, 0, 0)
    if rt.distributed or dp_wrapped(plan.dp, plan.precision):
        from torch.distributed.device_mesh import init_device_mesh

        compat.start_one_process_group(rt.device)  # a world of one under bf16_mixed: FSDP2 casts over a mesh
        axes = tuple(a.value for a in MeshAxis)  # dp, pp, tp: outermost first
        mesh = init_device_mesh(rt.device.type, (plan.dp, plan.pp, plan.tp), mesh_dim_names=axes)
        coords = tuple(mesh[a].get_local_rank() for a in axes)
    chunks = [c for c in range(plan.pp * plan.virtual_stages) if plan.stage_rank(c) == coords[1]]
    return Layout(plan=plan, mesh=mesh, dp_rank=coords[0], pp_rank=coords[1], tp_rank=coords[2], chunks=chunks)


def _block_indices(family: Family, names) -> list[int]:
    pattern = re.compile("^" + re.escape(family.names[1]).replace(r"\{\}", r"(\d+)") + "$")
    return [int(m.group(1)) for n in names if (m := pattern.match(n))]


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
        for name in family.first_attrs():
            setattr(base, name, None)
    if not last:
        setattr(base, family.norm_attr, None)
        setattr(model, family.spec.head, None)
    return per_chunk


def apply_tp(model: nn.Module, family: Family, layout: Layout, converted: set[str]) -> None:
    """Tensor parallelism (and sequence parallelism where the plan says so) on this rank's modules: the
    blocks as the family declares them, the embedding and LM head split over the vocabulary, the logits
    left sharded for the loss ([Note: vocab-parallel embedding and loss], [Note: sequence parallelism])."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, SequenceParallel, parallelize_module

    from autopar.execute.vocab_parallel import apply_vocab_parallel_embedding

    tp_mesh = layout.sub(MeshAxis.TP)
    tp = layout.plan.tp
    sp = layout.plan.sequence_parallel
    base = getattr(model, family.base)
    for key, block in getattr(base, family.blocks_attr).items():
        before = {n for n, m in block.named_modules() if type(m).__name__ == "Conv1D"}
        family.prepare_block_for_tp(block, tp)
        prefix = f"{family.block_name(int(key))}."
        converted.update(prefix + n for n in before)
        plan = family.block_sp_plan(model.config, block) if sp else family.block_tp_plan(model.config)
        parallelize_module(block, tp_mesh, plan)
    head = family.head(model)
    tied = head is not None and getattr(model.config, "tie_word_embeddings", False)
    emb = family.embedding(model)
    if emb is not None:
        apply_vocab_parallel_embedding(emb, tp_mesh, sequence_parallel=sp)
        if sp:
            parallelize_module(base, tp_mesh, family.first_stage_sp_plan())
    if head is not None:
        if sp:
            parallelize_module(family.final_norm(model), tp_mesh, SequenceParallel(use_local_output=True))
        parallelize_module(head, tp_mesh, ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(),
                                                          output_layouts=Shard(-1), use_local_output=True))
        if tied and emb is not None:
            head.weight = emb.weight  # both Shard(0) over the vocabulary: one parameter again


def partial_grad_params(model: nn.Module, family: Family, layout: Layout) -> list[nn.Parameter]:
    """Parameters whose gradient DTensor returns in another placement than the parameter's: under sequence
    parallelism the replicated norm weights, whose gradient arrives ``Partial`` (each TP rank's sum over its
    slice of the sequence). The step redistributes them to the parameter's placement (an all-reduce;
    ``ParallelRuntime._shard_grads``); under FSDP2 (dp > 1) its reduce-scatter does."""
    from torch.distributed.tensor import DTensor

    if not layout.plan.sequence_parallel or layout.plan.dp > 1:
        return []
    base = getattr(model, family.base)
    modules = [m for block in getattr(base, family.blocks_attr).values() for m in block.children()]
    if family.head(model) is not None:
        modules.append(family.final_norm(model))
    return [p for m in modules if "norm" in type(m).__name__.lower() for p in m.parameters()
            if isinstance(p, DTensor) and p.requires_grad]


def tp_summed_grad_params(model: nn.Module, family: Family, layout: Layout) -> list[nn.Parameter]:
    """Parameters transformers marks ``replicated_with_grad_allreduce`` (Qwen3's and Gemma 3's per-head q/k
    norms): replicated over TP, each rank's gradient covers only its heads, so the step sums them over
    the TP group."""
    if layout.plan.tp == 1:
        return []
    names = family.tp_grad_sum_modules(model.config)
    base = getattr(model, family.base)
    return [p for block in getattr(base, family.blocks_attr).values() for n in names
            for p in block.get_submodule(n).parameters() if p.requires_grad]


def apply_recompute(model: nn.Module, family: Family, recompute: Recompute) -> None:
    if recompute == Recompute.NONE:
        return
    for block in getattr(getattr(model, family.base), family.blocks_attr).values():
        compat.recompute_module(block if recompute == Recompute.FULL else family.attention(block))


def apply_data_parallel(stages: list[StageModule], layout: Layout) -> None:
    """Wrap every block, then every stage, for the plan's ZeRO stage and precision (see
    :func:`wrap_data_parallel`); the caller does it where ``dp_wrapper`` says replicate or FSDP2."""
    for stage in stages:
        for block in stage.blocks.values():
            wrap_data_parallel(block, layout)
        wrap_data_parallel(stage, layout)


def wrap_ddp(stage: nn.Module, layout: Layout) -> nn.Module:
    """What ``dp_wrapper`` calls DDP (autopar/cost/data_parallel.py [Note: ZeRO stages as run]): torch's
    ``DistributedDataParallel`` around the one stage (a StageModule, or the whole model of a family without
    an adapter), over the data-parallel group, once its tensors are filled (DDP allocates its buckets from
    them; every rank filled the same values, so no broadcast).
    DDP averages gradients over the group; the step scales each rank's gradient by :func:`grad_scale`
    so that the result is their sum, as FSDP2's is. ``gradient_as_bucket_view`` is off: a call's
    gradients are kept aside while the next call's backward refills the buckets
    (autopar.execute.semantics [Note: deferred gradients])."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(stage, process_group=layout.sub(MeshAxis.DP).get_group(), init_sync=False,
                                   forward_sync_buffers=False, gradient_as_bucket_view=False)


def grad_scale(plan: Plan) -> int:
    """What each rank multiplies its gradient by before the wrapper reduces it: DDP divides the all-reduced
    sum by dp, FSDP2 and replicate are set to sum (:func:`sum_gradients`). A power of two (the usual dp)
    multiplies and divides exactly; otherwise the gradient is the sum to one rounding."""
    return plan.dp if dp_wrapper(plan) is Wrapper.DDP else 1


def wrap_data_parallel(module: nn.Module, layout: Layout) -> None:
    """What autopar/cost/data_parallel.py [Note: ZeRO stages as run] prices: ZeRO 0 (or one data-parallel rank) is
    torch's composable ``replicate`` (compat.replicate), 2 and 3 are FSDP2 ``fully_shard`` without and with
    resharding after forward; ``bf16_mixed`` casts through FSDP2's ``MixedPrecisionPolicy`` (bf16 parameters
    for compute, fp32 gradient reduction) in every case. Gradients are summed, not averaged."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plan = layout.plan
    mesh = layout.sub(MeshAxis.DP)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if plan.precision is Precision.BF16_MIXED else MixedPrecisionPolicy()
    if executed_zero_stage(plan) == 0:
        compat.replicate(module, mesh=mesh, mp_policy=mp)
    else:
        fully_shard(module, mesh=mesh, reshard_after_forward=plan.zero_stage == 3, mp_policy=mp)
    sum_gradients(module)


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


    persistent = compat.persistent_buffers(model)
    if persistent:  # to_empty leaves buffers uninitialised; only computed (non-persistent) ones are rebuilt
        raise AutoparError(f"buffers {persistent[:4]} of {type(model).__name__} are stored in checkpoints and autopar "
                           "reads parameters only; train it data-parallel (tp=1, pp=1) or add it to "
                           "autopar/families.py (docs/families.md)")
    owners_of_buffers = [m for m in model.modules() if m._buffers]
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
    compat.rebuild_buffers(model, owners_of_buffers, device)  # before the parameters: it may touch them
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
